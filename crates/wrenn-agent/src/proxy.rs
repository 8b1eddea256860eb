//! The agent's traffic proxy: forwards SDK traffic from the edge proxy into sandboxes.
//!
//! Each request names its sandbox and guest port in the `E2b-Sandbox-Id` and
//! `E2b-Sandbox-Port` headers (port default envd's, `wrenn_image::ENVD_PORT`). They are read per request, not per
//! connection, because the edge proxy and the SDKs share connections between sandboxes. The
//! request goes to the guest's `169.254.0.21:<port>`, which the host reaches at the slot's
//! guest endpoint; bodies stream both ways and upgrades (WebSocket) are spliced through.
//!
//! Error bodies follow E2B's proxy, whose messages the SDKs read: "was not found" means the
//! sandbox is not running, "port is not open" that nothing listens on the port.
//!
//! Every forwarded exchange lasts only as long as the sandbox's run: when it is killed or
//! paused, its [`Route::ends`] token fires and every stream into it ends at once (a request
//! still waiting answers "was not found"; a streaming body is cut, which the SDKs turn into
//! "the sandbox was killed" after checking it is gone). The guest itself would never close them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;
use wrenn_http::forward::{self, ForwardError, HttpClient};
// envd's port is the default when a request names none.
use wrenn_image::ENVD_PORT;

const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";
/// The guest is on this host: a port that does not accept within this time is as good as closed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a request goes, and until when.
#[derive(Debug, Clone)]
pub struct Route {
    /// Where the host reaches the guest's port.
    pub addr: SocketAddr,
    /// Fires when this run of the sandbox ends (paused, killed).
    pub ends: CancellationToken,
}

/// Where the proxy finds sandboxes.
pub trait Resolve: Send + Sync {
    /// The route to `port` of running sandbox `sandbox_id` (`None`: no such running sandbox).
    fn resolve(&self, sandbox_id: &str, port: u16) -> Option<Route>;
}

impl Resolve for crate::agent::Agent {
    fn resolve(&self, sandbox_id: &str, port: u16) -> Option<Route> {
        self.guest_endpoint(sandbox_id, port)
            .map(|(addr, ends)| Route { addr, ends })
    }
}

/// A connection pool per run of a sandbox (its ID, guest address and run token). Slots are
/// reused: one shared pool would hand a new sandbox the idle connections of a killed one at the
/// same address, which the new guest resets (the first request fails); and a resumed sandbox
/// is a new run whose guest never saw the old run's connections. So a pool serves one run
/// only, and pools of ended runs are dropped.
#[derive(Default)]
struct Clients {
    pools: std::sync::Mutex<HashMap<(String, SocketAddr), (HttpClient, CancellationToken)>>,
}

impl Clients {
    fn get(&self, id: &str, route: &Route) -> HttpClient {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let key = (id.to_owned(), route.addr);
        if let Some((c, run)) = pools.get(&key)
            && !run.is_cancelled()
        {
            return c.clone();
        }
        // A new sandbox, slot or run: the moment to forget pools of ended runs.
        pools.retain(|_, (_, run)| !run.is_cancelled());
        let c = forward::client(CONNECT_TIMEOUT);
        pools.insert(key, (c.clone(), route.ends.clone()));
        c
    }
}

#[derive(Clone)]
struct Proxy {
    resolve: Arc<dyn Resolve>,
    clients: Arc<Clients>,
}

/// The proxy as an app: every request, whatever its method and path, goes to a sandbox.
pub fn router(resolve: Arc<dyn Resolve>) -> axum::Router {
    let proxy = Proxy {
        resolve,
        clients: Arc::default(),
    };
    axum::Router::new().fallback(handle).with_state(proxy)
}

