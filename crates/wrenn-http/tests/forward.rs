//! `forward_until`: a fired token ends a forwarded exchange at once, whatever the target does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::routing::get;
use futures::StreamExt as _;
use http::Request;
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use wrenn_http::forward::{self, ForwardError};

/// A target with a stream that sends one chunk and then nothing, and a route that never answers.
async fn target() -> SocketAddr {
    let app = axum::Router::new()
        .route(
            "/stream",
            get(|| async {
                let chunks =
                    futures::stream::once(async { Ok::<_, Infallible>(Bytes::from("first")) })
                        .chain(futures::stream::pending());
                Body::from_stream(chunks)
            }),
        )
        .route("/hang", get(std::future::pending::<&'static str>));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn get_req(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn a_fired_token_ends_a_streaming_body() {
    let addr = target().await;
    let client = forward::client(Duration::from_secs(2));
    let stop = CancellationToken::new();
    let resp = forward::forward_until(
        &client,
        &format!("http://{addr}"),
        get_req("/stream"),
        stop.clone(),
    )
    .await
    .unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first");
    // The target sends nothing more: only the token can end the body.
    let next = tokio::time::timeout(Duration::from_millis(200), body.frame()).await;
    assert!(next.is_err(), "the body ended by itself: {next:?}");
    stop.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(2), body.frame())
        .await
        .expect("the body did not end when stopped");
    assert!(
        matches!(ended, Some(Err(_))),
        "a stopped body must fail, not end cleanly: {ended:?}"
    );
}

#[tokio::test]
async fn a_fired_token_fails_a_request_waiting_for_its_answer() {
    let addr = target().await;
    let client = forward::client(Duration::from_secs(2));
    let stop = CancellationToken::new();
    let pending = tokio::spawn({
        let (client, stop) = (client.clone(), stop.clone());
        async move {
            forward::forward_until(&client, &format!("http://{addr}"), get_req("/hang"), stop).await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished());
    stop.cancel();
    let r = tokio::time::timeout(Duration::from_secs(2), pending)
        .await
        .expect("the request did not end when stopped")
        .unwrap();
    assert!(matches!(r, Err(ForwardError::Stopped)), "{r:?}");
}

#[tokio::test]
async fn an_unfired_token_changes_nothing() {
    let addr = target().await;
    let client = forward::client(Duration::from_secs(2));
    let resp = forward::forward(&client, &format!("http://{addr}"), get_req("/stream"))
        .await
        .unwrap();
    let first = resp
        .into_body()
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(first, "first");
}
