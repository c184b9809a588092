//! Where the probes are answered: the serving engine in this process (adapters loaded from
//! PEFT directories, rows built by the serving prompt functions), or a running server through its
//! OpenAI API (the auditor's view with a tenant key).

use super::grid::{PointGuidance, UncondKind};
use super::progress::Progress;
use crate::adapters::{GuidanceProfile, peft};
use crate::engine::prompt::{self, Conditions, Placement, PromptRows, SystemMessages, UncondSource};
use crate::engine::{EngineConfig, EngineHandle, Event, Request, SchedulerConfig};
use crate::guidance::{Guidance, GuidanceMode};
use crate::loader::ModelBundle;
use crate::model::lora::LoraWeights;
use crate::sampling::SamplingParams;
use crate::tokenizer::ChatMessage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What to send: a conversation or a raw prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Chat(Vec<ChatMessage>),
    Text(String),
}

/// One generation to run.
#[derive(Debug, Clone)]
pub struct Job {
    pub stack: usize,
    pub input: Input,
    /// `None`: no conditions at all (plain serving).
    pub guidance: Option<JobGuidance>,
    pub max_tokens: usize,
    pub temperature: f32,
    pub seed: Option<u64>,
}

/// A point's guidance, after the probe's own overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct JobGuidance {
    pub gamma: f32,
    pub mode: GuidanceMode,
    pub uncond: UncondKind,
    /// A negative prompt the request brings (an attack).
    pub negative_prompt: Option<String>,
    pub placement: Placement,
    pub system_messages: SystemMessages,
    /// Whether the point itself was unguided and only the probe asked for guidance (over HTTP
    /// only the probe's fields are then sent).
    pub from_probe_only: bool,
}

