//! Extractors whose every failure is an OpenAI-shaped error. The JSON body: wrong content type
//! (415), oversized body (413), unparsable JSON (400), or a field of the wrong type (400 naming
//! the field). Path and query parameters: 400 (axum's own extractors answer in plain text).

use super::error::ApiError;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

/// Path parameters (as axum's `Path`).
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(Self(v)),
            Err(e) => Err(ApiError::invalid(e.body_text(), None)),
        }
    }
}

/// Query parameters (as axum's `Query`).
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Self(v)),
            Err(e) => Err(ApiError::invalid(e.body_text(), None)),
        }
    }
}

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;

pub struct JsonBody<T>(pub T);

/// What a JSON body can be read as: one type, or two read from the same object.
pub trait FromJsonObject: Sized {
    fn from_object(value: serde_json::Value) -> Result<Self, ApiError>;
}

/// A body read as one type.
pub struct One<T>(pub T);

impl<T: DeserializeOwned> FromJsonObject for One<T> {
    fn from_object(value: serde_json::Value) -> Result<Self, ApiError> {
        typed(value).map(One)
    }
}

impl<A: DeserializeOwned, B: DeserializeOwned> FromJsonObject for (A, B) {
    fn from_object(value: serde_json::Value) -> Result<Self, ApiError> {
        Ok((typed(value.clone())?, typed(value)?))
    }
}

impl<A: DeserializeOwned, B: DeserializeOwned> FromJsonObject for (A, B, BodyKeys) {
    fn from_object(value: serde_json::Value) -> Result<Self, ApiError> {
        let keys = BodyKeys(value.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default());
        Ok((typed(value.clone())?, typed(value)?, keys))
    }
}

/// The top-level field names of a JSON body, so a handler can refuse the ones it does not know
/// (silently ignoring a field a client relies on is worse than an error).
#[derive(Debug, Clone, Default)]
pub struct BodyKeys(pub Vec<String>);

impl<S: Send + Sync, T: FromJsonObject> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("");
            let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            if mime != "application/json" && !mime.ends_with("+json") {
                return Err(ApiError::UnsupportedMediaType(ct.chars().take(100).collect()));
            }
        }
        let bytes = read_limited(req.into_body()).await?;
        parse(&bytes).map(JsonBody)
    }
}

/// Reads at most [`MAX_BODY_BYTES`]. An oversized body is still read to its end (up to a hard
/// cap) before the 413 goes out: answering while the client is still sending would make most
/// clients see a reset connection instead of the error.
async fn read_limited(body: axum::body::Body) -> Result<Vec<u8>, ApiError> {
    use futures::StreamExt;
    const DRAIN_CAP: usize = 64 * 1024 * 1024;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("could not read the request body: {e}"), None))?;
        total += chunk.len();
        if total <= MAX_BODY_BYTES {
            buf.extend_from_slice(&chunk);
        } else if total > DRAIN_CAP {
            break;
        }
    }
    if total > MAX_BODY_BYTES {
        return Err(ApiError::PayloadTooLarge { limit: MAX_BODY_BYTES });
    }
    Ok(buf)
}

/// Parses a request body, mapping serde's errors to OpenAI's messages.
pub fn parse<T: FromJsonObject>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::invalid(
            format!(
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.) Parser said: {e}"
            ),
            None,
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid("The request body must be a JSON object.", None));
    }
    T::from_object(value)
}

/// Deserializes one type, naming the failing field.
fn typed<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if let Some(field) = inner.strip_prefix("missing field `").and_then(|s| s.split('`').next()) {
            let param = if path == "." { field.to_string() } else { format!("{path}.{field}") };
            return ApiError::invalid(format!("Missing required parameter: '{param}'."), Some(param));
        }
        ApiError::invalid(format!("Invalid value for '{path}': {inner}"), Some(path))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct T {
        model: String,
        temperature: Option<f32>,
    }

    type P = (T, serde_json::Value);

    #[test]
    fn errors_name_the_field() {
        let e = parse::<P>(br#"{"model": "x", "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.status(), 400);
        assert_eq!(e.body().error.param.as_deref(), Some("temperature"));
        let e = parse::<P>(br#"{"temperature": 1}"#).unwrap_err();
        assert_eq!(e.body().error.param.as_deref(), Some("model"));
        let e = parse::<P>(b"{not json").unwrap_err();
        assert!(e.to_string().contains("could not parse the JSON body"));
        let e = parse::<P>(b"[1, 2]").unwrap_err();
        assert!(e.to_string().contains("JSON object"));
        assert!(parse::<P>(br#"{"model": "x", "unknown_field": [1, {"a": 2}]}"#).is_ok());
        let deep = "[".repeat(100_000);
        assert!(parse::<P>(deep.as_bytes()).is_err());
    }
}
