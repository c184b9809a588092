//! OpenAI-compatible routes: wire types and handlers for `/v1/chat/completions`,
//! `/v1/completions` and `/v1/models`. Shapes follow OpenAI's API exactly (the official SDKs
//! parse them); lethe's own extension is the `guidance` object in requests and responses.

use super::AppState;
use super::auth::Tenant;
use super::error::ApiError;
use super::extract::JsonBody;
use super::validation::{self, Prepared};
use crate::engine::{Event, FinishReason, RequestStream, Usage};
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// Requests

/// `POST /v1/chat/completions` body: the endpoint's own fields plus [`CommonParams`] (parsed
/// from the same JSON object). Unknown fields are ignored, as OpenAI does.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<WireMessage>,
}

/// `POST /v1/completions` body: the endpoint's own fields plus [`CommonParams`].
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptInput,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    pub best_of: Option<u32>,
}

/// Parameters shared by both endpoints. Parsed separately from the endpoint's own fields (not
/// `#[serde(flatten)]`, which would hide the failing field's name from error messages).
#[derive(Debug, Default, Deserialize)]
pub struct CommonParams {
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; vLLM and TGI accept it too.
    pub top_k: Option<u32>,
    pub seed: Option<i64>,
    pub stop: Option<StopInput>,
    pub n: Option<u32>,
    pub user: Option<String>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logprobs: Option<serde_json::Value>,
    pub logit_bias: Option<serde_json::Value>,
    /// lethe's extension: classifier-free guidance for this request.
    pub guidance: Option<GuidanceRequest>,
    /// Extension (as in vLLM): keep generating past end-of-sequence, for benchmarks.
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    pub content: Option<MessageContent>,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// The `guidance` extension object.
#[derive(Debug, Default, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct GuidanceRequest {
    /// Guidance scale γ: 1 = unguided, > 1 = stronger condition.
    pub gamma: Option<f32>,
    /// `log` (default) or `prob`.
    pub mode: Option<String>,
    /// A custom negative condition for the uncond row.
    pub negative_prompt: Option<String>,
    /// Where the uncond row comes from: `negative_condition` (default) or `last_token`.
    pub uncond: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Responses

/// The guidance actually applied, echoed in every response.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AppliedGuidance {
    pub gamma: f32,
    pub mode: &'static str,
    /// `none` when γ = 1 (no uncond row was computed), else `negative_condition`,
    /// `negative_prompt` or `last_token`.
    pub uncond: &'static str,
    pub uncond_prompt_tokens: usize,
    /// `demoted` when the client's system messages were moved into the user turn (the tenant's
    /// rule while conditions apply); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_messages: Option<&'static str>,
    /// The forget-adapters applied (the tenant's), each as the generation this request leased.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<AppliedAdapter>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AppliedAdapter {
    pub name: String,
    pub generation: String,
}

#[derive(Debug, Serialize)]
pub struct WireUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl From<Usage> for WireUsage {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

#[derive(Debug, Serialize)]
struct ChatCompletion {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    system_fingerprint: String,
    choices: Vec<ChatChoice>,
    usage: WireUsage,
    guidance: AppliedGuidance,
}

#[derive(Debug, Serialize)]
struct ChatChoice {
    index: u32,
    message: AssistantMessage,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
struct AssistantMessage {
    role: &'static str,
    content: String,
}

#[derive(Debug, Serialize)]
struct TextCompletion {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    system_fingerprint: String,
    choices: Vec<TextChoice>,
    usage: WireUsage,
    guidance: AppliedGuidance,
}

#[derive(Debug, Serialize)]
struct TextChoice {
    text: String,
    index: u32,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

/// A streamed chunk of either endpoint: `C` is [`ChunkChoice`] (chat) or [`TextChoice`].
#[derive(Debug, Serialize)]
struct Chunk<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'a str,
    choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<WireUsage>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    guidance: Option<&'a AppliedGuidance>,
}

#[derive(Debug, Serialize)]
struct ChunkChoice {
    index: u32,
    delta: Delta,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize, Default)]
struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// lethe's extension: the model's context length.
    pub max_model_len: usize,
    /// For a forget-adapter: the base model it applies to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Handlers

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Tenant(tenant): Tenant,
    JsonBody((req, common)): JsonBody<(ChatCompletionRequest, CommonParams)>,
) -> Result<Response, ApiError> {
    let ctx = validation::TenantContext::of(&state, &tenant)?;
    let prepared = validation::prepare_chat(&state, &ctx, req, common).await?;
    run(state, prepared, Kind::Chat, tenant).await
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Tenant(tenant): Tenant,
    JsonBody((req, common)): JsonBody<(CompletionRequest, CommonParams)>,
) -> Result<Response, ApiError> {
    let ctx = validation::TenantContext::of(&state, &tenant)?;
    let prepared = validation::prepare_completion(&state, &ctx, req, common).await?;
    run(state, prepared, Kind::Text, tenant).await
}

