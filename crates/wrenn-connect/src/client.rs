//! A small Connect client: unary and server-streaming calls, JSON or binary codec, over
//! hyper-util's pooled HTTP/1.1 client on plain HTTP, over TCP or a Unix socket
//! (`unix:/path`, see `wrenn_http::connect`).
//!
//! It is what the control plane uses to reach host agents. Errors come back as
//! [`ConnectError`]: the server's own Connect error when it sent one, `unavailable` when the
//! peer could not be reached, `deadline_exceeded` when the call's timeout passed.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use wrenn_http::connect::{Connector, request_base};

use crate::envelope::{Decoder, FLAG_COMPRESSED, FLAG_END_STREAM, encode};
use crate::error::{Code, ConnectError, WireError};
use crate::server::{BoxStream, Codec, DEFAULT_MAX_MESSAGE_BYTES, Message};

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid base URL {0:?}")]
    BadUrl(String),
    #[error("only http:// and unix:/socket base URLs are supported, got {0:?}")]
    NotHttp(String),
}

/// A Connect client for one server. Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct Client {
    http: HyperClient<Connector, Full<Bytes>>,
    /// The base URL as given (for messages).
    url: String,
    /// The base of request URIs, without a trailing slash; procedure paths are appended.
    base: String,
    codec: Codec,
    timeout: Option<Duration>,
    headers: HeaderMap,
    max_message_bytes: usize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.url)
            .field("codec", &self.codec)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for the server at `base_url` (`http://host:port[/prefix]`, or a Unix socket
    /// `unix:/path`), JSON codec, no timeout.
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        if !wrenn_http::connect::is_unix(base_url) {
            let uri: Uri = base_url
                .parse()
                .map_err(|_| ClientError::BadUrl(base_url.to_owned()))?;
            if uri.scheme_str() != Some("http") {
                return Err(ClientError::NotHttp(base_url.to_owned()));
            }
        }
        let base = request_base(base_url).map_err(|_| ClientError::BadUrl(base_url.to_owned()))?;
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(Connector::new(Duration::from_secs(5)));
        Ok(Client {
            http,
            url: base_url.to_owned(),
            base,
            codec: Codec::Json,
            timeout: None,
            headers: HeaderMap::new(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        })
    }

    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Every call carries `Connect-Timeout-Ms` and fails with `deadline_exceeded` after this
    /// long (for streams: after this long in total).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// A header sent with every call (e.g. authorization).
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    fn request(
        &self,
        path: &str,
        stream: bool,
        body: Bytes,
    ) -> Result<http::Request<Full<Bytes>>, ConnectError> {
        let content_type = match (self.codec, stream) {
            (Codec::Json, false) => "application/json",
            (Codec::Proto, false) => "application/proto",
            (Codec::Json, true) => "application/connect+json",
            (Codec::Proto, true) => "application/connect+proto",
        };
        let mut builder = http::Request::builder()
            .method(Method::POST)
            .uri(format!("{}{}", self.base, path))
            .header(header::CONTENT_TYPE, content_type)
            .header("connect-protocol-version", "1");
        if let Some(t) = self.timeout {
            builder = builder.header(crate::TIMEOUT_HEADER, t.as_millis().max(1).to_string());
        }
        let mut req = builder
            .body(Full::new(body))
            .map_err(|e| ConnectError::internal(format!("build request for {path}: {e}")))?;
        for (k, v) in &self.headers {
            req.headers_mut().insert(k, v.clone());
        }
        Ok(req)
    }

    /// Sends the request, bounded by the call's deadline.
    async fn send(
        &self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, ConnectError> {
        let fut = self.http.request(req);
        let res = match self.timeout {
            Some(t) => tokio::time::timeout(t, fut)
                .await
                .map_err(|_| deadline_err())?,
            None => fut.await,
        };
        res.map_err(|e| ConnectError::new(Code::Unavailable, format!("{}: {e}", self.url)))
    }

    /// A unary call.
    pub async fn unary<Req: Message, Resp: Message>(
        &self,
        path: &str,
        msg: &Req,
    ) -> Result<Resp, ConnectError> {
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        let req = self.request(path, false, encode_msg(self.codec, msg))?;
        let resp = self.send(req).await?;
        let status = resp.status();
        let read = read_limited(resp.into_body(), self.max_message_bytes);
        let body = match deadline {
            Some(d) => tokio::time::timeout_at(d, read)
                .await
                .map_err(|_| deadline_err())?,
            None => read.await,
        }?;
        if status != StatusCode::OK {
            return Err(error_from_body(status, &body));
        }
        decode_msg(self.codec, &body)
    }

    /// A server-streaming call. The request is sent and the response headers read before this
    /// returns; the stream then yields messages until the end-of-stream message, which ends it
    /// cleanly or with the server's error.
    pub async fn server_stream<Req: Message, Resp: Message>(
        &self,
        path: &str,
        msg: &Req,
    ) -> Result<BoxStream<Resp>, ConnectError> {
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        let payload = encode_msg(self.codec, msg);
        let req = self.request(path, true, encode(0, &payload))?;
        let resp = self.send(req).await?;
        let status = resp.status();
        if status != StatusCode::OK {
            let body = read_limited(resp.into_body(), self.max_message_bytes)
                .await
                .unwrap_or_default();
            return Err(error_from_body(status, &body));
        }
        let state = StreamState {
            body: resp.into_body(),
            decoder: Decoder::new(self.max_message_bytes),
            codec: self.codec,
            deadline,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            state,
            |mut st| async move {
                if st.done {
                    return None;
                }
                let item = st.next_message::<Resp>().await;
                match item {
                    Some(Ok(m)) => Some((Ok(m), st)),
                    Some(Err(e)) => {
                        st.done = true;
                        Some((Err(e), st))
                    }
                    None => None,
                }
            },
        )))
    }
}

