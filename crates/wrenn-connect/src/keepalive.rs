//! Keepalive messages on quiet server streams.

use std::time::Duration;

use futures::{Stream, StreamExt};

/// Yields the items of `inner`, and `make()` whenever `interval` passes without one.
///
/// The timer restarts after every item, so a busy stream sends no keepalives. The stream ends
/// when `inner` ends.
pub fn with_keepalive<S, T, F>(
    inner: S,
    interval: Duration,
    make: F,
) -> impl Stream<Item = T> + Send
where
    S: Stream<Item = T> + Send + 'static,
    T: Send + 'static,
    F: Fn() -> T + Send + 'static,
{
    let inner = Box::pin(inner);
    futures::stream::unfold((inner, make), move |(mut inner, make)| async move {
        match tokio::time::timeout(interval, inner.next()).await {
            Ok(Some(item)) => Some((item, (inner, make))),
            Ok(None) => None,
            Err(_elapsed) => {
                let ka = make();
                Some((ka, (inner, make)))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn quiet_streams_get_keepalives_busy_ones_do_not() {
        let (tx, rx) = tokio::sync::mpsc::channel::<&'static str>(4);
        let inner = tokio_stream_from(rx);
        let mut s = Box::pin(with_keepalive(inner, Duration::from_secs(50), || "ka"));
        tx.send("data").await.unwrap();
        assert_eq!(s.next().await, Some("data"));
        // Nothing for 50 s: a keepalive.
        assert_eq!(s.next().await, Some("ka"));
        tx.send("more").await.unwrap();
        assert_eq!(s.next().await, Some("more"));
        drop(tx);
        assert_eq!(s.next().await, None);
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl Stream<Item = T> + Send {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
