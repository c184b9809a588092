//! Who is calling: extractors for the public API (a tenant) and the admin API (the admin key).

use super::AppState;
use super::error::ApiError;
use crate::tenants::{AuthError, Caller};
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use std::sync::Arc;

/// What the `Authorization` header presents.
enum Credentials<'a> {
    None,
    Bearer(&'a str),
    /// A header that is not `Bearer <token>` (another scheme, no token, not text): refused, never
    /// read as "no key" — a key sent the wrong way must not run as the default tenant.
    Malformed,
}

fn credentials(parts: &Parts) -> Credentials<'_> {
    let Some(v) = parts.headers.get(AUTHORIZATION) else { return Credentials::None };
    let Ok(v) = v.to_str() else { return Credentials::Malformed };
    match v.trim().split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
            Credentials::Bearer(token.trim())
        }
        _ => Credentials::Malformed,
    }
}

fn malformed() -> ApiError {
    ApiError::Unauthorized("the Authorization header must be `Bearer <key>`".into())
}

/// The tenant a public request acts for.
pub struct Tenant(pub String);

impl FromRequestParts<Arc<AppState>> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let key = match credentials(parts) {
            Credentials::None => None,
            Credentials::Bearer(k) => Some(k),
            // An open server ignores whatever a client presents (see `Directory::authenticate`).
            Credentials::Malformed if state.tenants.is_open() => None,
            Credentials::Malformed => return Err(malformed()),
        };
        match state.tenants.authenticate(key) {
            Ok(Caller::Tenant(t)) => {
                // Every later log line of this request names its tenant.
                tracing::Span::current().record("tenant", t.as_str());
                Ok(Tenant(t))
            }
            Ok(Caller::Admin) => {
                Err(ApiError::Forbidden("the admin key cannot be used for inference; use a tenant API key".into()))
            }
            Err(AuthError::MissingKey) => Err(ApiError::Unauthorized(AuthError::MissingKey.to_string())),
            Err(AuthError::InvalidKey) => Err(ApiError::Unauthorized(AuthError::InvalidKey.to_string())),
        }
    }
}

/// Proof that the caller holds the admin key, and who they say they are (for the audit log).
pub struct Admin {
    /// `X-Lethe-Actor` (printable ASCII, at most 64 characters), else `admin`. Self-declared:
    /// the admin key is one shared secret, so an authenticating proxy in front should set it.
    pub actor: String,
    pub request_id: Option<String>,
}

const ACTOR: &str = "x-lethe-actor";

fn actor(parts: &Parts) -> String {
    parts
        .headers
        .get(ACTOR)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(64).collect::<String>())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "admin".into())
}

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        if !state.tenants.admin_enabled() {
            return Err(ApiError::Forbidden(
                "the admin API is disabled: start lethe with LETHE_ADMIN_KEY or --admin-key-file".into(),
            ));
        }
        // Checked against the keys directly, not through `authenticate`: an open server lets
        // unknown keys act as anonymous on the public API, never here.
        match credentials(parts) {
            Credentials::Bearer(key) if state.tenants.is_admin_key(key) => Ok(Admin {
                actor: actor(parts),
                request_id: parts.headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(String::from),
            }),
            Credentials::Bearer(key) if state.tenants.is_tenant_key(key) => {
                Err(ApiError::Forbidden("tenant API keys cannot use the admin API".into()))
            }
            Credentials::Bearer(_) => Err(ApiError::Unauthorized("incorrect admin key".into())),
            Credentials::Malformed => Err(malformed()),
            Credentials::None => {
                Err(ApiError::Unauthorized("the admin API needs `Authorization: Bearer <admin key>`".into()))
            }
        }
    }
}