/// The base model, and the tenant's forget-adapters (applied to every request of the tenant,
/// whichever of these ids it names).
pub async fn models(State(state): State<Arc<AppState>>, Tenant(tenant): Tenant) -> axum::Json<ModelList> {
    let card = |id: String, parent: Option<String>| ModelCard {
        id,
        object: "model",
        created: state.created,
        owned_by: "lethe",
        max_model_len: state.engine.max_context(),
        parent,
    };
    let mut data = vec![card(state.model_id.clone(), None)];
    for a in state.tenants.policy(&tenant).adapters {
        data.push(card(a, Some(state.model_id.clone())));
    }
    axum::Json(ModelList { object: "list", data })
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

async fn run(state: Arc<AppState>, p: Prepared, kind: Kind, tenant: String) -> Result<Response, ApiError> {
    let stream = state.engine.submit(p.request)?;
    let meta = Meta {
        id: format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, random_hex(24)),
        created: unix_now(),
        model: state.model_id.clone(),
        fingerprint: state.fingerprint.clone(),
        guidance: p.applied,
        include_usage: p.include_usage,
        kind,
        tenant,
    };
    if p.stream {
        Ok(Sse::new(sse_events(stream, meta)).keep_alive(KeepAlive::default()).into_response())
    } else {
        collect(stream, meta).await
    }
}

/// What every response (or chunk) of one request repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    guidance: AppliedGuidance,
    include_usage: bool,
    kind: Kind,
    tenant: String,
}

/// One log line per finished request, inside its request span (so it carries the request id):
/// what ran and how long it took.
fn log_finished(meta: &Meta, reason: FinishReason, usage: &crate::engine::Usage, timing: &crate::engine::Timing) {
    let adapters: Vec<String> = meta.guidance.adapters.iter().map(|a| format!("{}@{}", a.name, a.generation)).collect();
    tracing::info!(
        tenant = %meta.tenant,
        adapters = %adapters.join(","),
        gamma = meta.guidance.gamma,
        mode = meta.guidance.mode,
        uncond = meta.guidance.uncond,
        prompt_tokens = usage.prompt_tokens,
        uncond_prompt_tokens = usage.uncond_prompt_tokens,
        completion_tokens = usage.completion_tokens,
        finish_reason = reason.as_str(),
        queue_ms = timing.queue.as_secs_f64() * 1e3,
        ttft_ms = timing.time_to_first_token.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
        total_ms = timing.total.as_secs_f64() * 1e3,
        "request finished"
    );
}

async fn collect(mut stream: RequestStream, meta: Meta) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match stream.next().await {
            Some(Event::Token { text: t, .. }) => text.push_str(&t),
            Some(Event::Finished { reason, usage, timing }) => {
                log_finished(&meta, reason, &usage, &timing);
                let finish = reason.as_str();
                return Ok(match meta.kind {
                    Kind::Chat => axum::Json(ChatCompletion {
                        id: meta.id,
                        object: "chat.completion",
                        created: meta.created,
                        model: meta.model,
                        system_fingerprint: meta.fingerprint,
                        choices: vec![ChatChoice {
                            index: 0,
                            message: AssistantMessage { role: "assistant", content: text },
                            logprobs: None,
                            finish_reason: finish,
                        }],
                        usage: usage.into(),
                        guidance: meta.guidance,
                    })
                    .into_response(),
                    Kind::Text => axum::Json(TextCompletion {
                        id: meta.id,
                        object: "text_completion",
                        created: meta.created,
                        model: meta.model,
                        system_fingerprint: meta.fingerprint,
                        choices: vec![TextChoice { text, index: 0, logprobs: None, finish_reason: Some(finish) }],
                        usage: usage.into(),
                        guidance: meta.guidance,
                    })
                    .into_response(),
                });
            }
            Some(Event::Error(e)) => return Err(e.into()),
            None => return Err(ApiError::Internal("the engine dropped the request".into())),
        }
    }
}

