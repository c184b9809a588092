//! Who is calling: extractors for the public API (a tenant) and the admin API (the admin key).

use super::AppState;
use super::error::ApiError;
use crate::tenants::{AuthError, Caller};
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use std::sync::Arc;

fn bearer(parts: &Parts) -> Option<&str> {
    let v = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).map(str::trim)
}

/// The tenant a public request acts for.
pub struct Tenant(pub String);

impl FromRequestParts<Arc<AppState>> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        match state.tenants.authenticate(bearer(parts)) {
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

/// Proof that the caller holds the admin key.
pub struct Admin;

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
        match bearer(parts).filter(|k| !k.is_empty()) {
            Some(key) if state.tenants.is_admin_key(key) => Ok(Admin),
            Some(key) if state.tenants.is_tenant_key(key) => {
                Err(ApiError::Forbidden("tenant API keys cannot use the admin API".into()))
            }
            Some(_) => Err(ApiError::Unauthorized("incorrect admin key".into())),
            None => Err(ApiError::Unauthorized("the admin API needs `Authorization: Bearer <admin key>`".into())),
        }
    }
}
