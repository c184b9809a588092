//! The one error type of the HTTP layer, and its mapping to HTTP statuses and OpenAI's error
//! body `{"error": {"message", "type", "param", "code"}}`. Every failure a client can see goes
//! through here, so statuses and shapes stay consistent (and the official SDKs raise the right
//! exception classes).

use crate::engine::EngineError;
use crate::tokenizer::TokenizerError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, wrong types, invalid values. `param` names the offending field.
    #[error("{message}")]
    InvalidRequest { message: String, param: Option<String>, code: Option<&'static str> },
    #[error(
        "This model's maximum context length is {max} tokens. However, you requested {needed} tokens. Please reduce the length of the messages or of max_tokens."
    )]
    ContextLengthExceeded { needed: usize, max: usize },
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("Unsupported Content-Type {0:?}: send the request body as application/json.")]
    UnsupportedMediaType(String),
    #[error("The request body is larger than the limit of {limit} bytes.")]
    PayloadTooLarge { limit: usize },
    #[error("The server is overloaded: {waiting} requests are already waiting. Retry shortly.")]
    Overloaded { waiting: usize },
    #[error(
        "Too many requests for tenant {tenant:?}: {waiting} are already waiting, its limit is {limit}. Retry shortly."
    )]
    TenantOverloaded { tenant: String, waiting: usize, limit: usize },
    /// The request took longer than the server's `request_timeout_secs`.
    #[error("The request did not complete within the server's limit of {secs} s.")]
    Timeout { secs: u64 },
    #[error("The server is shutting down.")]
    Unavailable,
    /// The shared state store cannot be reached: admin changes are refused (never acknowledged
    /// uncommitted); requests are still served with the last known state.
    #[error("The state store is unreachable, so admin changes are refused until it is back ({0}).")]
    StoreUnavailable(String),
    /// A forget-adapter a tenant's policy requires is not loaded on this replica.
    #[error("{0}")]
    AdapterUnavailable(String),
    #[error("Not found: {0}")]
    RouteNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("Method {0} is not allowed on this route.")]
    MethodNotAllowed(String),
    /// A bug or an inference failure: logged with details, shown to the client generically.
    #[error("The server had an error while processing your request.")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        Self::InvalidRequest { message: message.into(), param: param.into(), code: None }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } | Self::ContextLengthExceeded { .. } => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) | Self::RouteNotFound(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded { .. } | Self::TenantOverloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable | Self::StoreUnavailable(_) | Self::AdapterUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` field.
    fn kind(&self) -> &'static str {
        match self {
            Self::Overloaded { .. } | Self::TenantOverloaded { .. } => "rate_limit_error",
            Self::Timeout { .. } => "timeout_error",
            Self::Internal(_) | Self::Unavailable | Self::StoreUnavailable(_) | Self::AdapterUnavailable(_) => {
                "server_error"
            }
            Self::Unauthorized(_) => "authentication_error",
            Self::Forbidden(_) => "permission_error",
            _ => "invalid_request_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            Self::InvalidRequest { code, .. } => *code,
            Self::ContextLengthExceeded { .. } => Some("context_length_exceeded"),
            Self::ModelNotFound(_) => Some("model_not_found"),
            Self::Overloaded { .. } | Self::TenantOverloaded { .. } => Some("rate_limit_exceeded"),
            Self::Timeout { .. } => Some("timeout"),
            Self::PayloadTooLarge { .. } => Some("request_too_large"),
            Self::Unauthorized(_) => Some("invalid_api_key"),
            _ => None,
        }
    }

    fn param(&self) -> Option<String> {
        match self {
            Self::InvalidRequest { param, .. } => param.clone(),
            Self::ContextLengthExceeded { .. } => Some("messages".into()),
            Self::ModelNotFound(_) => Some("model".into()),
            _ => None,
        }
    }

    /// The OpenAI-shaped body (also used as the payload of an SSE error event).
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail { message: self.to_string(), kind: self.kind(), param: self.param(), code: self.code() },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), error = ?self, "request failed");
        } else {
            tracing::info!(status = status.as_u16(), error = %self, "request rejected");
        }
        let mut resp = (status, axum::Json(self.body())).into_response();
        if let Self::Overloaded { .. } | Self::TenantOverloaded { .. } = self {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Overloaded { waiting } => Self::Overloaded { waiting },
            EngineError::TenantOverloaded { tenant, waiting, limit } => {
                Self::TenantOverloaded { tenant, waiting, limit }
            }
            EngineError::ContextOverflow { needed, max } => Self::ContextLengthExceeded { needed, max },
            EngineError::TooLarge { .. } => Self::InvalidRequest {
                message: e.to_string(),
                param: Some("max_tokens".into()),
                code: Some("context_length_exceeded"),
            },
            EngineError::InvalidRequest(m) => Self::invalid(m, None),
            EngineError::ShuttingDown | EngineError::CutByShutdown => Self::Unavailable,
            EngineError::Failed(m) => Self::Internal(m),
            EngineError::Constraint(m) => Self::InvalidRequest {
                message: format!("The output format could not be followed: {m}"),
                param: None,
                code: Some("output_constraint_failed"),
            },
        }
    }
}

impl From<TokenizerError> for ApiError {
    fn from(e: TokenizerError) -> Self {
        match e {
            TokenizerError::Template(m) => {
                Self::invalid(format!("The chat template rejected these messages: {m}"), Some("messages".into()))
            }
            TokenizerError::NoChatTemplate => Self::invalid(e.to_string(), Some("messages".into())),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<crate::adapters::AdapterError> for ApiError {
    fn from(e: crate::adapters::AdapterError) -> Self {
        use crate::adapters::AdapterError as A;
        match &e {
            A::Exists(_) | A::Limit(_) => Self::Conflict(e.to_string()),
            A::UnknownAdapter(_) => Self::NotFound(e.to_string()),
            A::OutsideRoot(_) => Self::Forbidden(e.to_string()),
            A::NotFound(_) | A::Invalid(_) | A::Unsupported(_) => Self::invalid(e.to_string(), Some("path".into())),
            // Files that are not the generation they claim to be: the request cannot be met.
            A::HashMismatch { .. } => Self::Conflict(e.to_string()),
        }
    }
}

impl From<crate::tenants::StoreError> for ApiError {
    fn from(e: crate::tenants::StoreError) -> Self {
        match e {
            crate::tenants::StoreError::Unavailable(m) => Self::StoreUnavailable(m),
            other => Self::Internal(other.to_string()),
        }
    }
}
