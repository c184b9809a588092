//! The state in one JSON file in the state directory (or in memory only), for one machine.
//!
//! A commit appends its audit entry to `audit.jsonl`, then replaces `state.json` atomically
//! (unique temporary, fsync, rename, fsync of the directory): the rename is the commit point. A
//! crash before it leaves an audit line for a revision the state never reached; such lines are
//! ignored when the log is read (and superseded by the next commit of that revision). A crash
//! at any moment leaves the old or the new state, never a mix. A file that cannot be read or
//! parsed stops start-up with the reason, rather than serving with a silently empty policy.
//!
//! The directory is locked for the life of the store: a second `lethe serve` on it refuses to
//! start. Files are owner-only (0600).

use super::{AdapterRecord, AuditEntry, Change, Intent, Notice, State, StateStore, StoreError, VERSION};
use crate::durable::{self, DirLock};
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const STATE: &str = "state.json";
const AUDIT: &str = "audit.jsonl";
/// Audit entries kept by a memory-only store.
const MEMORY_AUDIT: usize = 10_000;

pub struct FileStore {
    dir: Option<PathBuf>,
    _lock: Option<DirLock>,
    state: Mutex<State>,
    /// The audit log of a memory-only store.
    memory_audit: Mutex<Vec<AuditEntry>>,
}

impl FileStore {
    /// A store in memory only: lost on restart.
    pub fn memory() -> Self {
        Self { dir: None, _lock: None, state: Mutex::new(State::default()), memory_audit: Mutex::new(Vec::new()) }
    }

    /// Opens (and locks) the state directory `dir`, creating it if needed.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let lock = DirLock::acquire(dir)?;
        let state = read_state(&dir.join(STATE))?;
        Ok(Self {
            dir: Some(dir.to_path_buf()),
            _lock: Some(lock),
            state: Mutex::new(state),
            memory_audit: Mutex::new(Vec::new()),
        })
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn commit_now(&self, intent: Intent, change: Change<'_>) -> Result<Option<State>, StoreError> {
        let mut current = self.state.lock().expect("state lock");
        let mut next = current.clone();
        if !change(&mut next) {
            return Ok(None);
        }
        next.version = VERSION;
        next.revision = current.revision + 1;
        next.keyed |= next.has_keys();
        let entry = AuditEntry::new(next.revision, intent, &current, &next);
        match &self.dir {
            Some(dir) => {
                let err = |path: PathBuf| move |source| StoreError::Write { path, source };
                let line = serde_json::to_vec(&entry).expect("audit entries serialize");
                durable::append_line(&dir.join(AUDIT), &line).map_err(err(dir.join(AUDIT)))?;
                let bytes = serde_json::to_vec_pretty(&next).expect("state serializes");
                durable::replace(&dir.join(STATE), &bytes).map_err(err(dir.join(STATE)))?;
            }
            None => {
                let mut log = self.memory_audit.lock().expect("audit lock");
                if log.len() >= MEMORY_AUDIT {
                    log.remove(0);
                }
                log.push(entry);
            }
        }
        *current = next.clone();
        Ok(Some(next))
    }

    fn read_audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let committed = self.state.lock().expect("state lock").revision;
        let Some(dir) = &self.dir else {
            let log = self.memory_audit.lock().expect("audit lock");
            return Ok(log.iter().filter(|e| e.revision > after).take(limit).cloned().collect());
        };
        let path = dir.join(AUDIT);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        // The last line of a revision wins (an earlier one belongs to a commit that crashed
        // before its rename); revisions past the committed one never happened. A torn last
        // line (a crash mid-append) does not parse and is skipped.
        let mut by_revision = BTreeMap::new();
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            if let Ok(e) = serde_json::from_slice::<AuditEntry>(line)
                && e.revision <= committed
            {
                by_revision.insert(e.revision, e);
            }
        }
        Ok(by_revision.into_values().filter(|e| e.revision > after).take(limit).collect())
    }
}

impl StateStore for FileStore {
    fn describe(&self) -> String {
        match &self.dir {
            Some(d) => format!("files in {}", d.display()),
            None => "memory (not persisted)".into(),
        }
    }

    fn is_persistent(&self) -> bool {
        self.dir.is_some()
    }

    fn is_shared(&self) -> bool {
        false
    }

    fn load(&self) -> BoxFuture<'_, Result<State, StoreError>> {
        let s = self.state.lock().expect("state lock").clone();
        Box::pin(async move { Ok(s) })
    }

    fn commit<'a>(&'a self, intent: Intent, change: Change<'a>) -> BoxFuture<'a, Result<Option<State>, StoreError>> {
        let r = self.commit_now(intent, change);
        Box::pin(async move { r })
    }

    fn audit(&self, after: u64, limit: usize) -> BoxFuture<'_, Result<Vec<AuditEntry>, StoreError>> {
        let r = self.read_audit(after, limit);
        Box::pin(async move { r })
    }

    fn listen(&self) -> BoxFuture<'_, Result<Option<tokio::sync::mpsc::UnboundedReceiver<Notice>>, StoreError>> {
        Box::pin(async { Ok(None) })
    }
}

