//! The agent's one listener: requests naming a sandbox (`E2b-Sandbox-Id`) go to the traffic
//! proxy ([`crate::proxy`]), everything else to the RPC ([`crate::rpc`]); and who may use it.
//!
//! - On a Unix socket ([`bind_unix`], [`serve_unix`]) the file system decides: the socket has
//!   mode 0600 in a directory of mode 0700, both the agent's (root's), so no other user of the
//!   host can even connect. That is how `wrenn up` runs its agent, and no secret is asked for.
//! - Over TCP ([`serve_tcp`], for an agent on another machine than its control plane) every
//!   request must carry the host's [`AgentSecret`]: RPC calls as `Authorization: Bearer
//!   <secret>`, proxied sandbox traffic as `Proxy-Authorization: Bearer <secret>` (its
//!   `Authorization` header is the SDK's, envd's user, and must reach the guest unchanged).
//!   Missing or wrong: 401 with a JSON body that says which; compared in constant time.
//!
//! `Proxy-Authorization` is removed from proxied requests whichever way they came: a secret
//! never reaches a guest. The API makes a TCP listener without a secret impossible.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;

/// A client must send its request headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection with no request in flight for this long is closed (the control plane's pools
/// close theirs after 60 and 90 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(330);
const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";

/// The secret a network-reachable agent requires of its control plane. Never printed.
#[derive(Clone)]
pub struct AgentSecret(String);

impl AgentSecret {
    /// A secret; `None` for an empty one (it would let anyone in).
    pub fn new(secret: impl Into<String>) -> Option<Self> {
        let s: String = secret.into();
        let s = s.trim().to_owned();
        (!s.is_empty()).then_some(Self(s))
    }

    /// The header value that carries it: `Bearer <secret>`.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether a header value is `Bearer <this secret>`, in time independent of where it
    /// differs (both sides hashed first, so not even the length shows).
    fn admits(&self, value: Option<&HeaderValue>) -> Result<(), &'static str> {
        let Some(value) = value else {
            return Err("missing");
        };
        let given = value.as_bytes();
        let token = match given.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => &given[7..],
            _ => return Err("not a Bearer credential"),
        };
        let (a, b) = (Sha256::digest(token), Sha256::digest(self.0.as_bytes()));
        let diff = a
            .iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| std::hint::black_box(acc | (x ^ y)));
        if diff == 0 { Ok(()) } else { Err("wrong") }
    }
}

impl std::fmt::Debug for AgentSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentSecret(***)")
    }
}

/// The agent's app: the proxy for requests naming a sandbox, the RPC for the rest, each
/// behind `secret` when one is given.
pub fn app(agent: Arc<Agent>, secret: Option<AgentSecret>) -> axum::Router {
    split(
        crate::rpc::router(agent.clone()),
        crate::proxy::router(agent),
        secret,
    )
}

/// Dispatches between `rpc` and `proxy` and checks `secret` (the app without an agent, for
/// tests).
fn split(rpc: axum::Router, proxy: axum::Router, secret: Option<AgentSecret>) -> axum::Router {
    use tower::ServiceExt as _;
    axum::Router::new().fallback(move |mut req: Request| {
        let (rpc, proxy, secret) = (rpc.clone(), proxy.clone(), secret.clone());
        async move {
            let to_proxy = req.headers().contains_key(SANDBOX_ID_HEADER);
            let given = req.headers_mut().remove(header::PROXY_AUTHORIZATION);
            if let Some(secret) = &secret {
                let checked = if to_proxy {
                    secret.admits(given.as_ref())
                } else {
                    secret.admits(req.headers().get(header::AUTHORIZATION))
                };
                if let Err(why) = checked {
                    return unauthorized(to_proxy, why);
                }
                if !to_proxy {
                    req.headers_mut().remove(header::AUTHORIZATION);
                }
            }
            let svc = if to_proxy { proxy } else { rpc };
            svc.oneshot(req).await.unwrap_or_else(|e| match e {})
        }
    })
}

/// 401 in the form the caller reads: a Connect error for the RPC, E2B's proxy JSON for
/// sandbox traffic.
fn unauthorized(to_proxy: bool, why: &str) -> Response {
    let (header_name, body) = if to_proxy {
        let message = format!(
            "This agent requires its secret for sandbox traffic (Proxy-Authorization: Bearer <secret>): {why}"
        );
        (
            "Proxy-Authorization",
            serde_json::json!({"code": 401, "message": message}),
        )
    } else {
        let message =
            format!("This agent requires its secret (Authorization: Bearer <secret>): {why}");
        (
            "Authorization",
            serde_json::json!({"code": "unauthenticated", "message": message}),
        )
    };
    tracing::warn!(
        header = header_name,
        why,
        "refused a request without the agent secret"
    );
    let mut resp = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"wrenn-agent\""),
    );
    resp
}

