//! Tests of the router against real prost/pbjson messages, in both codecs.

use std::time::Duration;

use axum::body::Body;
use http::Request;
use http_body_util::BodyExt;
use prost::Message as _;
use tower::ServiceExt;
use wrenn_proto::process::{
    ListRequest, ListResponse, ProcessEvent, ProcessInfo, StartRequest, StartResponse,
    StreamInputRequest, StreamInputResponse, process_event, stream_input_request,
};

use super::*;
use crate::envelope::{Decoder, Envelope, encode};
use crate::error::WireError;

fn router() -> axum::Router {
    RpcRouter::new()
        .max_message_bytes(1024)
        .unary(
            "/process.Process/List",
            |ctx: RequestContext, _req: ListRequest| async move {
                if ctx.headers().contains_key("x-fail") {
                    return Err(ConnectError::not_found("process with pid 7 not found"));
                }
                if ctx.headers().contains_key("x-slow") {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                Ok(ListResponse {
                    processes: vec![ProcessInfo {
                        pid: 42,
                        ..Default::default()
                    }],
                })
            },
        )
        .server_stream(
            "/process.Process/Start",
            |ctx: RequestContext, req: StartRequest| async move {
                let n = req.process.map_or(0, |p| p.args.len());
                if n == 0 {
                    return Err(ConnectError::invalid_argument("no args"));
                }
                let slow = ctx.headers().contains_key("x-slow");
                let items = (0..n as u32).map(|pid| {
                    Ok(StartResponse {
                        event: Some(ProcessEvent {
                            event: Some(process_event::Event::Start(process_event::StartEvent {
                                pid,
                            })),
                        }),
                    })
                });
                let s = futures::stream::iter(items).then(move |item| async move {
                    if slow {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    item
                });
                Ok(Box::pin(s) as BoxStream<StartResponse>)
            },
        )
        .client_stream(
            "/process.Process/StreamInput",
            |_ctx: RequestContext, mut input: BoxStream<StreamInputRequest>| async move {
                let mut bytes = 0;
                while let Some(msg) = input.next().await {
                    if let Some(stream_input_request::Event::Data(d)) = msg?.event
                        && let Some(wrenn_proto::process::process_input::Input::Stdin(b)) =
                            d.input.and_then(|i| i.input)
                    {
                        bytes += b.len();
                    }
                }
                if bytes == 3 {
                    Ok(StreamInputResponse {})
                } else {
                    Err(ConnectError::internal(format!("got {bytes}")))
                }
            },
        )
        .into_router()
}

async fn call(req: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
    let resp = router().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

fn post(path: &str, content_type: &str, _: ()) -> http::request::Builder {
    Request::post(path).header("content-type", content_type)
}

fn frames(body: &[u8]) -> Vec<Envelope> {
    let mut d = Decoder::new(usize::MAX);
    d.push(body);
    let mut out = Vec::new();
    while let Some(e) = d.next_envelope().unwrap() {
        out.push(e);
    }
    d.finish().unwrap();
    out
}

#[tokio::test]
async fn unary_json_and_proto() {
    let (status, headers, body) = call(
        post("/process.Process/List", "application/json", ())
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["processes"][0]["pid"], 42);

    let req = post("/process.Process/List", "application/proto", ())
        .body(Body::from(ListRequest {}.encode_to_vec()))
        .unwrap();
    let (status, headers, body) = call(req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/proto");
    assert_eq!(ListResponse::decode(body).unwrap().processes[0].pid, 42);
}

#[tokio::test]
async fn unary_errors_have_connect_bodies_and_statuses() {
    let req = post("/process.Process/List", "application/json", ())
        .header("x-fail", "1")
        .body(Body::from("{}"))
        .unwrap();
    let (status, _, body) = call(req).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let e: WireError = serde_json::from_slice(&body).unwrap();
    assert_eq!(e.code, Code::NotFound);
    assert!(e.message.contains("pid 7"));

    // Malformed JSON and malformed protobuf.
    for (ct, body) in [
        ("application/json", &b"{not json"[..]),
        ("application/proto", &b"\xff\xff\xff"[..]),
    ] {
        let (status, _, body) = call(
            post("/process.Process/List", ct, ())
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{ct}");
        let e: WireError = serde_json::from_slice(&body).unwrap();
        assert_eq!(e.code, Code::InvalidArgument);
    }

    // Oversized body.
    let big = format!("{{\"x\":\"{}\"}}", "a".repeat(2000));
    let (status, _, body) = call(
        post("/process.Process/List", "application/json", ())
            .body(Body::from(big))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        serde_json::from_slice::<WireError>(&body).unwrap().code,
        Code::ResourceExhausted
    );

    // Wrong content type and method.
    let (status, _, _) = call(
        post("/process.Process/List", "text/plain", ())
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (status, _, _) = call(
        Request::get("/process.Process/List")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn unary_gzip_request_and_timeout() {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b"{}").unwrap();
    let req = post("/process.Process/List", "application/json", ())
        .header("content-encoding", "gzip")
        .body(Body::from(gz.finish().unwrap()))
        .unwrap();
    assert_eq!(call(req).await.0, StatusCode::OK);

    let req = post("/process.Process/List", "application/json", ())
        .header("x-slow", "1")
        .header("connect-timeout-ms", "50")
        .body(Body::from("{}"))
        .unwrap();
    let (status, _, body) = call(req).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        serde_json::from_slice::<WireError>(&body).unwrap().code,
        Code::DeadlineExceeded
    );

    let req = post("/process.Process/List", "application/json", ())
        .header("connect-timeout-ms", "soon")
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(call(req).await.0, StatusCode::BAD_REQUEST);
}

fn start_request_json(args: usize) -> Vec<u8> {
    let args: Vec<String> = (0..args).map(|i| i.to_string()).collect();
    serde_json::to_vec(&serde_json::json!({"process": {"cmd": "x", "args": args}})).unwrap()
}

#[tokio::test]
async fn server_stream_json_ends_with_end_stream() {
    let req = post("/process.Process/Start", "application/connect+json", ())
        .body(Body::from(encode(0, &start_request_json(3))))
        .unwrap();
    let (status, headers, body) = call(req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/connect+json");
    let f = frames(&body);
    assert_eq!(f.len(), 4);
    let first: serde_json::Value = serde_json::from_slice(&f[0].payload).unwrap();
    assert_eq!(
        first,
        serde_json::json!({"event": {"start": {}}}),
        "pid 0 is omitted"
    );
    let third: serde_json::Value = serde_json::from_slice(&f[2].payload).unwrap();
    assert_eq!(third["event"]["start"]["pid"], 2);
    assert_eq!(f[3].flags, FLAG_END_STREAM);
    assert_eq!(&f[3].payload[..], b"{}");
}

#[tokio::test]
async fn server_stream_proto_and_errors() {
    let msg = StartRequest {
        process: Some(wrenn_proto::process::ProcessConfig {
            args: vec!["a".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let req = post("/process.Process/Start", "application/connect+proto", ())
        .body(Body::from(encode(0, &msg.encode_to_vec())))
        .unwrap();
    let (status, _, body) = call(req).await;
    assert_eq!(status, StatusCode::OK);
    let f = frames(&body);
    assert_eq!(f.len(), 2);
    let ev = StartResponse::decode(f[0].payload.clone()).unwrap();
    assert!(matches!(
        ev.event.unwrap().event,
        Some(process_event::Event::Start(_))
    ));

    // A handler error before any message: 200 with an end-stream error.
    let req = post("/process.Process/Start", "application/connect+json", ())
        .body(Body::from(encode(0, &start_request_json(0))))
        .unwrap();
    let (status, _, body) = call(req).await;
    assert_eq!(status, StatusCode::OK);
    let f = frames(&body);
    assert_eq!(f.len(), 1);
    let end: serde_json::Value = serde_json::from_slice(&f[0].payload).unwrap();
    assert_eq!(end["error"]["code"], "invalid_argument");

    // A truncated envelope and an oversized one.
    let mut truncated = encode(0, &start_request_json(1)).to_vec();
    truncated.truncate(8);
    for body in [truncated, encode(0, &vec![b' '; 5000]).to_vec()] {
        let req = post("/process.Process/Start", "application/connect+json", ())
            .body(Body::from(body))
            .unwrap();
        let (status, _, body) = call(req).await;
        assert_eq!(status, StatusCode::OK);
        let f = frames(&body);
        let end: serde_json::Value = serde_json::from_slice(&f[0].payload).unwrap();
        assert!(
            ["invalid_argument", "resource_exhausted"]
                .contains(&end["error"]["code"].as_str().unwrap()),
            "{end}"
        );
    }
}

#[tokio::test]
async fn server_stream_deadline_ends_the_stream() {
    let req = post("/process.Process/Start", "application/connect+json", ())
        .header("x-slow", "1")
        .header("connect-timeout-ms", "500")
        .body(Body::from(encode(0, &start_request_json(10))))
        .unwrap();
    let (_, _, body) = call(req).await;
    let f = frames(&body);
    let end = f.last().unwrap();
    assert_eq!(end.flags, FLAG_END_STREAM);
    let end: serde_json::Value = serde_json::from_slice(&end.payload).unwrap();
    assert_eq!(end["error"]["code"], "deadline_exceeded");
    assert!(
        f.len() >= 2 && f.len() < 10,
        "some messages, then the deadline: {}",
        f.len()
    );
}

#[tokio::test]
async fn client_stream_json_over_chunks() {
    let mut body = Vec::new();
    body.extend_from_slice(&encode(0, br#"{"start":{"process":{"pid":1}}}"#));
    body.extend_from_slice(&encode(0, br#"{"data":{"input":{"stdin":"YWI="}}}"#));
    body.extend_from_slice(&encode(0, br#"{"keepalive":{}}"#));
    body.extend_from_slice(&encode(0, br#"{"data":{"input":{"stdin":"Yw=="}}}"#));
    // Deliver it in awkward pieces, as a chunked upload would.
    let chunks: Vec<Result<Bytes, std::io::Error>> = body
        .chunks(7)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let req = post(
        "/process.Process/StreamInput",
        "application/connect+json",
        (),
    )
    .body(Body::from_stream(futures::stream::iter(chunks)))
    .unwrap();
    let (status, _, body) = call(req).await;
    assert_eq!(status, StatusCode::OK);
    let f = frames(&body);
    assert_eq!(f.len(), 2);
    assert_eq!(&f[0].payload[..], b"{}");
    assert_eq!(f[1].flags, FLAG_END_STREAM);
    assert_eq!(&f[1].payload[..], b"{}");
}

/// Serves the router on loopback and calls it over h2c (HTTP/2 with prior knowledge).
#[tokio::test]
async fn h2c_and_http1_on_one_port() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let app = app.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        app.clone().oneshot(req.map(Body::new))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });

    for h2 in [true, false] {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let body = Body::from(encode(0, &start_request_json(2)));
        let req = Request::post(format!("http://{addr}/process.Process/Start"))
            .header("content-type", "application/connect+json")
            .body(body)
            .unwrap();
        let resp = if h2 {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            send.send_request(req).await.unwrap()
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            send.send_request(req).await.unwrap()
        };
        assert_eq!(
            resp.version(),
            if h2 {
                http::Version::HTTP_2
            } else {
                http::Version::HTTP_11
            }
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(frames(&body).len(), 3, "h2={h2}");
    }
}
