//! Tenants and authentication: who a request comes from (API key → tenant), what that tenant's
//! policy is, and the persistent state behind both.
//!
//! - [`policy`]: a tenant's adapters and guidance bounds;
//! - [`keys`]: API keys (stored hashed, shown once);
//! - [`store`]: where the state lives (files in the state directory, or PostgreSQL shared by
//!   replicas), behind one interface.

pub mod keys;
pub mod policy;
pub mod store;

pub use policy::TenantPolicy;
pub use store::{Intent, State, StateStore, StoreError, TenantRecord};

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

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

/// The live control-plane state: tenant policies and keys, and the adapters that should be
/// loaded. Reads are cheap (every request authenticates); changes are committed to the store
/// ([`Self::commit`]) and then published here ([`Self::publish`]), only ever moving forward in
/// revision.
pub struct Directory {
    store: Arc<dyn StateStore>,
    state: RwLock<Arc<State>>,
    /// Key hash → tenant, derived from `state`.
    key_index: RwLock<HashMap<String, String>>,
    admin_key_hash: Option<String>,
    require_api_key: bool,
}

impl Directory {
    /// Reads the store's current state. Blocking (works from any thread, inside a runtime or not).
    pub fn open(
        store: Arc<dyn StateStore>,
        admin_key: Option<&str>,
        require_api_key: bool,
    ) -> Result<Self, StoreError> {
        let mut state = futures::executor::block_on(store.load())?;
        state.keyed |= state.has_keys();
        let d = Self {
            key_index: RwLock::new(index(&state)),
            state: RwLock::new(Arc::new(state)),
            store,
            admin_key_hash: admin_key.map(keys::hash_key),
            require_api_key,
        };
        Ok(d)
    }

    /// A directory on a memory-only store (tests, tools).
    pub fn in_memory(admin_key: Option<&str>, require_api_key: bool) -> Self {
        Self::open(Arc::new(store::FileStore::memory()), admin_key, require_api_key).expect("memory store")
    }

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    pub fn admin_enabled(&self) -> bool {
        self.admin_key_hash.is_some()
    }

    pub fn is_persistent(&self) -> bool {
        self.store.is_persistent()
    }

    /// The revision of the state served.
    pub fn revision(&self) -> u64 {
        self.state.read().expect("state").revision
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

    /// The whole state served now.
    pub fn snapshot(&self) -> Arc<State> {
        self.state.read().expect("state").clone()
    }

    /// Serves `next` if it is at least as new as the state served (an older one, from a
    /// notification that overtook a newer commit, is ignored). Returns whether it was taken.
    pub fn publish(&self, next: Arc<State>) -> bool {
        let mut state = self.state.write().expect("state");
        if next.revision < state.revision {
            return false;
        }
        // Index first, under the state lock: a key revoked in `next` is refused as soon as
        // `next` is visible, never after.
        *self.key_index.write().expect("key index") = index(&next);
        *state = next;
        true
    }

    /// Applies `f` to the store's current state and commits it with an audit entry (one
    /// transaction); returns `f`'s result and the committed state, which the caller publishes
    /// (see `server::control`). If `f` fails, nothing is written.
    pub async fn commit<R: Send, E: From<StoreError> + Send>(
        &self,
        intent: Intent,
        f: impl FnOnce(&mut State) -> Result<R, E> + Send,
    ) -> Result<(R, Arc<State>), E> {
        let mut outcome: Option<Result<R, E>> = None;
        let slot = &mut outcome;
        let committed = self
            .store
            .commit(
                intent,
                Box::new(move |st: &mut State| {
                    let r = f(st);
                    let ok = r.is_ok();
                    *slot = Some(r);
                    ok
                }),
            )
            .await?;
        let r = outcome.expect("the store ran the change")?;
        let state = committed.expect("a change that succeeded is committed");
        Ok((r, Arc::new(state)))
    }
}

fn index(state: &State) -> HashMap<String, String> {
    state.tenants.iter().flat_map(|(name, t)| t.keys.iter().map(move |k| (k.hash.clone(), name.clone()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent() -> Intent {
        Intent {
            actor: "test".into(),
            action: "test".into(),
            target: "test".into(),
            replica: "test".into(),
            request_id: None,
        }
    }

    fn update(d: &Directory, f: impl FnOnce(&mut State) + Send) {
        let (_, st) = futures::executor::block_on(d.commit(intent(), |s| {
            f(s);
            Ok::<_, StoreError>(())
        }))
        .unwrap();
        assert!(d.publish(st));
    }

    #[test]
    fn authentication() {
        let d = Directory::in_memory(Some("admin-secret"), false);
        assert_eq!(d.authenticate(None), Ok(Caller::Tenant(DEFAULT_TENANT.into())));
        assert_eq!(d.authenticate(Some("admin-secret")), Ok(Caller::Admin));
        // Open server: no tenant key exists, so any key acts like none (OpenAI SDKs always send one).
        assert_eq!(d.authenticate(Some("nope")), Ok(Caller::Tenant(DEFAULT_TENANT.into())));
        let (key, rec) = keys::generate().unwrap();
        update(&d, |s| s.tenants.entry("acme".into()).or_default().keys.push(rec));
        assert_eq!(d.authenticate(Some(&key)), Ok(Caller::Tenant("acme".into())));
        // Once a key exists, unknown keys fail loudly.
        assert_eq!(d.authenticate(Some("nope")), Err(AuthError::InvalidKey));
        assert!(d.is_tenant_key(&key) && !d.is_tenant_key("nope") && d.is_admin_key("admin-secret"));
        // ... and keep failing after the last key is revoked.
        update(&d, |s| s.tenants.clear());
        assert_eq!(d.authenticate(Some(&key)), Err(AuthError::InvalidKey));
        let strict = Directory::in_memory(None, true);
        assert_eq!(strict.authenticate(None), Err(AuthError::MissingKey));
        assert!(!strict.admin_enabled());
    }

    #[test]
    fn older_states_are_never_published_over_newer_ones() {
        let d = Directory::in_memory(None, false);
        update(&d, |s| {
            s.tenants.insert("a".into(), TenantRecord::default());
        });
        let newer = d.snapshot();
        let mut older = (*newer).clone();
        older.revision -= 1;
        older.tenants.clear();
        assert!(!d.publish(Arc::new(older)));
        assert_eq!(d.snapshot(), newer);
    }
}