impl JobGuidance {
    pub fn of_point(g: &PointGuidance) -> Self {
        Self {
            gamma: g.gamma,
            mode: g.mode,
            uncond: g.uncond,
            negative_prompt: None,
            placement: g.placement,
            system_messages: g.system_messages,
            from_probe_only: false,
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Answer(String),
    /// The server (or the policy the run applies) refused the request: nothing was generated.
    Refused(String),
    Failed(String),
}

/// An adapter stack loaded in process.
pub struct LoadedStack {
    pub name: String,
    pub dirs: Vec<PathBuf>,
    pub adapters: Vec<Arc<LoraWeights>>,
    /// Content hashes of the adapters (their serving generations).
    pub hashes: Vec<String>,
    /// The first adapter profile in the stack (what serving applies).
    pub profile: Option<GuidanceProfile>,
}

impl LoadedStack {
    pub fn conditions(&self) -> Conditions {
        match &self.profile {
            Some(p) => Conditions { positive: p.positive.clone(), negative: p.negative.clone() },
            None => Conditions::default(),
        }
    }
}

/// The serving engine in this process.
pub struct Local {
    pub bundle: ModelBundle,
    pub engine: EngineHandle,
    pub stacks: Vec<LoadedStack>,
}

impl Local {
    pub fn new(bundle: ModelBundle, stacks: &[(String, Vec<PathBuf>)], max_rows: usize) -> anyhow::Result<Self> {
        let mut cache: HashMap<PathBuf, (Arc<LoraWeights>, String, Option<GuidanceProfile>)> = HashMap::new();
        let mut loaded = Vec::new();
        for (name, dirs) in stacks {
            let mut s = LoadedStack {
                name: name.clone(),
                dirs: dirs.clone(),
                adapters: Vec::new(),
                hashes: Vec::new(),
                profile: None,
            };
            for d in dirs {
                let key = std::fs::canonicalize(d)
                    .map_err(|e| anyhow::anyhow!("stack {name}: adapter directory {}: {e}", d.display()))?;
                if !cache.contains_key(&key) {
                    let a = peft::load(&key, &bundle.model)
                        .map_err(|e| anyhow::anyhow!("stack {name}: adapter {}: {e}", d.display()))?;
                    cache.insert(key.clone(), (Arc::new(a.weights), a.content_hash, a.profile));
                }
                let (w, h, p) = &cache[&key];
                s.adapters.push(w.clone());
                s.hashes.push(h.clone());
                if s.profile.is_none() {
                    s.profile = p.clone();
                }
            }
            loaded.push(s);
        }
        let engine = EngineHandle::spawn(
            bundle.model.clone(),
            bundle.tokenizer.clone(),
            EngineConfig {
                scheduler: SchedulerConfig {
                    max_running_rows: max_rows,
                    max_waiting: usize::MAX / 2,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        Ok(Self { bundle, engine, stacks: loaded })
    }

    /// The token rows a job's request carries: exactly what serving builds for it.
    pub fn rows(&self, job: &Job) -> Result<PromptRows, Outcome> {
        let tok = &self.bundle.tokenizer;
        let fail = |e: crate::tokenizer::TokenizerError| Outcome::Failed(e.to_string());
        let Some(g) = &job.guidance else {
            return match &job.input {
                Input::Chat(m) => prompt::chat_rows(tok, m, None).map_err(fail),
                Input::Text(t) => prompt::text_rows(tok, t, None).map_err(fail),
            };
        };
        let conds = self.stacks[job.stack].conditions();
        let source = match (&g.negative_prompt, g.uncond) {
            (Some(np), _) => UncondSource::Custom(np.clone()),
            (None, UncondKind::LastToken) => UncondSource::LastToken,
            (None, UncondKind::NegativeCondition) => UncondSource::NegativeCondition,
        };
        match &job.input {
            Input::Chat(m) => {
                let has_system = m.iter().any(|x| x.role == "system");
                let messages = match g.system_messages {
                    SystemMessages::Refuse if has_system => {
                        return Err(Outcome::Refused("system messages are refused".into()));
                    }
                    SystemMessages::Demote => prompt::demote_system_messages(m),
                    _ => m.clone(),
                };
                prompt::chat_rows_placed(tok, &messages, Some((&conds, &source)), g.placement).map_err(fail)
            }
            Input::Text(t) => prompt::text_rows(tok, t, Some((&conds, &source))).map_err(fail),
        }
    }

    /// The engine request of a job.
    fn request(&self, job: &Job) -> Result<Request, Outcome> {
        let rows = self.rows(job)?;
        let mut r = Request::new(rows.cond, job.max_tokens);
        r.sampling = SamplingParams { temperature: job.temperature, top_k: 0, top_p: 1.0, seed: job.seed };
        r.tenant = "eval".into();
        let stack = &self.stacks[job.stack];
        r.adapters = stack.adapters.clone();
        r.adapter_names = stack
            .dirs
            .iter()
            .map(|d| d.file_name().map_or_else(|| d.display().to_string(), |n| n.to_string_lossy().into_owned()))
            .collect();
        if let (Some(u), Some(g)) = (rows.uncond, &job.guidance) {
            r = r.guided(u, Guidance { gamma: g.gamma, mode: g.mode });
        }
        Ok(r)
    }

    /// Runs every job through the engine (all queued at once, so the engine batches them as it
    /// batches a server's traffic). Identical requests run once.
    pub fn run(&self, jobs: &[Job], progress: &mut Progress) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; jobs.len()];
        let mut unique: HashMap<String, usize> = HashMap::new();
        let mut streams = Vec::new();
        let mut same_as: Vec<Option<usize>> = vec![None; jobs.len()];
        for (i, job) in jobs.iter().enumerate() {
            let req = match self.request(job) {
                Ok(r) => r,
                Err(o) => {
                    outcomes[i] = Some(o);
                    continue;
                }
            };
            let key = format!(
                "{}|{:?}|{:?}|{:?}|{}|{}|{:?}",
                job.stack, req.prompt, req.uncond_prompt, req.guidance, req.max_tokens, job.temperature, job.seed
            );
            if let Some(&first) = unique.get(&key) {
                same_as[i] = Some(first);
                continue;
            }
            unique.insert(key, i);
            match self.engine.submit(req) {
                Ok(s) => streams.push((i, s)),
                Err(e) => outcomes[i] = Some(Outcome::Failed(e.to_string())),
            }
        }
        progress.set_total(streams.len());
        for (i, mut s) in streams {
            let mut text = String::new();
            let outcome = loop {
                match s.blocking_next() {
                    Some(Event::Token { text: t, .. }) => text.push_str(&t),
                    Some(Event::Finished { .. }) => break Outcome::Answer(std::mem::take(&mut text)),
                    Some(Event::Error(e)) => break Outcome::Failed(e.to_string()),
                    None => break Outcome::Failed("the engine dropped the request".into()),
                }
            };
            outcomes[i] = Some(outcome);
            progress.tick(1);
        }
        for i in 0..jobs.len() {
            if let Some(first) = same_as[i] {
                outcomes[i] = outcomes[first].clone();
            }
        }
        outcomes.into_iter().map(|o| o.unwrap_or_else(|| Outcome::Failed("not run".into()))).collect()
    }
}

/// A running server, through its OpenAI API.
pub struct Remote {
    pub base: String,
    pub api_key: Option<String>,
    pub model: String,
    pub concurrency: usize,
    client: reqwest::Client,
}

impl Remote {
    /// Connects and reads the served model's id from `/v1/models`.
    pub async fn connect(url: &str, api_key: Option<String>, concurrency: usize) -> anyhow::Result<Self> {
        let base = url.trim_end_matches('/').trim_end_matches("/v1").to_string();
        let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(600)).build()?;
        let mut r = client.get(format!("{base}/v1/models"));
        if let Some(k) = &api_key {
            r = r.bearer_auth(k);
        }
        let resp = r.send().await.map_err(|e| anyhow::anyhow!("cannot reach {base}: {e}"))?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        anyhow::ensure!(status.is_success(), "{base}/v1/models answered {status}: {body}");
        let model = body["data"][0]["id"].as_str().ok_or_else(|| anyhow::anyhow!("{base} lists no model"))?.to_string();
        Ok(Self { base, api_key, model, concurrency: concurrency.max(1), client })
    }

    /// The request body of a job.
    pub fn body(&self, job: &Job) -> (String, serde_json::Value) {
        let mut body =
            serde_json::json!({ "model": self.model, "max_tokens": job.max_tokens, "temperature": job.temperature });
        if let Some(s) = job.seed {
            body["seed"] = s.into();
        }
        if let Some(g) = &job.guidance {
            let mut gj = serde_json::json!({ "gamma": g.gamma });
            if !g.from_probe_only {
                gj["mode"] = g.mode.as_str().into();
                if g.uncond == UncondKind::LastToken {
                    gj["uncond"] = "last_token".into();
                }
            }
            if let Some(np) = &g.negative_prompt {
                gj["negative_prompt"] = np.clone().into();
                if g.from_probe_only {
                    gj.as_object_mut().expect("object").remove("gamma");
                }
            }
            body["guidance"] = gj;
        }
        match &job.input {
            Input::Chat(m) => {
                body["messages"] = serde_json::to_value(m).expect("messages serialize");
                ("/v1/chat/completions".into(), body)
            }
            Input::Text(t) => {
                body["prompt"] = t.clone().into();
                ("/v1/completions".into(), body)
            }
        }
    }

    async fn one(&self, job: &Job) -> Outcome {
        let (path, body) = self.body(job);
        let mut r = self.client.post(format!("{}{path}", self.base)).json(&body);
        if let Some(k) = &self.api_key {
            r = r.bearer_auth(k);
        }
        let resp = match r.send().await {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let status = resp.status();
        let v: serde_json::Value = resp.json().await.unwrap_or_default();
        if status.is_client_error() && status != reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Outcome::Refused(v["error"]["message"].as_str().unwrap_or("refused").to_string());
        }
        if !status.is_success() {
            return Outcome::Failed(format!("{status}: {v}"));
        }
        let c = &v["choices"][0];
        let text = c["message"]["content"].as_str().or_else(|| c["text"].as_str()).unwrap_or_default();
        Outcome::Answer(text.to_string())
    }

    /// Runs every job with `concurrency` requests in flight.
    pub async fn run(&self, jobs: &[Job], progress: &mut Progress) -> Vec<Outcome> {
        use futures::StreamExt;
        progress.set_total(jobs.len());
        let mut results: Vec<Option<Outcome>> = vec![None; jobs.len()];
        let mut stream = futures::stream::iter(jobs.iter().enumerate())
            .map(|(i, j)| async move { (i, self.one(j).await) })
            .buffer_unordered(self.concurrency);
        while let Some((i, o)) = stream.next().await {
            results[i] = Some(o);
            progress.tick(1);
        }
        results.into_iter().map(|o| o.expect("every job answered")).collect()
    }
}

/// sha256 of a file, streamed (model files are large).
pub fn file_sha256(path: &Path) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}
