//! The adapters in memory: load, replace and unload at run time without disturbing anyone.
//!
//! Every loaded version has an immutable *generation* (its content hash). A request takes a
//! *lease* on the versions it uses (an `Arc`) when it starts and keeps them to its end, so
//! replacing or unloading an adapter never changes an answer in flight; a version's memory is
//! released when its last lease ends. Limits on count, rank and bytes keep the server's memory
//! bounded.

use super::AdapterError;
use super::files::AdapterFiles;
use super::peft::{self, GuidanceProfile};
use crate::model::Llama;
use crate::model::lora::LoraWeights;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};

/// One loaded version of an adapter.
pub struct LoadedAdapter {
    pub name: String,
    /// Content hash of the files: identical content, identical generation.
    pub generation: String,
    pub path: PathBuf,
    pub weights: Arc<LoraWeights>,
    pub rank: usize,
    pub modules: usize,
    pub profile: Option<GuidanceProfile>,
    pub base_model: Option<String>,
    pub loaded_at: u64,
}

impl std::fmt::Debug for LoadedAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedAdapter")
            .field("name", &self.name)
            .field("generation", &self.generation)
            .field("path", &self.path)
            .field("rank", &self.rank)
            .field("bytes", &self.weights.bytes)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AdapterLimits {
    pub max_adapters: usize,
    pub max_rank: usize,
    /// Total bytes of all loaded adapters.
    pub max_bytes: usize,
}

impl Default for AdapterLimits {
    fn default() -> Self {
        Self { max_adapters: 32, max_rank: 128, max_bytes: 2 << 30 }
    }
}

/// What `GET /admin/adapters` shows of an adapter.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterInfo {
    pub name: String,
    pub generation: String,
    pub path: String,
    pub rank: usize,
    pub modules: usize,
    pub bytes: usize,
    pub profile: Option<GuidanceProfile>,
    pub base_model: Option<String>,
    pub loaded_at: u64,
    /// Requests currently holding this generation.
    pub leases: usize,
}

pub struct AdapterRegistry {
    model: Arc<Llama>,
    root: Option<PathBuf>,
    limits: AdapterLimits,
    entries: RwLock<BTreeMap<String, Arc<LoadedAdapter>>>,
    /// Weights of generations replaced or unloaded while leased (requests hold the weights), to
    /// report the memory they still hold.
    retired: Mutex<Vec<Weak<LoraWeights>>>,
}

impl AdapterRegistry {
    /// `root`: when given, adapter paths must resolve inside it (symlinks included).
    pub fn new(model: Arc<Llama>, root: Option<PathBuf>, limits: AdapterLimits) -> Result<Self, AdapterError> {
        let root = match root {
            Some(r) => Some(
                r.canonicalize().map_err(|e| {
                    AdapterError::NotFound(format!(
                        "--adapters-root {:?} cannot be used ({e}): create the directory, or point it at the one holding your PEFT adapters",
                        r.display().to_string()
                    ))
                })?,
            ),
            None => None,
        };
        Ok(Self { model, root, limits, entries: RwLock::new(BTreeMap::new()), retired: Mutex::new(Vec::new()) })
    }