/// Reads the state file (empty state if there is none yet), upgrading the version 1 format.
fn read_state(path: &Path) -> Result<State, StoreError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
        Err(source) => return Err(StoreError::Read { path: path.to_path_buf(), source }),
    };
    let corrupt = |reason: String| StoreError::Corrupt { path: path.to_path_buf(), reason };
    let value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(1) => upgrade_v1(value).map_err(corrupt),
        Some(v) if v == u64::from(VERSION) => serde_json::from_value(value).map_err(|e| corrupt(e.to_string())),
        other => Err(corrupt(format!("unknown version {other:?}"))),
    }
}

/// Version 1: `adapters` maps names to paths, without generations (recorded at start-up, see
/// `ControlPlane::restore`).
fn upgrade_v1(mut v: serde_json::Value) -> Result<State, String> {
    let adapters: BTreeMap<String, String> =
        serde_json::from_value(v["adapters"].take()).map_err(|e| format!("adapters: {e}"))?;
    v["adapters"] = serde_json::json!({});
    v["version"] = serde_json::json!(VERSION);
    let mut state: State = serde_json::from_value(v).map_err(|e| e.to_string())?;
    for (name, path) in adapters {
        let record = AdapterRecord { generation: String::new(), path, updated_at: 0, updated_by: "upgrade".into() };
        state.adapters.insert(name, record);
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::TenantRecord;

    fn intent(action: &str) -> Intent {
        Intent {
            actor: "test".into(),
            action: action.into(),
            target: "tenant/acme".into(),
            replica: "r".into(),
            request_id: None,
        }
    }

    fn commit(store: &FileStore, f: impl FnOnce(&mut State) -> bool + Send) -> Option<State> {
        futures::executor::block_on(store.commit(intent("t"), Box::new(f))).unwrap()
    }

    #[test]
    fn round_trip_revisions_audit_and_corruption() {
        let dir = crate::fixtures::TempDir::new("store").unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let s0 = futures::executor::block_on(store.load()).unwrap();
        assert_eq!((s0.tenants.len(), s0.revision), (0, 0));
        let s1 = commit(&store, |s| {
            s.tenants.insert("acme".into(), TenantRecord::default());
            true
        })
        .unwrap();
        assert_eq!(s1.revision, 1);
        // A change that refuses itself writes nothing.
        assert!(
            commit(&store, |s| {
                s.tenants.clear();
                false
            })
            .is_none()
        );
        drop(store);
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(futures::executor::block_on(store.load()).unwrap(), s1);
        let audit = futures::executor::block_on(store.audit(0, 10)).unwrap();
        assert_eq!(audit.len(), 1);
        assert_eq!((audit[0].revision, audit[0].intent.actor.as_str()), (1, "test"));
        assert_eq!(audit[0].before["tenants"]["acme"], serde_json::Value::Null);
        assert!(audit[0].after["tenants"]["acme"]["policy"].is_object());
        #[cfg(unix)]
        for f in [STATE, AUDIT, "lock"] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        drop(store);
        std::fs::write(dir.path().join(STATE), b"{\"version\": 2, \"tenants\": {\"x\": ").unwrap();
        let e = FileStore::open(dir.path()).err().unwrap();
        assert!(e.to_string().contains("corrupt"), "{e}");
    }

    #[test]
    fn audit_lines_of_commits_that_never_happened_are_ignored() {
        let dir = crate::fixtures::TempDir::new("store-audit").unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        commit(&store, |_| true).unwrap();
        // A crash after the audit append of revision 2 but before its rename, and a torn line.
        let mut ghost = AuditEntry::new(2, intent("ghost"), &State::default(), &State::default());
        ghost.intent.action = "ghost".into();
        durable::append_line(&dir.path().join(AUDIT), &serde_json::to_vec(&ghost).unwrap()).unwrap();
        durable::append_line(&dir.path().join(AUDIT), b"{\"revision\": 3, \"at_").unwrap();
        let actions = |s: &FileStore| -> Vec<String> {
            futures::executor::block_on(s.audit(0, 10)).unwrap().into_iter().map(|e| e.intent.action).collect()
        };
        assert_eq!(actions(&store), ["t"]);
        commit(&store, |_| true).unwrap();
        assert_eq!(actions(&store), ["t", "t"]);
    }

    #[test]
    fn version_1_files_are_upgraded() {
        let dir = crate::fixtures::TempDir::new("store-v1").unwrap();
        std::fs::write(
            dir.path().join(STATE),
            r#"{"version": 1, "adapters": {"pii": "pii-v1"}, "tenants": {"acme": {"policy": {"adapters": ["pii"]}}}, "keyed": true}"#,
        )
        .unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let s = futures::executor::block_on(store.load()).unwrap();
        assert_eq!((s.adapters["pii"].path.as_str(), s.adapters["pii"].generation.as_str()), ("pii-v1", ""));
        assert!(s.keyed && s.tenants["acme"].policy.adapters == ["pii"]);
    }

    #[test]
    fn a_second_store_on_the_same_directory_is_refused() {
        let dir = crate::fixtures::TempDir::new("store-lock").unwrap();
        let _first = FileStore::open(dir.path()).unwrap();
        let e = FileStore::open(dir.path()).err().unwrap();
        assert!(matches!(e, StoreError::Locked(_)), "{e}");
    }
}
