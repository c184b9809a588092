//! The control-plane state that must survive a restart and that replicas share — adapters (name
//! → generation and path, with the history of every generation), tenant policies, key hashes —
//! and the one interface behind which it is kept: [`StateStore`].
//!
//! Two implementations:
//! - [`FileStore`] ([`file`](mod@file)): one JSON file in the state directory (or memory only), for one
//!   machine; the embedded default;
//! - [`PgStore`] ([`postgres`]): PostgreSQL, shared by any number of replicas, which follow it
//!   through LISTEN/NOTIFY and a periodic full reconcile.
//!
//! Every change is a *commit*: the change is applied to the store's current state (not to a
//! replica's possibly stale copy), written with one audit entry in one transaction, and only
//! then returned. The revision goes up by one with every commit, so a replica applies a state
//! only when it is newer than the one it serves.

pub mod file;
pub mod postgres;

pub use file::FileStore;
pub use postgres::PgStore;

use super::keys::KeyRecord;
use super::policy::TenantPolicy;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Version of the state file's format (1: adapters as name → path, no revision or history).
pub const VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub version: u32,
    /// Bumped by every commit.
    #[serde(default)]
    pub revision: u64,
    /// The current generation of each adapter name.
    pub adapters: BTreeMap<String, AdapterRecord>,
    pub tenants: BTreeMap<String, TenantRecord>,
    /// Set for good once the first tenant API key exists: from then on an unknown key is
    /// rejected, even after every key is revoked (a revoked key must not start working again
    /// as anonymous). See [`super::Directory::authenticate`].
    #[serde(default)]
    pub keyed: bool,
    /// Every generation ever made current under each adapter name, oldest first. Kept after an
    /// unload: the audit trail of what a tenant was served.
    #[serde(default)]
    pub history: BTreeMap<String, Vec<GenerationRecord>>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            version: VERSION,
            revision: 0,
            adapters: BTreeMap::new(),
            tenants: BTreeMap::new(),
            keyed: false,
            history: BTreeMap::new(),
        }
    }
}

impl State {
    pub fn has_keys(&self) -> bool {
        self.tenants.values().any(|t| !t.keys.is_empty())
    }

    /// Records that `record` became the current generation of `name` (load, replace, rollback).
    /// Called inside a commit, whose revision will be this state's plus one.
    pub fn make_current(&mut self, name: &str, record: AdapterRecord, profile: Option<Value>) {
        let revision = self.revision + 1;
        let history = self.history.entry(name.to_string()).or_default();
        match history.iter_mut().find(|g| g.generation == record.generation) {
            Some(g) => {
                g.last_current_at = record.updated_at;
                g.last_current_revision = revision;
            }
            None => history.push(GenerationRecord {
                generation: record.generation.clone(),
                path: record.path.clone(),
                profile,
                first_loaded_at: record.updated_at,
                loaded_by: record.updated_by.clone(),
                last_current_at: record.updated_at,
                last_current_revision: revision,
            }),
        }
        self.adapters.insert(name.to_string(), record);
    }

    /// The generations whose files are worth keeping: for each name, the `keep` most recently
    /// current ones (the current one always among them).
    pub fn generations_to_keep(&self, keep: usize) -> std::collections::BTreeSet<String> {
        let mut out: std::collections::BTreeSet<String> =
            self.adapters.values().map(|a| a.generation.clone()).collect();
        for history in self.history.values() {
            let mut by_recency: Vec<&GenerationRecord> = history.iter().collect();
            by_recency.sort_by_key(|g| std::cmp::Reverse(g.last_current_revision));
            out.extend(by_recency.into_iter().take(keep).map(|g| g.generation.clone()));
        }
        out
    }

    /// What an audit entry shows of a tenant: its policy and key ids (never key hashes).
    fn tenant_view(&self, name: &str) -> Value {
        match self.tenants.get(name) {
            Some(t) => json!({ "policy": t.policy, "keys": t.keys.iter().map(|k| &k.id).collect::<Vec<_>>() }),
            None => Value::Null,
        }
    }