    /// The adapter path, resolved: relative paths are taken inside the root, and the result must
    /// stay inside it.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, AdapterError> {
        let p = Path::new(path);
        let joined = match (&self.root, p.is_absolute()) {
            (Some(root), false) => root.join(p),
            _ => p.to_path_buf(),
        };
        let real = joined.canonicalize().map_err(|_| AdapterError::NotFound(path.to_string()))?;
        if let Some(root) = &self.root
            && !real.starts_with(root)
        {
            return Err(AdapterError::OutsideRoot(path.to_string()));
        }
        Ok(real)
    }

    /// Loads (or with `replace`, reloads) `name` from `path`. Blocking: reads and converts files.
    pub fn load(&self, name: &str, path: &str, replace: bool) -> Result<Arc<LoadedAdapter>, AdapterError> {
        if !replace && self.get(name).is_some() {
            return Err(AdapterError::Exists(name.to_string()));
        }
        let (loaded, _) = self.prepare(name, path)?;
        if !replace && self.get(name).is_some() {
            return Err(AdapterError::Exists(name.to_string()));
        }
        self.install(loaded.clone())?;
        Ok(loaded)
    }

    /// Reads, validates and packs the adapter at `path` (inside the root) as `name`, without
    /// installing it; also returns the files read, to keep them as this generation. Blocking.
    pub fn prepare(&self, name: &str, path: &str) -> Result<(Arc<LoadedAdapter>, AdapterFiles), AdapterError> {
        check_name(name)?;
        let dir = self.resolve(path)?;
        let files = AdapterFiles::read(&dir)?;
        let loaded = self.prepare_files(name, dir, &files)?;
        Ok((loaded, files))
    }

    /// Validates and packs adapter files already read (e.g. a kept generation) as `name`.
    pub fn prepare_files(
        &self,
        name: &str,
        path: PathBuf,
        files: &AdapterFiles,
    ) -> Result<Arc<LoadedAdapter>, AdapterError> {
        check_name(name)?;
        let a = peft::parse(files, &self.model)?;
        if a.rank > self.limits.max_rank {
            return Err(AdapterError::Limit(format!("rank {} exceeds the limit of {}", a.rank, self.limits.max_rank)));
        }
        Ok(Arc::new(LoadedAdapter {
            name: name.to_string(),
            generation: a.content_hash,
            path,
            rank: a.rank,
            modules: a.modules,
            profile: a.profile,
            base_model: a.base_model,
            loaded_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            weights: Arc::new(a.weights),
        }))
    }

    /// Whether installing `adapter` (replacing any current version of its name) stays within
    /// the count and memory limits.
    pub fn check_fits(&self, adapter: &LoadedAdapter) -> Result<(), AdapterError> {
        let entries = self.entries.read().expect("registry lock");
        self.fits(&entries, adapter)
    }

    fn fits(
        &self,
        entries: &BTreeMap<String, Arc<LoadedAdapter>>,
        adapter: &LoadedAdapter,
    ) -> Result<(), AdapterError> {
        let name = &adapter.name;
        let count = entries.len() + usize::from(!entries.contains_key(name));
        if count > self.limits.max_adapters {
            return Err(AdapterError::Limit(format!("at most {} adapters can be loaded", self.limits.max_adapters)));
        }
        let bytes: usize = entries.values().filter(|e| &e.name != name).map(|e| e.weights.bytes).sum::<usize>()
            + adapter.weights.bytes;
        if bytes > self.limits.max_bytes {
            return Err(AdapterError::Limit(format!(
                "loading {name} would hold {bytes} bytes of adapters, over the limit of {}",
                self.limits.max_bytes
            )));
        }
        Ok(())
    }

    /// Makes `adapter` the current version of its name; requests holding the version it
    /// replaces keep their lease. Returns that replaced version.
    pub fn install(&self, adapter: Arc<LoadedAdapter>) -> Result<Option<Arc<LoadedAdapter>>, AdapterError> {
        let mut entries = self.entries.write().expect("registry lock");
        self.fits(&entries, &adapter)?;
        let replaced = entries.insert(adapter.name.clone(), adapter);
        drop(entries);
        if let Some(old) = &replaced {
            self.retire(old.clone());
        }
        Ok(replaced)
    }

    /// Puts back a version replaced by a change that could not be persisted.
    pub fn restore(&self, old: Arc<LoadedAdapter>) {
        self.entries.write().expect("registry lock").insert(old.name.clone(), old);
    }

    /// Unloads `name`; requests holding it keep their lease until they finish.
    pub fn unload(&self, name: &str) -> Result<Arc<LoadedAdapter>, AdapterError> {
        let old = self
            .entries
            .write()
            .expect("registry lock")
            .remove(name)
            .ok_or_else(|| AdapterError::UnknownAdapter(name.to_string()))?;
        self.retire(old.clone());
        Ok(old)
    }

    fn retire(&self, old: Arc<LoadedAdapter>) {
        let mut retired = self.retired.lock().expect("retired lock");
        retired.retain(|w| w.strong_count() > 0);
        retired.push(Arc::downgrade(&old.weights));
    }

    /// A lease on the current generation of `name`.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedAdapter>> {
        self.entries.read().expect("registry lock").get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.read().expect("registry lock").keys().cloned().collect()
    }

    pub fn list(&self) -> Vec<AdapterInfo> {
        self.entries.read().expect("registry lock").values().map(info).collect()
    }

    /// Bytes held by loaded adapters, and by replaced or unloaded generations still leased.
    pub fn bytes(&self) -> (usize, usize) {
        let loaded = self.entries.read().expect("registry lock").values().map(|a| a.weights.bytes).sum();
        let retired =
            self.retired.lock().expect("retired lock").iter().filter_map(Weak::upgrade).map(|w| w.bytes).sum();
        (loaded, retired)
    }
}

pub fn info(a: &Arc<LoadedAdapter>) -> AdapterInfo {
    AdapterInfo {
        name: a.name.clone(),
        generation: a.generation.clone(),
        path: a.path.display().to_string(),
        rank: a.rank,
        modules: a.modules,
        bytes: a.weights.bytes,
        profile: a.profile.clone(),
        base_model: a.base_model.clone(),
        loaded_at: a.loaded_at,
        // The registry's own reference is not a lease.
        leases: Arc::strong_count(&a.weights).saturating_sub(1),
    }
}

/// Adapter names are path-free identifiers (they appear in URLs, metrics and model ids).
pub fn check_name(name: &str) -> Result<(), AdapterError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(AdapterError::Invalid(format!(
            "invalid adapter name {name:?}: 1-64 characters from A-Z a-z 0-9 - _ . (not starting with a dot)"
        )))
    }
}
