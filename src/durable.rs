//! Durable, private files: atomic replacement through uniquely named temporaries, owner-only
//! permissions, fsync of files and directories, append-only logs, and an exclusive lock on a
//! directory so that two processes never write the same state.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A suffix no other writer (process or thread) uses at the same time: pid, a process-wide
/// counter and random bits. Temporary names built from it never collide with a stale file left
/// by a crash, nor with a file an attacker placed beforehand (they are created exclusively).
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    format!("{}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed), hex::encode(r))
}

/// Creates `dir` (and parents) if needed; a directory created here is owner-only.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

fn private_options() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o
}

/// Replaces `path` with `bytes` atomically and durably: a new owner-only temporary beside it
/// (created exclusively, never through an existing file or symlink), fsync, rename, fsync of
/// the directory. A crash leaves the old or the new content, never a mix.
pub fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("path has no parent directory"))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.tmp", unique_suffix()));
    let written = (|| {
        let mut f = private_options().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Appends one line to an owner-only log file and syncs it.
pub fn append_line(path: &Path, line: &[u8]) -> std::io::Result<()> {
    let mut f = private_options().append(true).create(true).open(path)?;
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line);
    buf.push(b'\n');
    f.write_all(&buf)?;
    f.sync_data()
}

pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// An exclusive lock on a directory, held while this value lives (and released by the kernel
/// when the process dies, `kill -9` included).
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{dir} is in use by another lethe process{holder}: two servers must never share one state directory")]
    Held { dir: PathBuf, holder: String },
    #[error("cannot lock {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
}

impl DirLock {
    /// Takes the lock of `dir` (the file `dir/lock`), failing at once if someone holds it.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io { dir: dir.to_path_buf(), source };
        create_private_dir(dir).map_err(io)?;
        let path = dir.join("lock");
        let mut file = private_options().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    let holder = std::fs::read_to_string(&path).ok().map(|s| s.trim().to_string()).unwrap_or_default();
                    let holder = if holder.is_empty() { String::new() } else { format!(" ({holder})") };
                    return Err(LockError::Held { dir: dir.to_path_buf(), holder });
                }
                return Err(io(e));
            }
        }
        // Who holds it, for the message a second process prints.
        file.set_len(0).map_err(io)?;
        let _ = writeln!(file, "pid {}", std::process::id());
        Ok(Self { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::TempDir;

    #[test]
    fn replaced_files_are_private_and_temporaries_are_unique() {
        let tmp = TempDir::new("durable").unwrap();
        let path = tmp.path().join("state.json");
        // A stale temporary under the old fixed name, pointing elsewhere: never written through.
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&victim, tmp.path().join("state.json.tmp")).unwrap();
        replace(&path, b"one").unwrap();
        replace(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let names: Vec<String> =
            std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp") && n.starts_with(".state")), "{names:?}");
        assert_ne!(unique_suffix(), unique_suffix());
    }

    #[test]
    fn a_locked_directory_refuses_a_second_holder() {
        let tmp = TempDir::new("lock").unwrap();
        let first = DirLock::acquire(tmp.path()).unwrap();
        let e = DirLock::acquire(tmp.path()).unwrap_err();
        assert!(e.to_string().contains("in use by another lethe process"), "{e}");
        assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        DirLock::acquire(tmp.path()).unwrap();
    }
}
