//! The Connect client against our own Connect server on a real loopback socket: both codecs,
//! unary and server-streaming calls, server errors, end-of-stream errors, deadlines and
//! unreachable servers.

use std::time::Duration;

use futures::StreamExt;
use http::{HeaderName, HeaderValue};
use wrenn_connect::{BoxStream, Client, Code, Codec, ConnectError, RequestContext, RpcRouter};
use wrenn_proto::process::{
    ListRequest, ListResponse, ProcessConfig, ProcessEvent, ProcessInfo, StartRequest,
    StartResponse, process_event,
};

const LIST: &str = "/process.Process/List";
const START: &str = "/process.Process/Start";

/// Serves a small test service on an ephemeral loopback port; the task ends with the test.
async fn serve() -> String {
    let router = RpcRouter::new()
        .unary(LIST, |ctx: RequestContext, _req: ListRequest| async move {
            if let Some(v) = ctx.headers().get("x-fail") {
                return Err(ConnectError::not_found(v.to_str().unwrap_or("").to_owned()));
            }
            if ctx.headers().contains_key("x-slow") {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            // Echo the deadline the client sent, so the test can check the header.
            let pid = ctx.timeout().map_or(42, |t| t.as_millis() as u32);
            Ok(ListResponse {
                processes: vec![ProcessInfo {
                    pid,
                    ..Default::default()
                }],
            })
        })
        .server_stream(
            START,
            |_ctx: RequestContext, req: StartRequest| async move {
                let args = req.process.map(|p| p.args).unwrap_or_default();
                if args.is_empty() {
                    return Err(ConnectError::invalid_argument("no args"));
                }
                let fail_at_end = args.iter().any(|a| a == "fail");
                let slow = args.iter().any(|a| a == "slow");
                let n = args.len() as u32;
                let s = futures::stream::iter(0..n)
                    .then(move |pid| async move {
                        if slow {
                            tokio::time::sleep(Duration::from_millis(400)).await;
                        }
                        Ok(StartResponse {
                            event: Some(ProcessEvent {
                                event: Some(process_event::Event::Start(
                                    process_event::StartEvent { pid },
                                )),
                            }),
                        })
                    })
                    .chain(futures::stream::iter(fail_at_end.then(|| {
                        Err(ConnectError::new(Code::Aborted, "boom at the end"))
                    })));
                Ok(Box::pin(s) as BoxStream<StartResponse>)
            },
        )
        .into_router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

fn start(args: &[&str]) -> StartRequest {
    StartRequest {
        process: Some(ProcessConfig {
            cmd: "x".into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pids(events: &[StartResponse]) -> Vec<u32> {
    events
        .iter()
        .map(|e| match e.event.as_ref().and_then(|e| e.event.as_ref()) {
            Some(process_event::Event::Start(s)) => s.pid,
            other => panic!("unexpected event {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn unary_in_both_codecs() {
    let base = serve().await;
    for codec in [Codec::Json, Codec::Proto] {
        let client = Client::new(&base).unwrap().with_codec(codec);
        let resp: ListResponse = client.unary(LIST, &ListRequest {}).await.unwrap();
        assert_eq!(resp.processes[0].pid, 42, "{codec:?}");
    }
    // A trailing slash on the base URL does not double the slash.
    let client = Client::new(&format!("{base}/")).unwrap();
    let resp: ListResponse = client.unary(LIST, &ListRequest {}).await.unwrap();
    assert_eq!(resp.processes.len(), 1);
}

#[tokio::test]
async fn unary_errors_headers_and_deadlines() {
    let base = serve().await;
    let client = Client::new(&base).unwrap().with_header(
        HeaderName::from_static("x-fail"),
        HeaderValue::from_static("no such pid"),
    );
    let err = client
        .unary::<_, ListResponse>(LIST, &ListRequest {})
        .await
        .unwrap_err();
    assert_eq!(err, ConnectError::not_found("no such pid"));

    // The timeout goes to the server as Connect-Timeout-Ms...
    let client = Client::new(&base)
        .unwrap()
        .with_timeout(Duration::from_millis(1500));
    let resp: ListResponse = client.unary(LIST, &ListRequest {}).await.unwrap();
    assert_eq!(resp.processes[0].pid, 1500);
    // ...and bounds the call on the client side too.
    let client = Client::new(&base)
        .unwrap()
        .with_timeout(Duration::from_millis(300))
        .with_header(
            HeaderName::from_static("x-slow"),
            HeaderValue::from_static("1"),
        );
    let t = std::time::Instant::now();
    let err = client
        .unary::<_, ListResponse>(LIST, &ListRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::DeadlineExceeded);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // An unknown procedure: our server answers 404 without a Connect body.
    let client = Client::new(&base).unwrap();
    let err = client
        .unary::<_, ListResponse>("/nope.Nope/Nope", &ListRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::Unimplemented);
}

#[tokio::test]
async fn server_streams_in_both_codecs() {
    let base = serve().await;
    for codec in [Codec::Json, Codec::Proto] {
        let client = Client::new(&base).unwrap().with_codec(codec);
        let stream = client
            .server_stream::<_, StartResponse>(START, &start(&["a", "b", "c"]))
            .await
            .unwrap();
        let got: Vec<_> = stream.collect().await;
        let got: Vec<_> = got.into_iter().collect::<Result<_, _>>().unwrap();
        assert_eq!(pids(&got), [0, 1, 2], "{codec:?}");
    }
}

#[tokio::test]
async fn stream_errors() {
    let base = serve().await;
    let client = Client::new(&base).unwrap();
    // The handler refuses before streaming: a Connect error in the end-of-stream message.
    let res = client
        .server_stream::<_, StartResponse>(START, &start(&[]))
        .await;
    let err = match res {
        Ok(s) => {
            let items: Vec<_> = s.collect().await;
            assert_eq!(items.len(), 1, "{items:?}");
            items.into_iter().next().unwrap().unwrap_err()
        }
        Err(e) => e,
    };
    assert_eq!(err, ConnectError::invalid_argument("no args"));

    // Messages, then the error in the end-of-stream message, then nothing.
    let s = client
        .server_stream::<_, StartResponse>(START, &start(&["a", "fail"]))
        .await
        .unwrap();
    let items: Vec<_> = s.collect().await;
    assert_eq!(items.len(), 3, "{items:?}");
    assert!(items[0].is_ok() && items[1].is_ok());
    assert_eq!(
        items[2].as_ref().unwrap_err(),
        &ConnectError::new(Code::Aborted, "boom at the end")
    );

    // The deadline covers the whole stream.
    let client = Client::new(&base)
        .unwrap()
        .with_timeout(Duration::from_millis(600));
    let s = client
        .server_stream::<_, StartResponse>(START, &start(&["slow", "slow", "slow", "slow"]))
        .await
        .unwrap();
    let items: Vec<_> = s.collect().await;
    let last = items.last().unwrap().as_ref().unwrap_err();
    assert_eq!(last.code, Code::DeadlineExceeded, "{items:?}");
    assert!(items.len() <= 3, "{items:?}");
}

#[tokio::test]
async fn unreachable_servers_and_bad_urls() {
    // Bind and drop a listener to get a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = Client::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let err = client
        .unary::<_, ListResponse>(LIST, &ListRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::Unavailable, "{err}");
    let err = client
        .server_stream::<_, StartResponse>(START, &start(&["a"]))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code, Code::Unavailable, "{err}");

    assert!(Client::new("https://example.invalid").is_err());
    assert!(Client::new("not a url").is_err());
}
