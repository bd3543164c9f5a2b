//! Errors: [`ServeError`] for starting the server, [`ApiError`] for one
//! request, written in OpenAI's error shape
//! `{"error": {"message", "type", "param", "code"}}`.

use crate::deps::PipelineError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A command-line value that cannot work.
    #[error("{0}")]
    Args(String),
}

/// A refused or failed request.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    /// The request field at fault, as a path (`messages[0].content[1].image_url.url`).
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for the `Retry-After` header (429 only).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: the request cannot be served as written.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the field at fault.
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::invalid(message).with_param(param)
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or wrong API key; send `Authorization: Bearer KEY`",
        )
        .with_code("invalid_api_key")
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", message).with_code("request_too_large")
    }

    pub fn busy(retry_after: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "the request queue is full; retry later",
        )
        .with_code("queue_full");
        e.retry_after = Some(retry_after);
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The short label of this error in `/metrics`.
    pub fn metric_kind(&self) -> &'static str {
        self.code.unwrap_or(self.kind)
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<PipelineError> for ApiError {
    /// Errors caused by the request's content (its prompt, images, sizes,
    /// the memory those need) are 400; the rest are the server's.
    fn from(e: PipelineError) -> Self {
        let msg = e.to_string();
        match e {
            PipelineError::Input(_) | PipelineError::Prompt(_) | PipelineError::Vision(_) => ApiError::invalid(msg),
            PipelineError::Llm(
                emu_llm::Error::Generation(_) | emu_llm::Error::Input(_) | emu_llm::Error::ContextOverflow { .. },
            ) => ApiError::invalid(msg),
            // The request's own size (beams, tokens, pixels) does not fit the
            // memory left: the same request made smaller can succeed.
            PipelineError::Memory(_) => ApiError::invalid(msg).with_code("insufficient_memory"),
            _ => ApiError::internal(msg),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_errors_map_to_the_party_at_fault() {
        let mem = ApiError::from(PipelineError::Memory("need about 9 GiB, have 1 GiB".into()));
        assert_eq!(mem.status, StatusCode::BAD_REQUEST);
        assert_eq!(mem.metric_kind(), "insufficient_memory");
        assert!(mem.message.contains("need about 9 GiB"));
        let bad = ApiError::from(PipelineError::Input("no image".into()));
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    }
}
