//! Routing Connect procedures to handlers, decoding requests and encoding responses.

use std::future::Future;
use std::io::Read;
use std::pin::Pin;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::envelope::{self, Decoder, FLAG_COMPRESSED, FLAG_END_STREAM};
use crate::error::{Code, ConnectError};

/// Messages larger than this are refused with `resource_exhausted`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// A boxed stream of messages or errors, as handlers return and receive them.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, ConnectError>> + Send + 'static>>;

/// What a message type needs to travel in both codecs.
pub trait Message:
    prost::Message + Default + Serialize + DeserializeOwned + Send + 'static
{
}
impl<T> Message for T where
    T: prost::Message + Default + Serialize + DeserializeOwned + Send + 'static
{
}

/// The wire encoding of a call's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Json,
    Proto,
}

impl Codec {
    fn decode<T: Message>(self, bytes: &[u8]) -> Result<T, ConnectError> {
        match self {
            Codec::Json => {
                // An empty body is the empty message, as connect-go accepts it.
                if bytes.iter().all(u8::is_ascii_whitespace) {
                    return Ok(T::default());
                }
                serde_json::from_slice(bytes).map_err(|e| {
                    ConnectError::invalid_argument(format!("unmarshal JSON message: {e}"))
                })
            }
            Codec::Proto => T::decode(bytes).map_err(|e| {
                ConnectError::invalid_argument(format!("unmarshal protobuf message: {e}"))
            }),
        }
    }

    fn encode<T: Message>(self, msg: &T) -> Vec<u8> {
        match self {
            Codec::Json => serde_json::to_vec(msg).expect("generated messages always serialize"),
            Codec::Proto => msg.encode_to_vec(),
        }
    }
}

/// What the handler learns about the call besides its message.
#[derive(Debug)]
pub struct RequestContext {
    headers: HeaderMap,
    extensions: http::Extensions,
    timeout: Option<Duration>,
    codec: Codec,
}

impl RequestContext {
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Values that middleware attached to the request (e.g. the authenticated user).
    pub fn extensions(&self) -> &http::Extensions {
        &self.extensions
    }

    /// The call's deadline from `Connect-Timeout-Ms`, if the client set one.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The keepalive cadence the client asked for with `Keepalive-Ping-Interval` (seconds),
    /// or `default` when absent, zero or unparseable.
    pub fn keepalive_interval(&self, default: Duration) -> Duration {
        self.headers
            .get(crate::KEEPALIVE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|s| *s > 0)
            .map_or(default, Duration::from_secs)
    }
}

type Handler = Box<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// Collects procedures and turns them into an axum router.
pub struct RpcRouter {
    router: axum::Router,
    max_message_bytes: usize,
}

impl Default for RpcRouter {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unary,
    Stream,
}

