//! The bytes of an adapter directory, read once, and the content-addressed copies of every
//! generation kept for rollback.
//!
//! An adapter is read through one handle on its directory and one `openat` per file, none of
//! them following symlinks, and everything after that (parsing, the content hash, the copy kept
//! for history) works on the bytes read: there is no check-then-reopen by name that a swap of
//! the directory between the two could turn into loading something else.
//!
//! [`Generations`] keeps each generation's files under its content hash (`<dir>/<generation>/`),
//! written once and never modified: replicas load a generation from there and verify the hash,
//! and a rollback finds the files of an earlier generation there even after the operator's
//! own directory has been overwritten.

use super::AdapterError;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub const CONFIG: &str = "adapter_config.json";
pub const WEIGHTS: &str = "adapter_model.safetensors";
pub const PROFILE: &str = "lethe.json";
const PICKLED: &str = "adapter_model.bin";

/// The files of one adapter, as read.
#[derive(Clone)]
pub struct AdapterFiles {
    pub config: Vec<u8>,
    pub weights: Vec<u8>,
    /// `lethe.json`, lethe's guidance profile, when there is one.
    pub profile: Option<Vec<u8>>,
}

impl std::fmt::Debug for AdapterFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterFiles")
            .field("config_bytes", &self.config.len())
            .field("weights_bytes", &self.weights.len())
            .field("profile_bytes", &self.profile.as_ref().map(Vec::len))
            .finish()
    }
}

impl AdapterFiles {
    /// Reads the adapter in `dir`, opening the directory once and each file relative to it.
    /// `dir` must be the canonical path (see [`super::AdapterRegistry::resolve`]): the opened
    /// directory is checked to still be that path, so a symlink swapped in after the path was
    /// resolved is refused rather than followed.
    pub fn read(dir: &Path) -> Result<Self, AdapterError> {
        let handle = DirHandle::open(dir)?;
        let config = handle
            .read(CONFIG)?
            .ok_or_else(|| AdapterError::Invalid(format!("cannot read {}: not found", dir.join(CONFIG).display())))?;
        let Some(weights) = handle.read(WEIGHTS)? else {
            return Err(AdapterError::Invalid(if handle.exists(PICKLED) {
                "only adapter_model.bin found: pickled weights are refused (they can run code); save with safetensors"
                    .into()
            } else {
                "adapter_model.safetensors is missing".into()
            }));
        };
        let profile = handle.read(PROFILE)?;
        Ok(Self { config, weights, profile })
    }