/// The SSE stream: a role chunk (chat), content deltas, a finish chunk, an optional usage chunk
/// with empty `choices`, then `[DONE]`. Dropping it (client gone) drops the engine stream, which
/// cancels the request.
fn sse_events(stream: RequestStream, meta: Meta) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    enum Phase {
        Start,
        Body,
        Done,
    }
    futures::stream::unfold((stream, meta, Phase::Start), |(mut stream, meta, phase)| async move {
        match phase {
            Phase::Done => None,
            Phase::Start => {
                let first = match meta.kind {
                    Kind::Chat => {
                        Some(chunk(&meta, Delta { role: Some("assistant"), content: Some(String::new()) }, None))
                    }
                    Kind::Text => None,
                };
                match first {
                    Some(ev) => Some((vec![ev], (stream, meta, Phase::Body))),
                    None => Some((vec![], (stream, meta, Phase::Body))),
                }
            }
            Phase::Body => loop {
                match stream.next().await {
                    Some(Event::Token { text, .. }) if text.is_empty() => continue,
                    Some(Event::Token { text, .. }) => {
                        let ev = chunk(&meta, Delta { role: None, content: Some(text) }, None);
                        return Some((vec![ev], (stream, meta, Phase::Body)));
                    }
                    Some(Event::Finished { reason, usage, timing }) => {
                        log_finished(&meta, reason, &usage, &timing);
                        let mut evs = vec![chunk(&meta, Delta::default(), Some(reason))];
                        if meta.include_usage {
                            evs.push(usage_chunk(&meta, usage));
                        }
                        evs.push(SseEvent::default().data("[DONE]"));
                        return Some((evs, (stream, meta, Phase::Done)));
                    }
                    ended => {
                        // A failure, or the engine dropped the request without a word: either
                        // way the client gets an error event and `[DONE]`, never a bare EOF.
                        let err = match ended {
                            Some(Event::Error(e)) => ApiError::from(e),
                            _ => ApiError::Internal("the engine dropped the request".into()),
                        };
                        tracing::error!(error = %err, "generation failed mid-stream");
                        let evs = vec![
                            SseEvent::default().data(serde_json::to_string(&err.body()).unwrap_or_default()),
                            SseEvent::default().data("[DONE]"),
                        ];
                        return Some((evs, (stream, meta, Phase::Done)));
                    }
                }
            },
        }
    })
    .flat_map(|evs| futures::stream::iter(evs.into_iter().map(Ok)))
}

/// A content or finish chunk. The guidance echo rides on the finish chunk.
fn chunk(meta: &Meta, delta: Delta, finish: Option<FinishReason>) -> SseEvent {
    let finish = finish.map(FinishReason::as_str);
    let usage = meta.include_usage.then_some(None);
    let guidance = finish.is_some().then_some(&meta.guidance);
    match meta.kind {
        Kind::Chat => {
            let choice = ChunkChoice { index: 0, delta, logprobs: None, finish_reason: finish };
            chunk_event(meta, vec![choice], usage, guidance)
        }
        Kind::Text => {
            let text = delta.content.unwrap_or_default();
            let choice = TextChoice { text, index: 0, logprobs: None, finish_reason: finish };
            chunk_event(meta, vec![choice], usage, guidance)
        }
    }
}

/// The final usage chunk: no choices.
fn usage_chunk(meta: &Meta, usage: Usage) -> SseEvent {
    chunk_event::<ChunkChoice>(meta, vec![], Some(Some(usage.into())), None)
}

fn chunk_event<C: Serialize>(
    meta: &Meta,
    choices: Vec<C>,
    usage: Option<Option<WireUsage>>,
    guidance: Option<&AppliedGuidance>,
) -> SseEvent {
    let object = match meta.kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Text => "text_completion",
    };
    let chunk = Chunk {
        id: &meta.id,
        object,
        created: meta.created,
        model: &meta.model,
        system_fingerprint: &meta.fingerprint,
        choices,
        usage,
        guidance,
    };
    SseEvent::default().data(serde_json::to_string(&chunk).unwrap_or_default())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Random lowercase hex (ids).
pub fn random_hex(n: usize) -> String {
    let mut rng = crate::sampling::Rng::from_entropy();
    (0..n).map(|_| char::from_digit((rng.next_u64() % 16) as u32, 16).unwrap_or('0')).collect()
}