impl RpcRouter {
    pub fn new() -> Self {
        Self {
            router: axum::Router::new(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }

    /// Limit for one message (and for a whole unary body). Set before adding procedures.
    pub fn max_message_bytes(mut self, limit: usize) -> Self {
        self.max_message_bytes = limit;
        self
    }

    fn add(mut self, path: &'static str, handler: Handler) -> Self {
        let handler = std::sync::Arc::new(handler);
        self.router = self.router.route(
            path,
            axum::routing::any(move |req: Request| {
                let handler = handler.clone();
                async move { handler(req).await }
            }),
        );
        self
    }

    /// A unary procedure: one message in, one message out.
    pub fn unary<Req, Resp, F, Fut>(self, path: &'static str, f: F) -> Self
    where
        Req: Message,
        Resp: Message,
        F: Fn(RequestContext, Req) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, ConnectError>> + Send + 'static,
    {
        let limit = self.max_message_bytes;
        self.add(
            path,
            Box::new(move |req| {
                let f = f.clone();
                Box::pin(async move {
                    let (ctx, body) = match prepare(req, Kind::Unary) {
                        Ok(x) => x,
                        Err(rejection) => return *rejection,
                    };
                    let codec = ctx.codec;
                    let timeout = ctx.timeout;
                    let encoding = content_encoding(&ctx.headers, header::CONTENT_ENCODING);
                    let call = async move {
                        let bytes = read_limited(body, limit).await?;
                        let bytes = decompress(encoding.as_deref(), bytes)?;
                        if bytes.len() > limit {
                            return Err(too_large(bytes.len(), limit));
                        }
                        let msg = codec.decode::<Req>(&bytes)?;
                        f(ctx, msg).await
                    };
                    match with_deadline(timeout, call).await {
                        Ok(resp) => unary_ok(codec, &resp),
                        Err(e) => unary_error(&e),
                    }
                })
            }),
        )
    }

    /// A server-streaming procedure: one message in, a stream out.
    pub fn server_stream<Req, Resp, F, Fut>(self, path: &'static str, f: F) -> Self
    where
        Req: Message,
        Resp: Message,
        F: Fn(RequestContext, Req) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<BoxStream<Resp>, ConnectError>> + Send + 'static,
    {
        let limit = self.max_message_bytes;
        self.add(
            path,
            Box::new(move |req| {
                let f = f.clone();
                Box::pin(async move {
                    let (ctx, body) = match prepare(req, Kind::Stream) {
                        Ok(x) => x,
                        Err(rejection) => return *rejection,
                    };
                    let codec = ctx.codec;
                    let timeout = ctx.timeout;
                    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
                    let encoding = content_encoding(&ctx.headers, "connect-content-encoding");
                    let start = async move {
                        let mut messages = decode_stream::<Req>(body, codec, limit, encoding);
                        let first = match messages.next().await {
                            Some(m) => m?,
                            None => {
                                return Err(ConnectError::invalid_argument(
                                    "missing request message",
                                ));
                            }
                        };
                        if messages.next().await.is_some() {
                            return Err(ConnectError::invalid_argument(
                                "server-streaming call got more than one request message",
                            ));
                        }
                        f(ctx, first).await
                    };
                    let stream = match with_deadline(timeout, start).await {
                        Ok(s) => s,
                        Err(e) => return stream_error(codec, &e),
                    };
                    let stream = match deadline {
                        Some(d) => bounded(stream, d),
                        None => stream,
                    };
                    stream_response(codec, stream)
                })
            }),
        )
    }

    /// A client-streaming procedure: a stream in, one message out.
    pub fn client_stream<Req, Resp, F, Fut>(self, path: &'static str, f: F) -> Self
    where
        Req: Message,
        Resp: Message,
        F: Fn(RequestContext, BoxStream<Req>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, ConnectError>> + Send + 'static,
    {
        let limit = self.max_message_bytes;
        self.add(
            path,
            Box::new(move |req| {
                let f = f.clone();
                Box::pin(async move {
                    let (ctx, body) = match prepare(req, Kind::Stream) {
                        Ok(x) => x,
                        Err(rejection) => return *rejection,
                    };
                    let codec = ctx.codec;
                    let timeout = ctx.timeout;
                    let encoding = content_encoding(&ctx.headers, "connect-content-encoding");
                    let messages = decode_stream::<Req>(body, codec, limit, encoding);
                    let result = with_deadline(timeout, f(ctx, messages)).await;
                    let stream: BoxStream<Resp> =
                        futures::stream::once(async move { result }).boxed();
                    stream_response(codec, stream)
                })
            }),
        )
    }

    /// The axum router serving every procedure added so far. Unknown procedures get 404.
    pub fn into_router(self) -> axum::Router {
        self.router
    }
}

/// Checks method and content type; splits the request into context and body.
fn prepare(req: Request, kind: Kind) -> Result<(RequestContext, Body), Box<Response>> {
    let (parts, body) = req.into_parts();
    if parts.method != Method::POST {
        return Err(Box::new(
            (
                StatusCode::METHOD_NOT_ALLOWED,
                [(header::ALLOW, HeaderValue::from_static("POST"))],
            )
                .into_response(),
        ));
    }
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let codec = match (kind, content_type.as_str()) {
        (Kind::Unary, "application/json") => Codec::Json,
        (Kind::Unary, "application/proto") => Codec::Proto,
        (Kind::Stream, "application/connect+json") => Codec::Json,
        (Kind::Stream, "application/connect+proto") => Codec::Proto,
        _ => {
            let accept = match kind {
                Kind::Unary => "application/json, application/proto",
                Kind::Stream => "application/connect+json, application/connect+proto",
            };
            return Err(Box::new(
                (
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    [(
                        http::HeaderName::from_static("accept-post"),
                        HeaderValue::from_static(accept),
                    )],
                )
                    .into_response(),
            ));
        }
    };
    let timeout = match parts.headers.get(crate::TIMEOUT_HEADER) {
        None => None,
        Some(v) => {
            let parsed = v
                .to_str()
                .ok()
                .filter(|s| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok());
            match parsed {
                // Zero means "no deadline", as the SDKs send it for `timeout=0`.
                Some(0) => None,
                Some(ms) => Some(Duration::from_millis(ms)),
                None => {
                    let e = ConnectError::invalid_argument("invalid Connect-Timeout-Ms header");
                    return Err(Box::new(match kind {
                        Kind::Unary => unary_error(&e),
                        Kind::Stream => stream_error(codec, &e),
                    }));
                }
            }
        }
    };
    let ctx = RequestContext {
        headers: parts.headers,
        extensions: parts.extensions,
        timeout,
        codec,
    };
    Ok((ctx, body))
}

fn content_encoding(headers: &HeaderMap, name: impl http::header::AsHeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty() && s != "identity")
}

fn decompress(encoding: Option<&str>, bytes: Bytes) -> Result<Bytes, ConnectError> {
    match encoding {
        None => Ok(bytes),
        Some("gzip") => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_end(&mut out)
                .map_err(|e| {
                    ConnectError::invalid_argument(format!("decompress gzip message: {e}"))
                })?;
            Ok(out.into())
        }
        Some(other) => Err(ConnectError::unimplemented(format!(
            "unknown compression \"{other}\": supported encodings are gzip, identity"
        ))),
    }
}

fn too_large(size: usize, limit: usize) -> ConnectError {
    ConnectError::resource_exhausted(format!(
        "message size {size} is larger than configured max {limit}"
    ))
}

async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ConnectError> {
    let mut data = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = data.next().await {
        let chunk = chunk
            .map_err(|e| ConnectError::new(Code::Canceled, format!("read request body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large(buf.len() + chunk.len(), limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Decodes a body of envelopes into messages, lazily, as the client sends them.
fn decode_stream<T: Message>(
    body: Body,
    codec: Codec,
    limit: usize,
    encoding: Option<String>,
) -> BoxStream<T> {
    struct State {
        data: axum::body::BodyDataStream,
        decoder: Decoder,
        done: bool,
    }
    let state = State {
        data: body.into_data_stream(),
        decoder: Decoder::new(limit),
        done: false,
    };
    futures::stream::unfold(state, move |mut st| {
        let encoding = encoding.clone();
        async move {
            if st.done {
                return None;
            }
            loop {
                match st.decoder.next_envelope() {
                    Err(e) => {
                        st.done = true;
                        let err = match e {
                            envelope::EnvelopeError::TooLarge { size, limit } => {
                                too_large(size, limit)
                            }
                            other => ConnectError::invalid_argument(other.to_string()),
                        };
                        return Some((Err(err), st));
                    }
                    Ok(Some(env)) => {
                        if env.flags & FLAG_END_STREAM != 0 {
                            // Clients do not send end-stream messages; treat one as the end.
                            return None;
                        }
                        let payload = if env.flags & FLAG_COMPRESSED != 0 {
                            match decompress(encoding.as_deref().or(Some("gzip")), env.payload) {
                                Ok(p) => p,
                                Err(e) => {
                                    st.done = true;
                                    return Some((Err(e), st));
                                }
                            }
                        } else {
                            env.payload
                        };
                        let msg = codec.decode::<T>(&payload);
                        if msg.is_err() {
                            st.done = true;
                        }
                        return Some((msg, st));
                    }
                    Ok(None) => {}
                }
                match st.data.next().await {
                    Some(Ok(chunk)) => st.decoder.push(&chunk),
                    Some(Err(e)) => {
                        st.done = true;
                        return Some((
                            Err(ConnectError::new(
                                Code::Canceled,
                                format!("read request body: {e}"),
                            )),
                            st,
                        ));
                    }
                    None => {
                        st.done = true;
                        return match st.decoder.finish() {
                            Ok(()) => None,
                            Err(e) => {
                                Some((Err(ConnectError::invalid_argument(e.to_string())), st))
                            }
                        };
                    }
                }
            }
        }
    })
    .boxed()
}

async fn with_deadline<T>(
    timeout: Option<Duration>,
    fut: impl Future<Output = Result<T, ConnectError>>,
) -> Result<T, ConnectError> {
    match timeout {
        None => fut.await,
        Some(t) => tokio::time::timeout(t, fut)
            .await
            .unwrap_or_else(|_| Err(ConnectError::deadline_exceeded("the operation timed out"))),
    }
}

/// Ends `stream` with `deadline_exceeded` once `deadline` passes.
fn bounded<T: Send + 'static>(
    stream: BoxStream<T>,
    deadline: tokio::time::Instant,
) -> BoxStream<T> {
    futures::stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(item)) => Some((item, Some(stream))),
            Ok(None) => None,
            Err(_) => Some((
                Err(ConnectError::deadline_exceeded("the operation timed out")),
                None,
            )),
        }
    })
    .boxed()
}

fn unary_ok<T: Message>(codec: Codec, msg: &T) -> Response {
    let content_type = match codec {
        Codec::Json => "application/json",
        Codec::Proto => "application/proto",
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, content_type)],
        codec.encode(msg),
    )
        .into_response()
}

fn unary_error(e: &ConnectError) -> Response {
    (
        e.code.http_status(),
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(&e.to_json()).expect("error JSON serializes"),
    )
        .into_response()
}

/// A 200 response of envelopes: each message, then the end-of-stream message.
///
/// An error item ends the stream and goes into the end-of-stream message.
fn stream_response<T: Message>(codec: Codec, stream: BoxStream<T>) -> Response {
    let content_type = stream_content_type(codec);
    let frames =
        futures::stream::unfold((Some(stream), false), move |(stream, ended)| async move {
            if ended {
                return None;
            }
            let mut stream = stream?;
            let (frame, next) = match stream.next().await {
                Some(Ok(msg)) => (
                    envelope::encode(0, &codec.encode(&msg)),
                    (Some(stream), false),
                ),
                Some(Err(e)) => (end_stream(Some(&e)), (None, true)),
                None => (end_stream(None), (None, true)),
            };
            Some((Ok::<_, std::convert::Infallible>(frame), next))
        });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from_stream(frames))
        .expect("static response parts are valid")
}

/// A stream response that carries only an end-of-stream error (Connect sends errors raised
/// before the first message this way too).
fn stream_error(codec: Codec, e: &ConnectError) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, stream_content_type(codec))
        .body(Body::from(end_stream(Some(e))))
        .expect("static response parts are valid")
}

fn stream_content_type(codec: Codec) -> &'static str {
    match codec {
        Codec::Json => "application/connect+json",
        Codec::Proto => "application/connect+proto",
    }
}

fn end_stream(error: Option<&ConnectError>) -> Bytes {
    let body = match error {
        Some(e) => serde_json::json!({ "error": e.to_json() }),
        None => serde_json::json!({}),
    };
    envelope::encode(
        FLAG_END_STREAM,
        &serde_json::to_vec(&body).expect("end-stream JSON serializes"),
    )
}

#[cfg(test)]
mod tests;