    /// The parts of `self` that differ in `next`: `(before, after)` as
    /// `{"tenants": {name: view|null}, "adapters": {name: record|null}, "keyed": …}`.
    pub fn changes(&self, next: &State) -> (Value, Value) {
        let (mut before, mut after) = (json!({}), json!({}));
        let names = |a: &BTreeMap<String, TenantRecord>, b: &BTreeMap<String, TenantRecord>| {
            a.keys().chain(b.keys()).cloned().collect::<std::collections::BTreeSet<_>>()
        };
        let mut tb = serde_json::Map::new();
        let mut ta = serde_json::Map::new();
        for name in names(&self.tenants, &next.tenants) {
            if self.tenants.get(&name) != next.tenants.get(&name) {
                tb.insert(name.clone(), self.tenant_view(&name));
                ta.insert(name.clone(), next.tenant_view(&name));
            }
        }
        let mut ab = serde_json::Map::new();
        let mut aa = serde_json::Map::new();
        for name in self.adapters.keys().chain(next.adapters.keys()) {
            if self.adapters.get(name) != next.adapters.get(name) {
                ab.insert(name.clone(), serde_json::to_value(self.adapters.get(name)).unwrap_or(Value::Null));
                aa.insert(name.clone(), serde_json::to_value(next.adapters.get(name)).unwrap_or(Value::Null));
            }
        }
        if !tb.is_empty() {
            before["tenants"] = Value::Object(tb);
            after["tenants"] = Value::Object(ta);
        }
        if !ab.is_empty() {
            before["adapters"] = Value::Object(ab);
            after["adapters"] = Value::Object(aa);
        }
        if self.keyed != next.keyed {
            before["keyed"] = json!(self.keyed);
            after["keyed"] = json!(next.keyed);
        }
        (before, after)
    }
}

/// The current generation of an adapter name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterRecord {
    /// Content hash of the files (see [`crate::adapters::AdapterFiles::content_hash`]); empty
    /// only for a state written by a version that did not record it (upgraded at start-up).
    pub generation: String,
    /// The path the operator gave (relative to the adapters root, or absolute).
    pub path: String,
    /// When it became current (unix seconds) and by whom (the audit actor).
    pub updated_at: u64,
    pub updated_by: String,
}

/// One generation ever made current under a name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationRecord {
    pub generation: String,
    pub path: String,
    /// Its guidance profile (`lethe.json`), if it had one.
    #[serde(default)]
    pub profile: Option<Value>,
    pub first_loaded_at: u64,
    pub loaded_by: String,
    pub last_current_at: u64,
    /// The revision at which it last became current (orders generations by recency).
    #[serde(default)]
    pub last_current_revision: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantRecord {
    pub policy: TenantPolicy,
    #[serde(default)]
    pub keys: Vec<KeyRecord>,
}

/// Who asks for a change, and what it is, for the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intent {
    /// Who: the admin caller's declared identity (`X-Lethe-Actor`), else `admin`.
    pub actor: String,
    /// What, e.g. `tenant.put`, `key.create`, `adapter.load`, `adapter.rollback`.
    pub action: String,
    /// On what, e.g. `tenant/acme`, `adapter/pii`.
    pub target: String,
    /// The replica that made the change.
    pub replica: String,
    pub request_id: Option<String>,
}

/// One entry of the append-only audit log: one per commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// The revision the change committed as.
    pub revision: u64,
    /// Unix time in milliseconds.
    pub at_ms: u64,
    #[serde(flatten)]
    pub intent: Intent,
    pub before: Value,
    pub after: Value,
}

