//! The edge proxy: routes SDK traffic for sandboxes to the proxy of the host agent that runs
//! them, per request (the SDKs share one connection between sandboxes).
//!
//! A request is for a sandbox when it names one: an `E2b-Sandbox-Id` header (port from
//! `E2b-Sandbox-Port`, default envd's 49983) or a host name `<port>-<sandboxID>.<domain>`
//! (`<domain>` may carry a port, as `localhost:3000` does; ports are not compared). A signed
//! `/files` URL that names its sandbox so goes there and envd checks the signature: a URL
//! signed for sandbox A is refused by B. The SDKs name the sandbox in the host of the signed
//! URLs they make (`49983-<id>.<domain>`) unless one `E2B_SANDBOX_URL` serves every sandbox;
//! only such a nameless signed URL (a `signature=` query on `/files` and nothing else) is
//! matched against the running sandboxes' tokens. Bodies stream both ways; WebSocket (and any
//! HTTP/1.1) upgrades are spliced through. The agent proxy gets the same routing headers, so
//! it needs no state from us; its own secret rides in `Proxy-Authorization`.
//!
//! A paused sandbox is not found (502 "was not found": the SDKs' "not running"), unless it was
//! created with auto-resume: then the request resumes it and is forwarded once it runs (see
//! `lifecycle`).
//!
//! A sandbox created with `network.allowPublicTraffic: false` answers on its ports only
//! requests carrying its traffic access token in `E2b-Traffic-Access-Token` (403 otherwise).
//! envd's port is exempt: envd checks its own access token on every request, and the SDKs do
//! not send the traffic token to envd. The header is removed before the request goes on.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::{HeaderName, HeaderValue, StatusCode, header};
use wrenn_core::SandboxState;
use wrenn_http::forward::{self, ForwardError, HttpClient};

use crate::error::Chain;
use crate::service::ControlPlane;
use crate::store::{HostRecord, SandboxRecord};
use crate::tokens;

/// envd's port, used when a request names a sandbox but no port.
pub(crate) const ENVD_PORT: u16 = 49983;
const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";
/// What the SDKs (and their users) send a sandbox's traffic access token in.
const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";
/// Agents are on a local network: one that does not accept within this time is down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a request names its sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    Sandbox { id: String, port: u16 },
    Signed,
}

