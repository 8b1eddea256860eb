//! The one place that maps envd errors to Connect codes and HTTP statuses.
//!
//! Modules keep their own error types where callers branch on them and convert into
//! [`EnvdError`] at the API edge. Messages are what the client sees: short, and naming the
//! path or process involved.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use wrenn_connect::{Code, ConnectError};

/// An error as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum EnvdError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    NotEnoughSpace(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl EnvdError {
    /// Classifies an I/O error on `path` (what = a verb phrase like "open file").
    pub fn io(what: &str, path: &std::path::Path, e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let msg = format!("{what} '{}': {e}", path.display());
        match e.kind() {
            K::NotFound => EnvdError::NotFound(format!("path '{}' does not exist", path.display())),
            K::PermissionDenied => EnvdError::PermissionDenied(msg),
            K::AlreadyExists => EnvdError::AlreadyExists(msg),
            K::StorageFull | K::QuotaExceeded => {
                EnvdError::NotEnoughSpace("not enough disk space available".into())
            }
            K::InvalidInput | K::NotADirectory | K::IsADirectory | K::InvalidFilename => {
                EnvdError::InvalidArgument(msg)
            }
            _ if e.raw_os_error() == Some(libc::ELOOP) => EnvdError::FailedPrecondition(msg),
            _ => EnvdError::Internal(msg),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            EnvdError::NotFound(_) => Code::NotFound,
            EnvdError::InvalidArgument(_) => Code::InvalidArgument,
            EnvdError::AlreadyExists(_) => Code::AlreadyExists,
            EnvdError::PermissionDenied(_) => Code::PermissionDenied,
            EnvdError::Unauthenticated(_) => Code::Unauthenticated,
            EnvdError::FailedPrecondition(_) => Code::FailedPrecondition,
            EnvdError::Unimplemented(_) => Code::Unimplemented,
            EnvdError::NotEnoughSpace(_) => Code::ResourceExhausted,
            EnvdError::Unavailable(_) => Code::Unavailable,
            EnvdError::Internal(_) => Code::Internal,
        }
    }

    /// The HTTP status for the REST endpoints (`/files`, `/init`, ...).
    pub fn http_status(&self) -> StatusCode {
        match self {
            EnvdError::NotFound(_) => StatusCode::NOT_FOUND,
            EnvdError::InvalidArgument(_) | EnvdError::FailedPrecondition(_) => {
                StatusCode::BAD_REQUEST
            }
            EnvdError::AlreadyExists(_) => StatusCode::CONFLICT,
            EnvdError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            EnvdError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            EnvdError::Unimplemented(_) => StatusCode::NOT_IMPLEMENTED,
            EnvdError::NotEnoughSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
            EnvdError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            EnvdError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<EnvdError> for ConnectError {
    fn from(e: EnvdError) -> Self {
        ConnectError::new(e.code(), e.to_string())
    }
}

/// REST error body: `{"code": <http status>, "message": "..."}`, as upstream envd and the
/// SDKs expect.
impl IntoResponse for EnvdError {
    fn into_response(self) -> Response {
        let status = self.http_status();
        if matches!(self, EnvdError::Internal(_)) {
            tracing::error!(error = %self, "request failed");
        }
        json_error(status, &self.to_string())
    }
}

/// The JSON error body every REST endpoint uses.
pub fn json_error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "code": status.as_u16(), "message": message });
    (
        status,
        [
            (
                http::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            ),
            (http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// `e` and its sources, joined by ": ", on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Some errors put their source in their own message too; print it once.
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod chain_tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_joins_sources_on_one_line() {
        let e = Outer(std::io::Error::other("inner\ncause"));
        assert_eq!(error_chain(&e), "outer: inner cause");
    }
}
