//! Access-token checks: every request needs `X-Access-Token` once a token is set, except the
//! endpoints that authenticate otherwise (`/health`, `/init`, signed `/files`).
//!
//! While no token is set every request passes, as upstream envd does: a sandbox only gets
//! a token through `/init`, and `/init` itself is guarded (see [`authorize_init`]).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::Method;
use sha2::{Digest, Sha256, Sha512};

use crate::error::EnvdError;
use crate::state::Envd;

pub(crate) const ACCESS_TOKEN_HEADER: &str = "x-access-token";

/// The message upstream envd answers for a missing or wrong token; SDKs show it as is.
const UNAUTHORIZED: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

pub async fn require_access_token(
    State(envd): State<Arc<Envd>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(token) = envd.access_token() else {
        return next.run(req).await;
    };
    let method = req.method();
    let path = req.uri().path();
    if (method == Method::GET && path == "/health") || (method == Method::POST && path == "/init") {
        return next.run(req).await;
    }
    let signable = path == "/files" && (method == Method::GET || method == Method::POST);
    let verdict = match req.headers().get(ACCESS_TOKEN_HEADER) {
        // A present header decides on its own: a wrong one fails even next to a valid signature.
        Some(given) => {
            if constant_time_eq(given.as_bytes(), token.as_bytes()) {
                Ok(())
            } else {
                Err(UNAUTHORIZED.to_owned())
            }
        }
        None if signable => check_signature(req.uri(), method, &token, unix_now()),
        None => Err(UNAUTHORIZED.to_owned()),
    };
    match verdict {
        Ok(()) => next.run(req).await,
        Err(message) => {
            tracing::debug!(%method, path, %message, "request refused");
            EnvdError::Unauthenticated(message).into_response()
        }
    }
}

/// Checks the `signature` (and `signature_expiration`) query of a `/files` request.
fn check_signature(uri: &http::Uri, method: &Method, token: &str, now: i64) -> Result<(), String> {
    let q = super::FilesQuery::parse(uri).map_err(|e| e.to_string())?;
    let Some(given) = q.signature.as_deref() else {
        return Err(UNAUTHORIZED.to_owned());
    };
    let expiration = match q.signature_expiration.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<i64>()
                .map_err(|_| "invalid signature expiration".to_owned())?,
        ),
    };
    let operation = if method == Method::GET {
        "read"
    } else {
        "write"
    };
    let expected = signature(
        q.path.as_deref().unwrap_or(""),
        operation,
        q.username.as_deref().unwrap_or(""),
        token,
        expiration,
    );
    if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        return Err("invalid signature".to_owned());
    }
    if expiration.is_some_and(|exp| exp < now) {
        return Err("signature is already expired".to_owned());
    }
    Ok(())
}

/// `v1_` + unpadded standard base64 of SHA-256 over `path:operation:username:token[:expiration]`,
/// exactly what the SDKs compute for `download_url`/`upload_url`.
pub(crate) fn signature(
    path: &str,
    operation: &str,
    username: &str,
    token: &str,
    expiration: Option<i64>,
) -> String {
    let mut text = format!("{path}:{operation}:{username}:{token}");
    if let Some(exp) = expiration {
        text.push_str(&format!(":{exp}"));
    }
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

/// Who may call `/init`. There is deliberately no "first caller claims the sandbox":
/// - the caller knows the current token, or
/// - the SHA-512 of the token it sends equals the hash the host published (metadata service or
///   `--access-token-hash`), or
/// - no token is set and no hash is configured at all. That is first setup (a template build,
///   a development run): before a sandbox is handed out only the host can reach envd, and a
///   host that wants even that window closed configures a hash.
///
/// Returns the reason for refusing.
pub(crate) fn authorize_init(
    current: Option<&str>,
    published_hash: Option<&str>,
    requested: Option<&str>,
) -> Result<(), &'static str> {
    if let (Some(cur), Some(req)) = (current, requested)
        && constant_time_eq(cur.as_bytes(), req.as_bytes())
    {
        return Ok(());
    }
    match published_hash {
        Some(hash) => {
            // A sandbox without a token publishes the hash of the empty string.
            let got = hex::encode(Sha512::digest(requested.unwrap_or("").as_bytes()));
            if constant_time_eq(got.as_bytes(), hash.trim().to_ascii_lowercase().as_bytes()) {
                Ok(())
            } else if requested.is_none_or(str::is_empty) {
                Err("an access token is required to initialize this sandbox")
            } else {
                Err("the access token does not match the published access token hash")
            }
        }
        None if current.is_none() => Ok(()),
        None => Err("the access token does not match the current access token"),
    }
}