/// Whether this request goes to a sandbox (the demux rule of the single-port setup), and how.
pub(crate) fn classify(req: &Request, domain: Option<&str>) -> Option<Route> {
    let headers = req.headers();
    if let Some(id) = headers.get(SANDBOX_ID_HEADER).and_then(|v| v.to_str().ok()) {
        let port = headers
            .get(SANDBOX_PORT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(ENVD_PORT);
        return Some(Route::Sandbox {
            id: id.trim().to_owned(),
            port,
        });
    }
    if let Some(domain) = domain {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("");
        if let Some(route) = host_route(host, domain) {
            return Some(route);
        }
    }
    let query = req.uri().query().unwrap_or("");
    if req.uri().path() == "/files"
        && form_urlencoded::parse(query.as_bytes()).any(|(k, _)| k == "signature")
    {
        return Some(Route::Signed);
    }
    None
}

/// The sandbox a host name `<port>-<id>.<domain>[:<port>]` names. Host names are compared
/// without case and without their ports (a `domain` such as `localhost:3000` keeps its port
/// for the SDKs' `get_host`; the request came to this server whatever port it names).
fn host_route(host: &str, domain: &str) -> Option<Route> {
    let without_port = |h: &str| -> String {
        h.rsplit_once(':')
            .filter(|(_, p)| p.parse::<u16>().is_ok())
            .map_or(h, |(h, _)| h)
            .trim_end_matches('.')
            .to_ascii_lowercase()
    };
    let (host, domain) = (without_port(host), without_port(domain));
    let label = host.strip_suffix(&domain)?.strip_suffix('.')?;
    let (port, id) = label.split_once('-')?;
    let port = port.parse().ok().filter(|&p: &u16| p != 0)?;
    (!id.is_empty() && !id.contains('.')).then(|| Route::Sandbox {
        id: id.to_owned(),
        port,
    })
}

/// Forwards requests to agent proxies.
#[derive(Clone)]
pub(crate) struct Proxy {
    client: HttpClient,
}

impl Proxy {
    pub(crate) fn new() -> Self {
        Proxy {
            client: forward::client(CONNECT_TIMEOUT),
        }
    }

    pub(crate) async fn handle(
        &self,
        cp: Arc<ControlPlane>,
        route: Route,
        req: Request,
    ) -> Response {
        let (id, port) = match route {
            Route::Sandbox { id, port } => (id, port),
            Route::Signed => {
                match signed_sandbox(&cp, req.method().clone(), req.uri().clone()).await {
                    Ok(Some(id)) => (id, ENVD_PORT),
                    // No running sandbox's token made this signature: forged, altered, or
                    // for another path, user or operation. envd would answer the same.
                    Ok(None) => return invalid_signature(),
                    Err(resp) => return resp,
                }
            }
        };
        let rec = match cp.proxied(&id).await {
            Ok(Some(rec)) => rec,
            Ok(None) => return not_found(&id),
            Err(e) => {
                tracing::error!(sandbox_id = %id, error = %Chain(&e), "proxy lookup failed");
                return lookup_failed(&id);
            }
        };
        let mut req = req;
        // For us, not for the sandbox's servers.
        let given = req.headers_mut().remove(TRAFFIC_TOKEN_HEADER);
        // Checked before a paused sandbox is woken: nobody without the token may resume it.
        if port != ENVD_PORT
            && let Some(want) = cp.traffic_token(&rec)
            && !given.is_some_and(|g| tokens::constant_time_eq(g.as_bytes(), want.as_bytes()))
        {
            return forbidden(&id, port);
        }
        let (rec, host) = match destination(&cp, rec).await {
            Ok(x) => x,
            Err(resp) => return resp,
        };
        let secret = cp.agent_secret(&host.id);
        self.forward(rec.id.as_str(), port, &host.proxy_url, &secret, req)
            .await
    }

    async fn forward(
        &self,
        id: &str,
        port: u16,
        base: &str,
        secret: &str,
        mut req: Request,
    ) -> Response {
        // The agent proxy routes by the same headers, so it needs no state from us.
        let Ok(id_value) = HeaderValue::from_str(id) else {
            return not_found(id);
        };
        let Ok(bearer) = HeaderValue::from_str(&format!("Bearer {secret}")) else {
            return bad_gateway(id, format!("Bad agent secret for sandbox {id}"));
        };
        let headers = req.headers_mut();
        // Ours for the agent (a client's own is for nobody behind us).
        headers.insert(header::PROXY_AUTHORIZATION, bearer);
        headers.insert(HeaderName::from_static(SANDBOX_ID_HEADER), id_value);
        headers.insert(
            HeaderName::from_static(SANDBOX_PORT_HEADER),
            HeaderValue::from(port),
        );
        match forward::forward(&self.client, base, req).await {
            Ok(resp) => resp,
            Err(ForwardError::BadTarget(_)) => {
                bad_gateway(id, format!("Bad proxy address for sandbox {id}"))
            }
            Err(ForwardError::NotUpgradable) => {
                bad_gateway(id, "Upgrade is not possible on this connection".to_owned())
            }
            Err(e) => {
                tracing::warn!(sandbox_id = %id, error = %Chain(&e), "host proxy unreachable");
                bad_gateway(id, format!("The host of sandbox {id} is unreachable"))
            }
        }
    }
}

/// Where traffic for `rec` goes: its running record and its host, once a sandbox that is not
/// running (paused, with auto-resume) has been resumed.
async fn destination(
    cp: &Arc<ControlPlane>,
    rec: SandboxRecord,
) -> Result<(SandboxRecord, HostRecord), Response> {
    let id = rec.id.to_string();
    let rec = if rec.state == SandboxState::Running {
        rec
    } else {
        match cp.wake(&rec).await {
            Ok(Some(rec)) => rec,
            Ok(None) => return Err(not_found(&id)),
            // Logged where it failed. Not "was not found": the sandbox is there, paused.
            Err(e) => {
                return Err(bad_gateway(
                    &id,
                    format!("The sandbox {id} could not be resumed: {e}"),
                ));
            }
        }
    };
    match cp.traffic_host(&rec).await {
        Ok(Some(host)) => Ok((rec, host)),
        Ok(None) => Err(not_found(&id)),
        Err(e) => {
            tracing::error!(sandbox_id = %id, error = %Chain(&e), "proxy lookup failed");
            Err(lookup_failed(&id))
        }
    }
}

fn lookup_failed(id: &str) -> Response {
    bad_gateway(id, "Internal error while looking up the sandbox".to_owned())
}

/// The sandbox a signed `/files` URL belongs to (`Err` for a malformed one).
async fn signed_sandbox(
    cp: &ControlPlane,
    method: http::Method,
    uri: http::Uri,
) -> Result<Option<String>, Response> {
    let query = uri.query().unwrap_or("");
    let (mut path, mut username, mut signature, mut expiration) = (None, String::new(), None, None);
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "path" => path = Some(v.into_owned()),
            "username" => username = v.into_owned(),
            // Base64 has no spaces: a space is a `+` that the client did not percent-encode.
            "signature" => signature = Some(v.replace(' ', "+")),
            "signature_expiration" => expiration = v.parse::<i64>().ok(),
            _ => {}
        }
    }
    let operation = match method {
        http::Method::GET | http::Method::HEAD => "read",
        http::Method::POST | http::Method::PUT => "write",
        _ => return Ok(None),
    };
    let (Some(path), Some(signature)) = (path, signature) else {
        return Ok(None);
    };
    match cp
        .find_by_signature(&path, operation, &username, &signature, expiration)
        .await
    {
        Ok(found) => Ok(found.map(|s| s.id.to_string())),
        Err(e) => {
            tracing::error!(error = %Chain(&e), "signed URL lookup failed");
            Err(bad_gateway(
                "",
                "Internal error while looking up the sandbox".to_owned(),
            ))
        }
    }
}