/// Binds the agent's Unix socket at `path`: its directory is created (or narrowed) to mode
/// 0700, a stale socket from an earlier run is removed (anything else there is an error), and
/// the socket gets mode 0600.
pub fn bind_unix(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("socket path has no directory"))?;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // The directory already shuts everyone else out while the mode is set.
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the agent on its Unix socket until `shutdown` fires (access: the socket's mode).
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    agent: Arc<Agent>,
    shutdown: CancellationToken,
) {
    let app = app(agent, None);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "agent socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        tokio::spawn(serve_one(app.clone(), stream, "unix", shutdown.clone()));
    }
}

/// Serves the agent over TCP until `shutdown` fires; every request needs `secret`.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    agent: Arc<Agent>,
    secret: AgentSecret,
    shutdown: CancellationToken,
) {
    let app = app(agent, Some(secret));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "agent port: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_one(app.clone(), stream, peer, shutdown.clone()));
    }
}

async fn serve_one<S>(
    app: axum::Router,
    stream: S,
    peer: impl std::fmt::Display,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let opts = wrenn_http::ConnOptions {
        header_read_timeout: HEADER_READ_TIMEOUT,
        idle_timeout: IDLE_TIMEOUT,
    };
    wrenn_http::serve_connection(
        app,
        stream,
        peer,
        opts,
        wrenn_http::InFlight::default(),
        async move { shutdown.cancelled().await },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt as _;

    /// An app whose RPC and proxy echo what reached them.
    fn echo(secret: Option<AgentSecret>) -> axum::Router {
        let seen = |side: &'static str| {
            axum::Router::new().fallback(move |req: Request| async move {
                let h = req.headers();
                format!(
                    "{side} auth={:?} proxy-auth={:?}",
                    h.get(header::AUTHORIZATION),
                    h.get(header::PROXY_AUTHORIZATION)
                )
            })
        };
        split(seen("rpc"), seen("proxy"), secret)
    }

    async fn call(app: &axum::Router, headers: &[(&str, &str)]) -> (u16, String) {
        let mut b = axum::http::Request::post("/wrenn.agent.v1.AgentService/HostInfo");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = app
            .clone()
            .oneshot(b.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_secret_guards_rpc_and_proxy() {
        let app = echo(AgentSecret::new("s3cret"));
        let (s, body) = call(&app, &[]).await;
        assert_eq!(s, 401, "{body}");
        assert!(
            body.contains("unauthenticated") && body.contains("missing"),
            "{body}"
        );
        let (s, body) = call(&app, &[("authorization", "Bearer nope")]).await;
        assert_eq!((s, body.contains("wrong")), (401, true), "{body}");
        let (s, _) = call(&app, &[("authorization", "Basic czNjcmV0")]).await;
        assert_eq!(s, 401);
        let (s, body) = call(&app, &[("authorization", "bearer s3cret")]).await;
        assert_eq!(s, 200, "{body}");
        // The RPC never sees the secret.
        assert_eq!(body, "rpc auth=None proxy-auth=None");

        // Sandbox traffic: the secret rides in Proxy-Authorization; the client's
        // Authorization (envd's user) reaches the guest, the secret does not.
        let sbx = ("e2b-sandbox-id", "abc");
        let user = ("authorization", "Basic dXNlcjo=");
        let (s, body) = call(&app, &[sbx, user]).await;
        assert_eq!(s, 401, "{body}");
        assert!(
            body.contains("Proxy-Authorization") && body.contains("\"code\":401"),
            "{body}"
        );
        let (s, _) = call(&app, &[sbx, ("authorization", "Bearer s3cret")]).await;
        assert_eq!(s, 401, "the RPC's header must not open the proxy");
        let (s, _) = call(&app, &[sbx, user, ("proxy-authorization", "Bearer s3cre")]).await;
        assert_eq!(s, 401);
        let (s, body) = call(&app, &[sbx, user, ("proxy-authorization", "Bearer s3cret")]).await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body, "proxy auth=Some(\"Basic dXNlcjo=\") proxy-auth=None");
    }

    #[tokio::test]
    async fn without_a_secret_nothing_is_asked_and_nothing_leaks() {
        let app = echo(None);
        let (s, body) = call(&app, &[]).await;
        assert_eq!((s, body.as_str()), (200, "rpc auth=None proxy-auth=None"));
        let (s, body) = call(
            &app,
            &[
                ("e2b-sandbox-id", "abc"),
                ("proxy-authorization", "Bearer x"),
            ],
        )
        .await;
        assert_eq!((s, body.as_str()), (200, "proxy auth=None proxy-auth=None"));
    }

    #[test]
    fn empty_secrets_are_refused_and_never_printed() {
        assert!(AgentSecret::new("  ").is_none());
        let s = AgentSecret::new("abc").unwrap();
        assert_eq!(format!("{s:?}"), "AgentSecret(***)");
        assert_eq!(s.bearer(), "Bearer abc");
    }
}