struct StreamState {
    body: hyper::body::Incoming,
    decoder: Decoder,
    codec: Codec,
    deadline: Option<tokio::time::Instant>,
    done: bool,
}

impl StreamState {
    /// The next message; `None` after a clean end of stream.
    async fn next_message<Resp: Message>(&mut self) -> Option<Result<Resp, ConnectError>> {
        loop {
            match self.decoder.next_envelope() {
                Ok(Some(env)) => {
                    if env.flags & FLAG_COMPRESSED != 0 {
                        return Some(Err(ConnectError::internal(
                            "server sent a compressed message that was not asked for",
                        )));
                    }
                    if env.flags & FLAG_END_STREAM != 0 {
                        self.done = true;
                        return end_of_stream(&env.payload).map(Err);
                    }
                    return Some(decode_msg(self.codec, &env.payload));
                }
                Ok(None) => {}
                Err(e) => {
                    return Some(Err(ConnectError::new(
                        Code::ResourceExhausted,
                        e.to_string(),
                    )));
                }
            }
            let frame = match self.deadline {
                Some(d) => match tokio::time::timeout_at(d, self.body.frame()).await {
                    Ok(f) => f,
                    Err(_) => return Some(Err(deadline_err())),
                },
                None => self.body.frame().await,
            };
            match frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.decoder.push(data);
                    }
                }
                Some(Err(e)) => {
                    return Some(Err(ConnectError::new(
                        Code::Unavailable,
                        format!("read stream: {e}"),
                    )));
                }
                None => {
                    return Some(Err(ConnectError::new(
                        Code::Internal,
                        "stream ended without an end-of-stream message",
                    )));
                }
            }
        }
    }
}

fn deadline_err() -> ConnectError {
    ConnectError::deadline_exceeded("the call's deadline passed")
}

/// Parses an end-of-stream message: `None` for a clean end, the error otherwise.
fn end_of_stream(payload: &[u8]) -> Option<ConnectError> {
    #[derive(serde::Deserialize)]
    struct End {
        error: Option<WireError>,
    }
    match serde_json::from_slice::<End>(payload) {
        Ok(End { error: None }) => None,
        Ok(End { error: Some(e) }) => Some(ConnectError::new(e.code, e.message)),
        Err(e) => Some(ConnectError::internal(format!(
            "bad end-of-stream message: {e}"
        ))),
    }
}

/// The error of a non-200 response: the Connect error body if there is one, otherwise a code
/// derived from the HTTP status as the Connect specification maps it.
fn error_from_body(status: StatusCode, body: &[u8]) -> ConnectError {
    if let Ok(e) = serde_json::from_slice::<WireError>(body) {
        return ConnectError::new(e.code, e.message);
    }
    let code = match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502..=504 => Code::Unavailable,
        _ => Code::Unknown,
    };
    ConnectError::new(
        code,
        format!("HTTP {status}: {}", String::from_utf8_lossy(body)),
    )
}

fn encode_msg<T: Message>(codec: Codec, msg: &T) -> Bytes {
    match codec {
        Codec::Json => serde_json::to_vec(msg)
            .expect("generated messages always serialize")
            .into(),
        Codec::Proto => msg.encode_to_vec().into(),
    }
}

fn decode_msg<T: Message>(codec: Codec, bytes: &[u8]) -> Result<T, ConnectError> {
    match codec {
        Codec::Json => serde_json::from_slice(bytes)
            .map_err(|e| ConnectError::internal(format!("unmarshal JSON message: {e}"))),
        Codec::Proto => T::decode(bytes)
            .map_err(|e| ConnectError::internal(format!("unmarshal protobuf message: {e}"))),
    }
}

async fn read_limited(
    mut body: hyper::body::Incoming,
    limit: usize,
) -> Result<Bytes, ConnectError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ConnectError::new(Code::Unavailable, format!("read body: {e}")))?;
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > limit {
                return Err(ConnectError::new(
                    Code::ResourceExhausted,
                    format!("response larger than {limit} bytes"),
                ));
            }
            buf.extend_from_slice(data);
        }
    }
    Ok(buf.freeze())
}