    /// The generation id: sha256 over the config, the weights and the profile (first 8 bytes,
    /// hex). Identical content, identical generation.
    pub fn content_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(&self.config);
        h.update(&self.weights);
        if let Some(p) = &self.profile {
            h.update(p);
        }
        hex::encode(&h.finalize()[..8])
    }

    /// Writes the files into a new directory `dir` (which must not exist), atomically: into a
    /// uniquely named sibling first, then renamed into place.
    fn write_new(&self, dir: &Path) -> std::io::Result<()> {
        let parent = dir.parent().ok_or_else(|| std::io::Error::other("generation directory has no parent"))?;
        std::fs::create_dir_all(parent)?;
        let tmp = parent.join(format!(
            ".{}.tmp-{}-{}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("gen"),
            std::process::id(),
            crate::durable::unique_suffix()
        ));
        std::fs::create_dir(&tmp)?;
        let write = || -> std::io::Result<()> {
            write_synced(&tmp.join(CONFIG), &self.config)?;
            write_synced(&tmp.join(WEIGHTS), &self.weights)?;
            if let Some(p) = &self.profile {
                write_synced(&tmp.join(PROFILE), p)?;
            }
            crate::durable::sync_dir(&tmp)?;
            std::fs::rename(&tmp, dir)?;
            crate::durable::sync_dir(parent)
        };
        let r = write();
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        r
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// The content-addressed copies of adapter generations: `<dir>/<generation>/`.
#[derive(Debug, Clone)]
pub struct Generations {
    dir: PathBuf,
}

impl Generations {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, generation: &str) -> PathBuf {
        self.dir.join(generation)
    }

    /// Keeps `files` as `generation`. A copy already there is kept if it still is that
    /// generation; one that was altered is moved aside (`.<generation>.altered-…`) and written
    /// again, so replicas never find a damaged copy of a generation just committed.
    pub fn keep(&self, generation: &str, files: &AdapterFiles) -> Result<PathBuf, AdapterError> {
        check_generation(generation)?;
        let path = self.path(generation);
        if path.is_dir() {
            match self.read(generation) {
                Ok(_) => return Ok(path),
                Err(e) => {
                    let aside = self.dir.join(format!(".{generation}.altered-{}", crate::durable::unique_suffix()));
                    tracing::warn!(generation, error = %e, aside = %aside.display(), "kept generation was altered: replacing it");
                    std::fs::rename(&path, &aside).map_err(|e| {
                        AdapterError::Invalid(format!("cannot move the altered copy of {generation} aside: {e}"))
                    })?;
                }
            }
        }
        match files.write_new(&path) {
            Ok(()) => Ok(path),
            // Another replica kept the same generation at the same moment: same content.
            Err(_) if path.is_dir() => Ok(path),
            Err(e) => {
                Err(AdapterError::Invalid(format!("cannot keep generation {generation} in {}: {e}", path.display())))
            }
        }
    }

    /// Reads `generation` and checks that its content still hashes to it.
    pub fn read(&self, generation: &str) -> Result<AdapterFiles, AdapterError> {
        check_generation(generation)?;
        let path = self.path(generation);
        if !path.is_dir() {
            return Err(AdapterError::NotFound(format!(
                "the files of generation {generation} are not kept in {}",
                self.dir.display()
            )));
        }
        let real = path.canonicalize().map_err(|e| AdapterError::NotFound(format!("{}: {e}", path.display())))?;
        let files = AdapterFiles::read(&real)?;
        verify(&files, generation, &path)?;
        Ok(files)
    }

    pub fn contains(&self, generation: &str) -> bool {
        check_generation(generation).is_ok() && self.path(generation).is_dir()
    }

    /// Deletes the files of `generation` (history pruning).
    pub fn remove(&self, generation: &str) -> std::io::Result<()> {
        check_generation(generation).map_err(|e| std::io::Error::other(e.to_string()))?;
        match std::fs::remove_dir_all(self.path(generation)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

/// Whether `files` are `generation`; the error names where they came from.
pub fn verify(files: &AdapterFiles, generation: &str, from: &Path) -> Result<(), AdapterError> {
    let actual = files.content_hash();
    if actual == generation {
        Ok(())
    } else {
        Err(AdapterError::HashMismatch { path: from.display().to_string(), expected: generation.into(), actual })
    }
}

/// Generations are hex content hashes; anything else is refused before it becomes a path.
fn check_generation(g: &str) -> Result<(), AdapterError> {
    if !g.is_empty() && g.len() <= 64 && g.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(AdapterError::Invalid(format!("invalid generation {g:?}: a hex content hash")))
    }
}

/// One open directory: files are opened relative to it and never through a symlink.
struct DirHandle {
    #[cfg(unix)]
    fd: std::os::fd::OwnedFd,
    #[cfg(not(unix))]
    path: PathBuf,
}

impl DirHandle {
    #[cfg(unix)]
    fn open(dir: &Path) -> Result<Self, AdapterError> {
        use std::os::fd::{FromRawFd, OwnedFd};
        use std::os::unix::ffi::OsStrExt;
        let not_found = || AdapterError::NotFound(dir.display().to_string());
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| not_found())?;
        // SAFETY: `c` is a valid NUL-terminated path; the returned descriptor is owned below.
        let fd =
            unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(not_found());
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // What was opened must be the resolved directory itself: an intermediate component
        // replaced by a symlink after resolution would land somewhere else.
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            if let Ok(opened) = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                && opened != dir
            {
                return Err(AdapterError::OutsideRoot(format!(
                    "{} changed while it was opened (now {})",
                    dir.display(),
                    opened.display()
                )));
            }
        }
        Ok(Self { fd })
    }

    #[cfg(not(unix))]
    fn open(dir: &Path) -> Result<Self, AdapterError> {
        if !dir.is_dir() {
            return Err(AdapterError::NotFound(dir.display().to_string()));
        }
        Ok(Self { path: dir.to_path_buf() })
    }

    /// The content of regular file `name` in the directory; `None` if there is no such entry.
    #[cfg(unix)]
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, AdapterError> {
        use std::io::Read;
        use std::os::fd::{AsRawFd, FromRawFd};
        let c = std::ffi::CString::new(name).expect("file names have no NUL");
        // SAFETY: a valid directory descriptor and a NUL-terminated relative name.
        let fd = unsafe {
            libc::openat(self.fd.as_raw_fd(), c.as_ptr(), libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(None),
                Some(libc::ELOOP) => Err(AdapterError::Invalid(format!("{name} is a symlink: refused"))),
                _ => Err(AdapterError::Invalid(format!("cannot read {name}: {e}"))),
            };
        }
        // SAFETY: `fd` was just opened and is owned by this File.
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        let meta = f.metadata().map_err(|e| AdapterError::Invalid(format!("cannot read {name}: {e}")))?;
        if !meta.is_file() {
            return Err(AdapterError::Invalid(format!("{name} is not a regular file")));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        f.read_to_end(&mut bytes).map_err(|e| AdapterError::Invalid(format!("cannot read {name}: {e}")))?;
        Ok(Some(bytes))
    }

    #[cfg(not(unix))]
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, AdapterError> {
        match std::fs::read(self.path.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AdapterError::Invalid(format!("cannot read {name}: {e}"))),
        }
    }

    #[cfg(unix)]
    fn exists(&self, name: &str) -> bool {
        use std::os::fd::AsRawFd;
        let c = std::ffi::CString::new(name).expect("file names have no NUL");
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: valid descriptor, NUL-terminated name, and a buffer for one stat.
        unsafe { libc::fstatat(self.fd.as_raw_fd(), c.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) == 0 }
    }

    #[cfg(not(unix))]
    fn exists(&self, name: &str) -> bool {
        self.path.join(name).exists()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::TempDir;

    fn files(seed: u8) -> AdapterFiles {
        AdapterFiles { config: vec![b'{', b'}'], weights: vec![seed; 64], profile: None }
    }

    #[test]
    fn generations_are_kept_once_and_verified_on_read() {
        let tmp = TempDir::new("gens").unwrap();
        let g = Generations::new(tmp.path().join("generations"));
        let f = files(1);
        let id = f.content_hash();
        let path = g.keep(&id, &f).unwrap();
        assert_eq!(g.keep(&id, &f).unwrap(), path);
        assert_eq!(g.read(&id).unwrap().weights, f.weights);
        // A kept generation whose bytes changed is refused, naming both hashes.
        std::fs::write(path.join(WEIGHTS), [9u8; 64]).unwrap();
        let e = g.read(&id).unwrap_err();
        assert!(matches!(e, AdapterError::HashMismatch { .. }), "{e}");
        assert!(e.to_string().contains(&id), "{e}");
        // Keeping it again repairs it (the altered copy is moved aside, not served).
        g.keep(&id, &f).unwrap();
        assert_eq!(g.read(&id).unwrap().weights, f.weights);
        let aside: Vec<_> = std::fs::read_dir(g.dir()).unwrap().filter_map(|e| e.ok()).collect();
        assert_eq!(aside.len(), 2, "the generation and the altered copy beside it");
        for e in aside.iter().filter(|e| e.file_name().to_string_lossy().contains("altered")) {
            std::fs::remove_dir_all(e.path()).unwrap();
        }
        g.remove(&id).unwrap();
        assert!(matches!(g.read(&id), Err(AdapterError::NotFound(_))));
        assert!(g.read("../etc").is_err() && g.remove("..").is_err());
        // No temporary directories left behind.
        assert_eq!(std::fs::read_dir(g.dir()).unwrap().count(), 0);
    }

    #[cfg(unix)]
    #[test]
    fn files_behind_symlinks_are_refused() {
        let tmp = TempDir::new("symlinked").unwrap();
        let dir = tmp.path().join("a");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(tmp.path().join("elsewhere.json"), b"{}").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("elsewhere.json"), dir.join(CONFIG)).unwrap();
        std::fs::write(dir.join(WEIGHTS), b"x").unwrap();
        let e = AdapterFiles::read(&dir.canonicalize().unwrap()).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        // A directory path that is itself a symlink is not followed either.
        std::fs::remove_file(dir.join(CONFIG)).unwrap();
        std::fs::write(dir.join(CONFIG), b"{}").unwrap();
        std::os::unix::fs::symlink(&dir, tmp.path().join("link")).unwrap();
        assert!(AdapterFiles::read(&tmp.path().join("link")).is_err());
        assert!(AdapterFiles::read(&dir.canonicalize().unwrap()).is_ok());
    }
}
