//! A real lethe server on a loopback port, with a tiny in-process model, for HTTP tests.
#![allow(dead_code)]

use lethe::config::{ServeArgs, ServeConfig};
use lethe::fixtures::{TempDir, TinySpec, write_tiny_model};
use lethe::server::{AppState, serve};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub struct Server {
    pub base: String,
    pub state: Arc<AppState>,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
    pub _dir: TempDir,
}

impl Server {
    pub async fn start(tweak: impl FnOnce(&mut ServeArgs)) -> Self {
        Self::start_with(TinySpec { max_positions: 256, ..Default::default() }, tweak).await
    }

    pub async fn start_with(spec: TinySpec, tweak: impl FnOnce(&mut ServeArgs)) -> Self {
        Self::start_in(TempDir::new("server").unwrap(), spec, tweak).await
    }

    /// Starts a server whose tiny model lives in `dir/tiny` (written unless present); `dir` may
    /// also hold adapters and state for the test.
    pub async fn start_in(dir: TempDir, spec: TinySpec, tweak: impl FnOnce(&mut ServeArgs)) -> Self {
        let model = dir.path().join("tiny");
        if !model.join("config.json").exists() {
            write_tiny_model(&model, &spec).unwrap();
        }
        let mut args = ServeArgs { model: Some(model), ..Default::default() };
        tweak(&mut args);
        let config = ServeConfig::resolve(&args).unwrap();
        let grace = Duration::from_secs(config.shutdown_grace_secs);
        let state = tokio::task::spawn_blocking(move || AppState::load(config)).await.unwrap().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            listener,
            state.clone(),
            async move {
                let _ = rx.await;
            },
            grace,
        ));
        Self { base, state, stop: Some(tx), task, _dir: dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn model(&self) -> String {
        self.state.model_id.clone()
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = reqwest::Client::new().post(self.url(path)).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Any request, with an optional bearer key and JSON body; returns status and JSON body.
    pub async fn call(&self, method: &str, path: &str, key: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut r = reqwest::Client::new().request(method, self.url(path));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub fn running(&self) -> usize {
        self.state.engine.stats().running.load(Ordering::Relaxed)
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("server stopped in time")
            .unwrap()
            .unwrap();
    }
}

pub fn chat(model: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, who are you?"}],
        "max_tokens": 12,
        "temperature": 0,
    });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

/// Reads an SSE response into its `data:` payloads.
pub async fn sse(resp: reqwest::Response) -> Vec<String> {
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    text.lines().filter_map(|l| l.strip_prefix("data: ")).map(String::from).collect()
}

pub fn assert_error(status: u16, body: &Value, want_status: u16, want_param: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{body}");
    if let Some(p) = want_param {
        assert_eq!(e["param"], p, "{body}");
    }
}
