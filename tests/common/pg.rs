//! A throw-away PostgreSQL cluster for tests: `initdb` into a temporary directory, started on a
//! free loopback port with password authentication, stopped (and deleted) on drop. Uses the
//! server binaries of Debian's `postgresql` package (scripts/test.sh installs it); when run as
//! root, the cluster runs as the `postgres` user (PostgreSQL refuses to run as root).
//!
//! Without the binaries the tests that need them are skipped with a message, unless
//! `LETHE_REQUIRE_POSTGRES=1` (set by scripts/test.sh), which makes that a failure.
#![allow(dead_code)]

use lethe::fixtures::TempDir;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const USER: &str = "lethe";
/// Deliberately distinctive: tests check it never shows up in logs.
pub const PASSWORD: &str = "pg-Pa55word-never-logged";

pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    pub port: u16,
    /// (uid, gid) to run the server as, when we are root.
    run_as: Option<(u32, u32)>,
}

/// The directory with `initdb`, `pg_ctl` and `psql`.
fn binaries() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("LETHE_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    // Debian: /usr/lib/postgresql/<major>/bin, the newest major first.
    let mut majors: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect())
        .unwrap_or_default();
    majors.sort_by_key(|p| {
        p.parent().and_then(|m| m.file_name()).and_then(|n| n.to_str()).and_then(|n| n.parse::<u32>().ok())
    });
    if let Some(dir) = majors.pop() {
        return Some(dir);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    dir.join("initdb").exists().then_some(dir)
}

/// uid and gid of `name` from /etc/passwd.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name) && f.len() > 3).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Postgres {
    /// A new cluster, started; `None` (with a message) if PostgreSQL is not installed and not
    /// required.
    pub fn start() -> Option<Self> {
        let Some(bin) = binaries() else {
            if std::env::var("LETHE_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
                panic!("PostgreSQL server binaries not found: apt-get install postgresql (or set LETHE_PG_BIN)");
            }
            eprintln!("SKIPPED: PostgreSQL is not installed (apt-get install postgresql); these tests need it");
            return None;
        };
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let run_as = if root {
            Some(user_ids("postgres").expect("running as root needs a `postgres` user to run the cluster as"))
        } else {
            None
        };
        let dir = TempDir::new("pg").unwrap();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let pw = dir.path().join("pwfile");
        std::fs::write(&pw, PASSWORD).unwrap();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&pw, Some(uid), Some(gid)).unwrap();
        }
        let pg = Self { dir, bin, port: free_port(), run_as };
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                USER,
                "--pwfile",
                pw.to_str().unwrap(),
                "--auth",
                "scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale",
                "C",
            ],
        );
        pg.start_server();
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let mut c = Command::new(self.bin.join(tool));
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            c.uid(uid).gid(gid);
        }
        c.env("PGPASSWORD", PASSWORD).current_dir(self.dir.path());
        c
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let out = self.command(tool).args(args).output().unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts the server (again) on its port, waiting until it accepts connections.
    pub fn start_server(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=50",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        self.run(
            "pg_ctl",
            &["-D", self.data().to_str().unwrap(), "-o", &opts, "-l", log.to_str().unwrap(), "-w", "start"],
        );
    }

    /// Stops the server (fast: connections are closed, as when a database goes away).
    pub fn stop_server(&self) {
        self.run("pg_ctl", &["-D", self.data().to_str().unwrap(), "-m", "fast", "-w", "stop"]);
    }

    pub fn url(&self) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs SQL with psql; returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql).unwrap_or_else(|e| panic!("psql {sql:?}: {e}"))
    }

    /// As [`Self::psql`], returning the server's error instead of panicking.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let port = self.port.to_string();
        let out = self
            .command("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                USER,
                "-d",
                "postgres",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D", self.data().to_str().unwrap(), "-m", "immediate", "-w", "stop"])
            .output();
    }
}