/// Equality that takes the same time wherever the inputs differ. Both sides are hashed first so
/// neither the position of the first difference nor the secret's length shows in the timing.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    let diff = da
        .iter()
        .zip(db.iter())
        .fold(0u8, |acc, (x, y)| std::hint::black_box(acc | (x ^ y)));
    diff == 0
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(q: &str) -> http::Uri {
        format!("/files?{}", q.replace('+', "%2B")).parse().unwrap()
    }

    #[test]
    fn signatures_match_the_sdk_formula() {
        // sha256("a.txt:read:user:tok") in unpadded standard base64, as the JS SDK computes it.
        let text = "a.txt:read:user:tok";
        let want = format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD
                .encode(Sha256::digest(text))
                .trim_end_matches('=')
        );
        assert_eq!(signature("a.txt", "read", "user", "tok", None), want);
        assert!(signature("a", "write", "", "t", Some(5)).starts_with("v1_"));
        assert!(!signature("a", "write", "", "t", Some(5)).contains('='));
    }

    #[test]
    fn checks_signature_operation_and_expiry() {
        let s = signature("/x", "read", "", "tok", None);
        assert!(
            check_signature(
                &uri(&format!("path=/x&signature={s}")),
                &Method::GET,
                "tok",
                100
            )
            .is_ok()
        );
        // A read signature does not allow writes, nor another path, nor another token.
        assert!(
            check_signature(
                &uri(&format!("path=/x&signature={s}")),
                &Method::POST,
                "tok",
                100
            )
            .is_err()
        );
        assert!(
            check_signature(
                &uri(&format!("path=/y&signature={s}")),
                &Method::GET,
                "tok",
                100
            )
            .is_err()
        );
        assert!(
            check_signature(
                &uri(&format!("path=/x&signature={s}")),
                &Method::GET,
                "other",
                100
            )
            .is_err()
        );
        let e = signature("/x", "read", "", "tok", Some(50));
        let q = format!("path=/x&signature={e}&signature_expiration=50");
        assert!(check_signature(&uri(&q), &Method::GET, "tok", 50).is_ok());
        assert_eq!(
            check_signature(&uri(&q), &Method::GET, "tok", 51).unwrap_err(),
            "signature is already expired"
        );
        assert!(check_signature(&uri("path=/x"), &Method::GET, "tok", 0).is_err());
    }

    #[test]
    fn init_needs_proof() {
        let hash = hex::encode(Sha512::digest(b"new"));
        // First setup: nothing set, nothing published.
        assert!(authorize_init(None, None, Some("anything")).is_ok());
        assert!(authorize_init(None, None, None).is_ok());
        // A published hash closes the first-setup window.
        assert!(authorize_init(None, Some(&hash), Some("new")).is_ok());
        assert!(authorize_init(None, Some(&hash.to_uppercase()), Some("new")).is_ok());
        assert!(authorize_init(None, Some(&hash), Some("guess")).is_err());
        assert!(authorize_init(None, Some(&hash), None).is_err());
        // Knowing the current token is enough; not knowing it is not.
        assert!(authorize_init(Some("cur"), None, Some("cur")).is_ok());
        assert!(authorize_init(Some("cur"), None, Some("other")).is_err());
        assert!(authorize_init(Some("cur"), None, None).is_err());
        assert!(authorize_init(Some("cur"), Some(&hash), Some("new")).is_ok());
        // A non-secure sandbox publishes the hash of "".
        let empty = hex::encode(Sha512::digest(b""));
        assert!(authorize_init(Some("cur"), Some(&empty), None).is_ok());
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }
}
