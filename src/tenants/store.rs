//! The control-plane state that must survive a restart — loaded adapters (name → path), tenant
//! policies, key hashes — in one JSON file in the state directory.
//!
//! Every change is written atomically before it is acknowledged: a temporary file, fsync, rename
//! over the old one, fsync of the directory. A crash at any moment leaves either the old or the
//! new state, never a mix. A file that cannot be read or parsed stops start-up with the reason,
//! rather than serving with a silently empty policy.

use super::keys::KeyRecord;
use super::policy::TenantPolicy;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

const FILE: &str = "state.json";
const VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub version: u32,
    /// Adapters to load at start-up: name → path as given to the admin API.
    pub adapters: BTreeMap<String, String>,
    pub tenants: BTreeMap<String, TenantRecord>,
    /// Set for good once the first tenant API key exists: from then on an unknown key is
    /// rejected, even after every key is revoked (a revoked key must not start working again
    /// as anonymous). See [`super::Directory::authenticate`].
    #[serde(default)]
    pub keyed: bool,
}

impl State {
    pub fn has_keys(&self) -> bool {
        self.tenants.values().any(|t| !t.keys.is_empty())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantRecord {
    pub policy: TenantPolicy,
    #[serde(default)]
    pub keys: Vec<KeyRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read state file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("state file {path} is corrupt: {reason} (fix or remove it; lethe will not start with a partial policy)")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write state to {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Where the state lives; `None` keeps it in memory only (lost on restart).
#[derive(Debug, Clone)]
pub struct Store {
    dir: Option<PathBuf>,
}

impl Store {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    pub fn is_persistent(&self) -> bool {
        self.dir.is_some()
    }

    /// Reads the state (empty if there is none yet).
    pub fn load(&self) -> Result<State, StoreError> {
        let Some(dir) = &self.dir else {
            return Ok(State { version: VERSION, ..Default::default() });
        };
        let path = dir.join(FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State { version: VERSION, ..Default::default() });
            }
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let state: State = serde_json::from_slice(&text)
            .map_err(|e| StoreError::Corrupt { path: path.clone(), reason: e.to_string() })?;
        if state.version != VERSION {
            return Err(StoreError::Corrupt { path, reason: format!("unknown version {}", state.version) });
        }
        Ok(state)
    }

    /// Writes `state` atomically and durably.
    pub fn save(&self, state: &State) -> Result<(), StoreError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let path = dir.join(FILE);
        let err = |source| StoreError::Write { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = dir.join(format!("{FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(state).expect("state serializes");
        {
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            f.write_all(&bytes).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, &path).map_err(err)?;
        sync_dir(dir).map_err(err)?;
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = crate::fixtures::TempDir::new("store").unwrap();
        let store = Store::new(Some(dir.path().to_path_buf()));
        assert_eq!(store.load().unwrap().tenants.len(), 0);
        let mut s = store.load().unwrap();
        s.adapters.insert("pii".into(), "/a/b".into());
        s.tenants.insert("acme".into(), TenantRecord::default());
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), s);
        std::fs::write(dir.path().join(FILE), b"{\"version\": 1, \"tenants\": {\"x\": ").unwrap();
        let e = store.load().unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
}
