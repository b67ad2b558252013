//! Errors to clients, as OpenAI's error JSON:
//! `{"error": {"message", "type", "param", "code"}}`.

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};

use crate::body::{ProxyBody, full};

/// One error for a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        message: impl Into<String>,
        param: Option<&'static str>,
    ) -> Self {
        let kind = match status.as_u16() {
            400 | 405 | 408 | 413 => "invalid_request_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            _ => "server_error",
        };
        ApiError {
            status,
            message: message.into(),
            kind,
            param,
            code: None,
        }
    }

    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message, param)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, message, None)
    }

    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            code: Some("model_not_found"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                format!("The model `{model}` does not exist."),
                Some("model"),
            )
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::json!({
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        })
        .to_string()
    }
}

pub fn error_response(e: &ApiError) -> Response<ProxyBody> {
    let mut r = Response::new(full(e.to_json()));
    *r.status_mut() = e.status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
