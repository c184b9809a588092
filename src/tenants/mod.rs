//! Tenants and authentication: who a request comes from (API key → tenant), what that tenant's
//! policy is, and the persistent state behind both.
//!
//! - [`policy`]: a tenant's adapters and guidance bounds;
//! - [`keys`]: API keys (stored hashed, shown once);
//! - [`store`]: atomic persistence of the state in the state directory.

pub mod keys;
pub mod policy;
pub mod store;

pub use policy::TenantPolicy;
pub use store::{State, Store, StoreError, TenantRecord};

use std::collections::HashMap;
use std::sync::RwLock;

/// The tenant requests without an API key belong to (unless keys are required).
pub const DEFAULT_TENANT: &str = "default";

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Tenant(String),
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("an API key is required: send it as `Authorization: Bearer <key>`")]
    MissingKey,
    #[error("incorrect API key provided")]
    InvalidKey,
}

/// The live control-plane state: tenant policies and keys, and the adapters to restore at
/// start-up. Reads are cheap (every request authenticates); changes go through [`Self::update`],
/// which persists before it publishes.
pub struct Directory {
    store: Store,
    state: RwLock<State>,
    /// Key hash → tenant, derived from `state`.
    key_index: RwLock<HashMap<String, String>>,
    admin_key_hash: Option<String>,
    require_api_key: bool,
}

impl Directory {
    pub fn open(store: Store, admin_key: Option<&str>, require_api_key: bool) -> Result<Self, StoreError> {
        let mut state = store.load()?;
        state.keyed |= state.has_keys();
        let d = Self {
            key_index: RwLock::new(index(&state)),
            state: RwLock::new(state),
            store,
            admin_key_hash: admin_key.map(keys::hash_key),
            require_api_key,
        };
        Ok(d)
    }

    pub fn admin_enabled(&self) -> bool {
        self.admin_key_hash.is_some()
    }

    pub fn is_persistent(&self) -> bool {
        self.store.is_persistent()
    }

    /// Identifies the caller from a bearer token (or its absence).
    ///
    /// An unknown key is rejected, with one exception: an *open* server (no tenant key ever
    /// issued, keys not required) treats any key like no key. OpenAI SDKs always send some key, and
    /// on such a server a key cannot name a tenant, so the caller gets exactly what an anonymous
    /// request gets and nothing more. Once a key exists, a mistyped key must fail loudly rather
    /// than silently run under the default tenant's policy (which may lack a forget-adapter).
    pub fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, AuthError> {
        let anonymous = Caller::Tenant(DEFAULT_TENANT.into());
        let Some(key) = bearer.filter(|k| !k.is_empty()) else {
            return if self.require_api_key { Err(AuthError::MissingKey) } else { Ok(anonymous) };
        };
        if self.is_admin_key(key) {
            return Ok(Caller::Admin);
        }
        match self.key_index.read().expect("key index").get(&keys::hash_key(key)) {
            Some(t) => Ok(Caller::Tenant(t.clone())),
            None if self.is_open() => Ok(anonymous),
            None => Err(AuthError::InvalidKey),
        }
    }

    /// Whether this is an *open* server: keys not required and no tenant key ever issued (see
    /// [`Self::authenticate`]).
    pub fn is_open(&self) -> bool {
        !self.require_api_key && !self.state.read().expect("state").keyed
    }

    /// Whether `key` is the admin key.
    pub fn is_admin_key(&self, key: &str) -> bool {
        self.admin_key_hash.as_ref().is_some_and(|admin| keys::same_hash(admin, &keys::hash_key(key)))
    }

    /// Whether `key` is a tenant's API key.
    pub fn is_tenant_key(&self, key: &str) -> bool {
        self.key_index.read().expect("key index").contains_key(&keys::hash_key(key))
    }

    /// The policy of `tenant` (the default policy for a tenant without one, e.g. `default`).
    pub fn policy(&self, tenant: &str) -> TenantPolicy {
        self.state.read().expect("state").tenants.get(tenant).map(|t| t.policy.clone()).unwrap_or_default()
    }

    /// A copy of the whole state.
    pub fn snapshot(&self) -> State {
        self.state.read().expect("state").clone()
    }

    /// Applies `f` to a copy of the state, persists it, then publishes it. If `f` or the write
    /// fails, nothing changes. Callers serialize updates (the admin API holds one lock).
    pub fn update<R, E: From<StoreError>>(&self, f: impl FnOnce(&mut State) -> Result<R, E>) -> Result<R, E> {
        let mut next = self.snapshot();
        let r = f(&mut next)?;
        next.keyed |= next.has_keys();
        self.store.save(&next)?;
        *self.key_index.write().expect("key index") = index(&next);
        *self.state.write().expect("state") = next;
        Ok(r)
    }
}

fn index(state: &State) -> HashMap<String, String> {
    state.tenants.iter().flat_map(|(name, t)| t.keys.iter().map(move |k| (k.hash.clone(), name.clone()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authentication() {
        let d = Directory::open(Store::new(None), Some("admin-secret"), false).unwrap();
        assert_eq!(d.authenticate(None), Ok(Caller::Tenant(DEFAULT_TENANT.into())));
        assert_eq!(d.authenticate(Some("admin-secret")), Ok(Caller::Admin));
        // Open server: no tenant key exists, so any key acts like none (OpenAI SDKs always send one).
        assert_eq!(d.authenticate(Some("nope")), Ok(Caller::Tenant(DEFAULT_TENANT.into())));
        let (key, rec) = keys::generate().unwrap();
        d.update(|s| {
            s.tenants.entry("acme".into()).or_default().keys.push(rec);
            Ok::<_, StoreError>(())
        })
        .unwrap();
        assert_eq!(d.authenticate(Some(&key)), Ok(Caller::Tenant("acme".into())));
        // Once a key exists, unknown keys fail loudly.
        assert_eq!(d.authenticate(Some("nope")), Err(AuthError::InvalidKey));
        assert!(d.is_tenant_key(&key) && !d.is_tenant_key("nope") && d.is_admin_key("admin-secret"));
        // ... and keep failing after the last key is revoked.
        d.update(|s| {
            s.tenants.clear();
            Ok::<_, StoreError>(())
        })
        .unwrap();
        assert_eq!(d.authenticate(Some(&key)), Err(AuthError::InvalidKey));
        let strict = Directory::open(Store::new(None), None, true).unwrap();
        assert_eq!(strict.authenticate(None), Err(AuthError::MissingKey));
        assert!(!strict.admin_enabled());
    }
}
