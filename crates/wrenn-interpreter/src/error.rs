//! The one place that maps errors to HTTP statuses.
//!
//! Bodies are plain text, as E2B's server answers: the SDKs turn 404 into their not-found
//! error with the body as its message, and any other status into a sandbox error naming the
//! status (and, in Python, the body).

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::worker::WorkerError;

/// An error as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// E2B's wording, which the SDKs pass on.
    #[error("Context {0} not found")]
    ContextNotFound(String),
    #[error("Only one of context_id or language can be provided")]
    ContextAndLanguage,
    #[error("language '{0}' is not supported here: only python is")]
    UnsupportedLanguage(String),
    #[error("cwd '{0}' is not a directory")]
    BadCwd(String),
    #[error("invalid request body: {0}")]
    BadBody(String),
    #[error("start the context's Python worker")]
    Start(#[source] WorkerError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::ContextNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::ContextAndLanguage
            | ApiError::UnsupportedLanguage(_)
            | ApiError::BadCwd(_) => StatusCode::BAD_REQUEST,
            // What FastAPI answers for a body its model rejects.
            ApiError::BadBody(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Start(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = chain(&self);
        if status.is_server_error() {
            tracing::error!(error = %body, "request failed");
        } else {
            tracing::debug!(error = %body, %status, "request refused");
        }
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
            .into_response()
    }
}

/// The error and its sources, `: `-separated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