async fn handle(State(proxy): State<Proxy>, mut req: Request) -> Response {
    let (id, port) = match route(req.headers()) {
        Ok(r) => r,
        Err(message) => return bad_request(message),
    };
    let Some(route) = proxy.resolve.resolve(&id, port) else {
        return not_found(&id);
    };
    let client = proxy.clients.get(&id, &route);
    let Route { addr, ends } = route;
    // The routing headers are for proxies; the guest's servers do not need them.
    req.headers_mut().remove(SANDBOX_ID_HEADER);
    req.headers_mut().remove(SANDBOX_PORT_HEADER);
    match forward::forward_until(&client, &format!("http://{addr}"), req, ends).await {
        Ok(resp) => resp,
        Err(e) => {
            // A closed port is the client's business (SDKs poll ports), and so is a sandbox
            // paused or killed meanwhile; anything else is ours.
            if matches!(
                e,
                ForwardError::Refused(_) | ForwardError::Connect(_) | ForwardError::Stopped
            ) {
                tracing::debug!(sandbox_id = %id, port, error = %e, "not forwarded into the sandbox");
            } else {
                tracing::warn!(sandbox_id = %id, port, error = %crate::error_chain(&e), "forwarding into the sandbox failed");
            }
            let message = match e {
                ForwardError::Refused(_) => {
                    "The sandbox is running but port is not open".to_owned()
                }
                ForwardError::Connect(_) => format!(
                    "The sandbox is running but port is not open (no answer on port {port} within {}s)",
                    CONNECT_TIMEOUT.as_secs()
                ),
                ForwardError::Failed(_) => {
                    format!(
                        "The sandbox {id} closed the connection on port {port} without answering"
                    )
                }
                ForwardError::NotUpgradable => {
                    "Upgrade is not possible on this connection".to_owned()
                }
                ForwardError::BadTarget(_) => format!("Bad guest address {addr}"),
                // Paused or killed while the request waited for its answer.
                ForwardError::Stopped => return not_found(&id),
            };
            bad_gateway(&id, Some(port), message)
        }
    }
}

/// The sandbox and port a request is for, or why it names none.
fn route(headers: &HeaderMap) -> Result<(String, u16), &'static str> {
    let id = headers
        .get(SANDBOX_ID_HEADER)
        .ok_or("Missing header E2b-Sandbox-Id")?
        .to_str()
        .map_err(|_| "Invalid sandbox ID")?
        .trim();
    if id.is_empty() {
        return Err("Invalid sandbox ID");
    }
    let port = match headers.get(SANDBOX_PORT_HEADER) {
        None => ENVD_PORT,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .filter(|&p| p != 0)
            .ok_or("Invalid sandbox port")?,
    };
    Ok((id.to_owned(), port))
}

/// The answer for a sandbox that is not running (the SDKs look for "was not found").
fn not_found(id: &str) -> Response {
    bad_gateway(id, None, format!("The sandbox {id} was not found"))
}

fn bad_request(message: &str) -> Response {
    let body = serde_json::json!({"code": 400, "message": message});
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

fn bad_gateway(id: &str, port: Option<u16>, message: String) -> Response {
    let mut body = serde_json::json!({"code": 502, "message": message, "sandboxId": id});
    if let Some(port) = port {
        body["port"] = port.into();
    }
    (StatusCode::BAD_GATEWAY, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn routing_headers() {
        assert_eq!(
            route(&headers(&[("e2b-sandbox-id", "abc")])),
            Ok(("abc".to_owned(), ENVD_PORT))
        );
        assert_eq!(
            route(&headers(&[
                ("e2b-sandbox-id", " abc "),
                ("e2b-sandbox-port", "49999")
            ])),
            Ok(("abc".to_owned(), 49999))
        );
        assert!(route(&headers(&[])).is_err());
        assert!(route(&headers(&[("e2b-sandbox-id", "")])).is_err());
        for bad in ["x", "0", "70000", ""] {
            assert!(
                route(&headers(&[
                    ("e2b-sandbox-id", "a"),
                    ("e2b-sandbox-port", bad)
                ]))
                .is_err(),
                "{bad}"
            );
        }
    }
}