/// A request without the traffic access token to a port of a sandbox whose ports are not
/// public.
fn forbidden(id: &str, port: u16) -> Response {
    let body = serde_json::json!({
        "code": 403,
        "message": format!(
            "Port {port} of sandbox {id} is not public: send its traffic access token in the E2b-Traffic-Access-Token header"
        ),
        "sandboxId": id,
    });
    (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
}

fn invalid_signature() -> Response {
    let body = serde_json::json!({"code": 401, "message": "Invalid signature"});
    (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
}

/// The SDKs read "was not found" in a 502 as "the sandbox is not running".
fn not_found(id: &str) -> Response {
    let message = if id.is_empty() {
        "The sandbox was not found".to_owned()
    } else {
        format!("The sandbox {id} was not found")
    };
    bad_gateway(id, message)
}

fn bad_gateway(id: &str, message: String) -> Response {
    let body = serde_json::json!({"code": 502, "message": message, "sandboxId": id});
    (StatusCode::BAD_GATEWAY, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn demux_rule() {
        let sbx = |id: &str, port| {
            Some(Route::Sandbox {
                id: id.into(),
                port,
            })
        };
        let d = Some("wrenn.test");
        assert_eq!(
            classify(&req("/health", &[("e2b-sandbox-id", "abc")]), d),
            sbx("abc", ENVD_PORT)
        );
        assert_eq!(
            classify(
                &req(
                    "/x",
                    &[("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "49999")]
                ),
                d
            ),
            sbx("abc", 49999)
        );
        assert_eq!(
            classify(&req("/", &[("host", "8080-abc.wrenn.test")]), d),
            sbx("abc", 8080)
        );
        assert_eq!(
            classify(&req("/", &[("host", "8080-abc.wrenn.test:3000")]), d),
            sbx("abc", 8080)
        );
        assert_eq!(
            classify(&req("/", &[("host", "8080-abc.other.test")]), d),
            None
        );
        // A domain with a port (`wrenn up` on loopback: `localhost:<api port>`).
        let local = Some("localhost:3000");
        for host in [
            "8080-abc.localhost:3000",
            "8080-abc.LocalHost",
            "8080-abc.localhost:9",
        ] {
            assert_eq!(
                classify(&req("/", &[("host", host)]), local),
                sbx("abc", 8080),
                "{host}"
            );
        }
        for host in [
            "localhost:3000",
            "abc.localhost:3000",
            "0-abc.localhost:3000",
            "8080-.localhost:3000",
            "8080-a.b.localhost:3000",
            "x8080-abc.localhost",
        ] {
            assert_eq!(
                classify(&req("/", &[("host", host)]), local),
                None,
                "{host}"
            );
        }
        // A signed URL that names its sandbox goes there (envd checks the signature); only a
        // nameless one is matched by signature.
        assert_eq!(
            classify(
                &req(
                    "/files?path=/a&signature=v1_x",
                    &[("host", "49983-b.localhost:3000")]
                ),
                local
            ),
            sbx("b", ENVD_PORT)
        );
        assert_eq!(
            classify(
                &req("/files?path=/a&signature=v1_x", &[("e2b-sandbox-id", "b")]),
                local
            ),
            sbx("b", ENVD_PORT)
        );
        assert_eq!(
            classify(
                &req(
                    "/files?path=/a&signature=v1_x",
                    &[("host", "localhost:3000")]
                ),
                local
            ),
            Some(Route::Signed)
        );
        assert_eq!(classify(&req("/", &[("host", "api.wrenn.test")]), d), None);
        assert_eq!(
            classify(&req("/", &[("host", "8080-abc.wrenn.test")]), None),
            None
        );
        assert_eq!(
            classify(&req("/files?path=/a&signature=v1_x", &[]), d),
            Some(Route::Signed)
        );
        assert_eq!(classify(&req("/files?path=/a", &[]), d), None);
        assert_eq!(classify(&req("/health", &[]), d), None);
        assert_eq!(classify(&req("/v2/sandboxes", &[]), d), None);
    }
}
