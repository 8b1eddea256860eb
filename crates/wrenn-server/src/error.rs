//! The one place where control-plane errors become HTTP statuses and E2B error bodies
//! (`{"code": <int>, "message": "<str>"}`; the SDKs crash on any other shape), and where
//! answers are logged at the level of what they are.
//!
//! Internal details (database errors, agent messages) are logged here and kept out of the body.

use std::fmt;

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use wrenn_connect::{Code, ConnectError};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    /// It exists, but belongs to another team.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The request is well formed but cannot be done as asked (an idempotency key reused for
    /// another request).
    #[error("{0}")]
    Unprocessable(String),
    /// No host can take the sandbox.
    #[error("{0}")]
    NoCapacity(String),
    /// The control plane itself could not finish (not the agent, not the database).
    #[error("{0}")]
    Internal(String),
    /// A host agent refused or failed an operation.
    #[error("host agent: {context}")]
    Agent {
        context: String,
        #[source]
        source: ConnectError,
    },
    #[error("store")]
    Store(#[from] StoreError),
}

impl ApiError {
    pub fn sandbox_not_found(id: &str) -> Self {
        ApiError::NotFound(format!(
            "Sandbox \"{id}\" doesn't exist or you don't have access to it"
        ))
    }

    pub fn agent(context: impl Into<String>, source: ConnectError) -> Self {
        ApiError::Agent {
            context: context.into(),
            source,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NoCapacity(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Agent { source, .. } => match source.code {
                Code::NotFound => StatusCode::NOT_FOUND,
                // `failed_precondition`: the agent's sandbox is busy with another operation or
                // in the wrong state for this one.
                Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => {
                    StatusCode::CONFLICT
                }
                Code::ResourceExhausted => StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable | Code::DeadlineExceeded => StatusCode::BAD_GATEWAY,
                Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message clients see.
    fn public_message(&self) -> String {
        match self {
            ApiError::Agent { context, source } => match source.code {
                Code::NotFound
                | Code::FailedPrecondition
                | Code::AlreadyExists
                | Code::Aborted
                | Code::ResourceExhausted
                | Code::Unimplemented => {
                    format!("{context}: {}", source.message)
                }
                _ => format!("{context}: the host agent failed"),
            },
            ApiError::Store(_) => "Internal error".to_owned(),
            other => other.to_string(),
        }
    }

    /// How loud an answer with this error is logged: `error` only for failures someone must
    /// look at; a refusal by the agent (not found, busy) is what it is, not a server error.
    fn log(&self, status: StatusCode) {
        let chain = Chain(self);
        let code = status.as_u16();
        match self {
            // Expected under load or with a feature the agent lacks; not a fault.
            ApiError::NoCapacity(_) => tracing::warn!(status = code, error = %chain, "no capacity"),
            ApiError::Agent { source, .. } if source.code == Code::Unimplemented => {
                tracing::info!(status = code, error = %chain, "not implemented by the agent");
            }
            // The agent does not know the sandbox our record names: the records and the host
            // disagree until the reconciler settles them.
            ApiError::Agent { source, .. } if source.code == Code::NotFound => {
                tracing::warn!(status = code, error = %chain, "the host agent does not know the sandbox");
            }
            ApiError::Agent { .. } if status.is_client_error() => {
                tracing::info!(status = code, error = %chain, "refused by the host agent");
            }
            _ if status.is_server_error() => {
                tracing::error!(status = code, error = %chain, "request failed");
            }
            _ => tracing::debug!(status = code, error = %chain, "request refused"),
        }
    }

    /// The E2B error body of this error, logged as an answer with it is: a fork's failed
    /// children are answered one by one, inside a whole answer that succeeded.
    pub(crate) fn into_body(self) -> wrenn_api::Error {
        let status = self.status();
        // Logged where handled, with the full chain, inside the request's span.
        self.log(status);
        wrenn_api::Error {
            code: status.as_u16(),
            message: self.public_message(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        (status, Json(self.into_body())).into_response()
    }
}

/// An E2B error body with this status.
pub(crate) fn error_response(status: StatusCode, message: String) -> Response {
    (
        status,
        Json(wrenn_api::Error {
            code: status.as_u16(),
            message,
        }),
    )
        .into_response()
}

/// An error with all of its `source()` chain, `: `-separated, for logs (`error = %Chain(&e)`).
pub(crate) struct Chain<'a>(pub(crate) &'a dyn std::error::Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(c) = cur {
            write!(f, ": {c}")?;
            cur = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_refusals_are_client_errors_with_their_message() {
        let busy = ApiError::agent(
            "pause sandbox",
            ConnectError::failed_precondition(
                "sandbox abc is busy (another operation is in progress)",
            ),
        );
        assert_eq!(busy.status(), StatusCode::CONFLICT);
        assert_eq!(
            busy.public_message(),
            "pause sandbox: sandbox abc is busy (another operation is in progress)"
        );
        let gone = ApiError::agent("kill sandbox", ConnectError::not_found("sandbox abc"));
        assert_eq!(gone.status(), StatusCode::NOT_FOUND);
        let failed = ApiError::agent("create sandbox", ConnectError::internal("disk full"));
        assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
        // Internal details stay out of the body, and in the log line.
        assert_eq!(
            failed.public_message(),
            "create sandbox: the host agent failed"
        );
        assert_eq!(
            Chain(&failed).to_string(),
            "host agent: create sandbox: internal: disk full"
        );
    }
}
