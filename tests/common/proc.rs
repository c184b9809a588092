//! `lethe serve` as a real process (the release binary), for tests that kill, restart or run
//! several replicas: spawned on a free port, its log captured, its address read from the log.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Lethe {
    pub child: Child,
    pub base: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// Starts `lethe serve --host 127.0.0.1 --port 0 --threads 1 <args>` with `env`, and waits until
/// it says where it listens. `Err(log)` if it exits first.
pub fn spawn(args: &[String], env: &[(&str, String)]) -> Result<Lethe, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lethe"));
    cmd.args(["serve", "--host", "127.0.0.1", "--port", "0", "--threads", "1"])
        .args(args)
        .env("RUST_LOG", "warn,lethe=info")
        .env("NO_COLOR", "1")
        .env_remove("LETHE_ADMIN_KEY")
        .env_remove("LETHE_STATE_STORE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn lethe");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let log2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("serving on http://") {
                let url = line[i + "serving on ".len()..].split_whitespace().next().unwrap_or("").to_string();
                let _ = tx.send(url);
            }
            log2.lock().unwrap().push(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(url) = rx.recv_timeout(Duration::from_millis(100)) {
            return Ok(Lethe { child, base: url, log });
        }
        if let Some(status) = child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(200));
            return Err(format!("exited with {status}: {}", log.lock().unwrap().join("\n")));
        }
        assert!(Instant::now() < deadline, "lethe did not start: {}", log.lock().unwrap().join("\n"));
    }
}

impl Lethe {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Lethe {
    fn drop(&mut self) {
        self.kill();
        // A failing test shows what its servers said (libtest prints this with the failure).
        if std::thread::panicking() {
            eprintln!("---- log of lethe at {} ----\n{}", self.base, self.log_text());
        }
    }
}

/// An HTTP call with an optional bearer key and JSON body; `Err` if the server cannot be reached.
pub async fn call(
    base: &str,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), reqwest::Error> {
    call_as(base, key, None, method, path, body).await
}

/// As [`call`], declaring `actor` for the audit log.
pub async fn call_as(
    base: &str,
    key: Option<&str>,
    actor: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), reqwest::Error> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let mut r = client.request(method, format!("{base}{path}"));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(a) = actor {
        r = r.header("x-lethe-actor", a);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// Polls `check` every few milliseconds until it is true; returns how long that took, or
/// panics with `what` after `limit`.
pub async fn until<F: AsyncFnMut() -> bool>(limit: Duration, what: &str, mut check: F) -> Duration {
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}
