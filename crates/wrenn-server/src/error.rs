//! The one place where control-plane errors become HTTP statuses and E2B error bodies
//! (`{"code": <int>, "message": "<str>"}`; the SDKs crash on any other shape).
//!
//! Internal details (database errors, agent messages) are logged here and kept out of the body.

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
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// No host can take the sandbox.
    #[error("{0}")]
    NoCapacity(String),
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
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::NoCapacity(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Agent { source, .. } => match source.code {
                Code::NotFound => StatusCode::NOT_FOUND,
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
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() || matches!(self, ApiError::Agent { .. }) {
            // Logged where handled, with the full chain.
            let chain = error_chain(&self);
            tracing::error!(status = status.as_u16(), error = %chain, "request failed");
        }
        error_response(status, self.public_message())
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

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