impl AuditEntry {
    pub fn new(revision: u64, intent: Intent, old: &State, new: &State) -> Self {
        let (before, after) = old.changes(new);
        Self { revision, at_ms: unix_ms(), intent, before, after }
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub fn unix_secs() -> u64 {
    unix_ms() / 1000
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read state file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("state file {path} is corrupt: {reason} (fix or remove it; lethe will not start with a partial policy)")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write state to {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Locked(#[from] crate::durable::LockError),
    /// The shared store cannot be reached (connection refused, lost, timed out): retryable.
    #[error("the state store is unreachable: {0}")]
    Unavailable(String),
    /// The store answered with an error (a bug, a schema mismatch, a constraint).
    #[error("state store error: {0}")]
    Database(String),
}

/// A change to apply to the store's current state: returns whether to commit it (`false`:
/// the change was refused, nothing is written). Called at most once.
pub type Change<'a> = Box<dyn FnOnce(&mut State) -> bool + Send + 'a>;

/// Where the control-plane state lives.
pub trait StateStore: Send + Sync {
    /// What and where, for logs and errors (never a password).
    fn describe(&self) -> String;

    /// Whether the state survives a restart.
    fn is_persistent(&self) -> bool;

    /// Whether other replicas share this store (and so must be followed, see [`Self::listen`]).
    fn is_shared(&self) -> bool;

    /// The current state, as committed.
    fn load(&self) -> BoxFuture<'_, Result<State, StoreError>>;

    /// Applies `change` to the current state and commits it with its audit entry, in one
    /// transaction; returns the committed state (`None` if the change refused itself).
    fn commit<'a>(&'a self, intent: Intent, change: Change<'a>) -> BoxFuture<'a, Result<Option<State>, StoreError>>;

    /// Audit entries with a revision above `after`, oldest first, at most `limit`.
    fn audit(&self, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<AuditEntry>, StoreError>>;

    /// For a shared store: a stream of the revisions others commit, ending when the connection
    /// is lost (the caller reconnects). `None` for a store nobody else writes.
    fn listen(&self) -> BoxFuture<'_, Result<Option<tokio::sync::mpsc::UnboundedReceiver<Notice>>, StoreError>>;
}

/// A commit announced by a shared store.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Notice {
    pub revision: u64,
    /// When it committed (the database's clock, unix milliseconds).
    pub committed_at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_show_only_what_changed_and_never_key_hashes() {
        let mut a = State::default();
        a.tenants.insert("keep".into(), TenantRecord::default());
        let mut b = a.clone();
        let (_, rec) = crate::tenants::keys::generate().unwrap();
        b.tenants.insert("new".into(), TenantRecord { keys: vec![rec.clone()], ..Default::default() });
        b.keyed = true;
        let (before, after) = a.changes(&b);
        assert_eq!(before["tenants"]["new"], Value::Null);
        assert_eq!(after["tenants"]["new"]["keys"][0], rec.id.as_str());
        assert!(after["tenants"].get("keep").is_none());
        assert!(!after.to_string().contains(&rec.hash), "{after}");
        assert_eq!(after["keyed"], true);
    }

    #[test]
    fn history_records_each_generation_once_and_keeps_the_most_recent() {
        let mut s = State::default();
        let rec = |g: &str, t: u64| AdapterRecord {
            generation: g.into(),
            path: format!("p-{g}"),
            updated_at: t,
            updated_by: "ops".into(),
        };
        for (g, t) in [("a1", 1), ("b2", 1), ("c3", 1), ("a1", 1)] {
            s.make_current("pii", rec(g, t), None);
            s.revision += 1;
        }
        let h = &s.history["pii"];
        assert_eq!(h.iter().map(|g| g.generation.as_str()).collect::<Vec<_>>(), ["a1", "b2", "c3"]);
        assert_eq!((h[0].last_current_revision, h[1].last_current_revision, h[2].last_current_revision), (4, 2, 3));
        assert_eq!(s.adapters["pii"].generation, "a1");
        let keep = s.generations_to_keep(2);
        assert!(keep.contains("a1") && keep.contains("c3") && !keep.contains("b2"), "{keep:?}");
    }
}
