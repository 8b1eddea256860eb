//! envd starts as a plain process and answers /health.

mod support;

#[tokio::test]
async fn health_answers_204() {
    let envd = support::Envd::start(&[]);
    let resp = envd.client.get(envd.url("/health")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 204);
}
