//! OpenAI-compatible routes: wire types and handlers for `/v1/chat/completions`,
//! `/v1/completions` and `/v1/models`. Shapes follow OpenAI's API exactly (the official SDKs
//! parse them); lethe's own extension is the `guidance` object in requests and responses.

use super::AppState;
use super::auth::Tenant;
use super::error::ApiError;
use super::extract::{BodyKeys, JsonBody};
use super::output::{
    ChatLogprobs, DeltaToolCall, LogprobEntry, Message, OutputReader, Piece, TextLogprobs, TokenText, ToolCall,
    ToolMode,
};
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
/// from the same JSON object). Fields lethe does not know are refused, as OpenAI does
/// (`validation::check_fields`).
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<WireMessage>,
    pub tools: Option<Vec<WireTool>>,
    pub tool_choice: Option<WireToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<WireResponseFormat>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    /// Accepted when false (lethe stores nothing).
    pub store: Option<bool>,
    /// Accepted when `auto` or `default` (there is one tier).
    pub service_tier: Option<String>,
    /// Accepted when `["text"]`.
    pub modalities: Option<Vec<String>>,
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
    /// Log-probabilities of the sampled token and this many alternatives (0–5).
    pub logprobs: Option<u32>,
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
    /// Token id (as a string) → bias added to its score, in [-100, 100].
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
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
    /// An assistant turn's calls.
    pub tool_calls: Option<Vec<WireToolCall>>,
    /// A `tool` turn: the call it answers.
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct WireToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: WireCalledFunction,
}

#[derive(Debug, Deserialize)]
pub struct WireCalledFunction {
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

/// A function the model may call (`tools[]`).
#[derive(Debug, Deserialize)]
pub struct WireTool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: WireFunction,
}

#[derive(Debug, Deserialize)]
pub struct WireFunction {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Option<serde_json::Value>,
    /// Accepted either way: the arguments always follow the schema.
    pub strict: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum WireToolChoice {
    /// `none`, `auto` or `required`.
    Mode(String),
    Function {
        #[serde(rename = "type")]
        kind: String,
        function: WireFunctionName,
    },
}

#[derive(Debug, Deserialize)]
pub struct WireFunctionName {
    pub name: String,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WireResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: WireJsonSchema },
}

#[derive(Debug, Deserialize)]
pub struct WireJsonSchema {
    pub name: String,
    pub description: Option<String>,
    pub schema: Option<serde_json::Value>,
    /// Accepted either way: lethe always enforces the schema (unsupported features are a 400).
    pub strict: Option<bool>,
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
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's breakdown of the prompt tokens.
#[derive(Debug, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache (of the prompt the answer is for: the cond
    /// row of a guided request).
    pub cached_tokens: usize,
}

impl From<Usage> for WireUsage {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: u.cached_tokens },
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
    logprobs: Option<ChatLogprobs>,
    finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
struct AssistantMessage {
    role: &'static str,
    /// `null` when the model called tools.
    content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCall>,
    refusal: Option<String>,
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
    logprobs: Option<TextLogprobs>,
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
    logprobs: Option<ChatLogprobs>,
    finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize, Default)]
struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<DeltaToolCall>>,
}

/// Log-probabilities of tokens not yet sent, in the shape of the endpoint.
enum PendingLogprobs {
    Chat(Vec<LogprobEntry>),
    Text(TextLogprobs),
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
    JsonBody((req, common, keys)): JsonBody<(ChatCompletionRequest, CommonParams, BodyKeys)>,
) -> Result<Response, ApiError> {
    validation::check_fields(&keys, validation::Endpoint::Chat)?;
    let ctx = validation::TenantContext::of(&state, &tenant)?;
    // The request counts against the waiting limits before any work is done for it.
    let ticket = state.engine.reserve(&tenant, &validation::tenant_limits(&state, &ctx))?;
    let prepared = validation::prepare_chat(&state, &ctx, req, common).await?;
    run(state, prepared, Kind::Chat, tenant, ticket).await
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Tenant(tenant): Tenant,
    JsonBody((req, common, keys)): JsonBody<(CompletionRequest, CommonParams, BodyKeys)>,
) -> Result<Response, ApiError> {
    validation::check_fields(&keys, validation::Endpoint::Completions)?;
    let ctx = validation::TenantContext::of(&state, &tenant)?;
    let ticket = state.engine.reserve(&tenant, &validation::tenant_limits(&state, &ctx))?;
    let prepared = validation::prepare_completion(&state, &ctx, req, common).await?;
    run(state, prepared, Kind::Text, tenant, ticket).await
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

async fn run(
    state: Arc<AppState>,
    p: Prepared,
    kind: Kind,
    tenant: String,
    ticket: crate::engine::Ticket,
) -> Result<Response, ApiError> {
    let stream = state.engine.submit_reserved(p.request, ticket)?;
    let meta = Meta {
        id: format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, random_hex(24)),
        created: unix_now(),
        model: state.model_id.clone(),
        fingerprint: state.fingerprint.clone(),
        guidance: p.applied,
        include_usage: p.include_usage,
        kind,
        tenant,
        tool_mode: p.tool_mode,
        logprobs: p.logprobs.then(|| TokenText { tokenizer: state.tokenizer.clone(), vocab: p.vocab.clone() }),
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
    /// How a chat output is read (content or tool calls).
    tool_mode: ToolMode,
    /// Set when the request asked for log-probabilities.
    logprobs: Option<TokenText>,
}

impl Meta {
    fn pending_logprobs(&self) -> Option<PendingLogprobs> {
        self.logprobs.as_ref().map(|_| match self.kind {
            Kind::Chat => PendingLogprobs::Chat(Vec::new()),
            Kind::Text => PendingLogprobs::Text(TextLogprobs::default()),
        })
    }

    /// Adds a token's log-probabilities. `offset`: bytes of completion text before the token.
    fn note_logprobs(
        &self,
        pending: &mut Option<PendingLogprobs>,
        lp: Option<&crate::sampling::TokenLogprobs>,
        offset: usize,
    ) {
        let (Some(text), Some(lp), Some(p)) = (&self.logprobs, lp, pending.as_mut()) else { return };
        match p {
            PendingLogprobs::Chat(v) => v.push(text.chat_entry(lp)),
            PendingLogprobs::Text(t) => t.push(text, lp, offset),
        }
    }
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
        cached_tokens = usage.cached_tokens,
        uncond_cached_tokens = usage.uncond_cached_tokens,
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
    let mut logprobs = meta.pending_logprobs();
    loop {
        match stream.next().await {
            Some(Event::Token { text: t, logprobs: lp, .. }) => {
                meta.note_logprobs(&mut logprobs, lp.as_deref(), text.len());
                text.push_str(&t);
            }
            Some(Event::Finished { reason, usage, timing }) => {
                log_finished(&meta, reason, &usage, &timing);
                return Ok(match meta.kind {
                    Kind::Chat => {
                        let mut reader = OutputReader::new(meta.tool_mode);
                        let mut message = Message::default();
                        message.add(reader.push(&text));
                        message.add(reader.finish());
                        let finish = if reader.called_tools() { "tool_calls" } else { reason.as_str() };
                        let content = match (message.content, reader.is_calls()) {
                            (Some(c), _) => Some(c),
                            (None, true) => None,
                            (None, false) => Some(String::new()),
                        };
                        let logprobs = match logprobs {
                            Some(PendingLogprobs::Chat(content)) => Some(ChatLogprobs { content, refusal: None }),
                            _ => None,
                        };
                        axum::Json(ChatCompletion {
                            id: meta.id,
                            object: "chat.completion",
                            created: meta.created,
                            model: meta.model,
                            system_fingerprint: meta.fingerprint,
                            choices: vec![ChatChoice {
                                index: 0,
                                message: AssistantMessage {
                                    role: "assistant",
                                    content,
                                    tool_calls: message.tool_calls,
                                    refusal: None,
                                },
                                logprobs,
                                finish_reason: finish,
                            }],
                            usage: usage.into(),
                            guidance: meta.guidance,
                        })
                        .into_response()
                    }
                    Kind::Text => {
                        let logprobs = match logprobs {
                            Some(PendingLogprobs::Text(t)) => Some(t),
                            _ => None,
                        };
                        let finish = Some(reason.as_str());
                        axum::Json(TextCompletion {
                            id: meta.id,
                            object: "text_completion",
                            created: meta.created,
                            model: meta.model,
                            system_fingerprint: meta.fingerprint,
                            choices: vec![TextChoice { text, index: 0, logprobs, finish_reason: finish }],
                            usage: usage.into(),
                            guidance: meta.guidance,
                        })
                        .into_response()
                    }
                });
            }
            Some(Event::Error(e)) => return Err(e.into()),
            None => return Err(ApiError::Internal("the engine dropped the request".into())),
        }
    }
}

/// The SSE stream: a role chunk (chat), content or tool-call deltas, a finish chunk, an
/// optional usage chunk with empty `choices`, then `[DONE]`. Dropping it (client gone) drops
/// the engine stream, which cancels the request.
fn sse_events(stream: RequestStream, meta: Meta) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let state = SseState {
        reader: OutputReader::new(meta.tool_mode),
        logprobs: meta.pending_logprobs(),
        sent_bytes: 0,
        phase: Phase::Start,
        stream,
        meta,
    };
    futures::stream::unfold(state, |mut st| async move {
        let events = st.next_events().await?;
        Some((events, st))
    })
    .flat_map(|evs| futures::stream::iter(evs.into_iter().map(Ok)))
}

enum Phase {
    Start,
    Body,
    Done,
}

struct SseState {
    stream: RequestStream,
    meta: Meta,
    reader: OutputReader,
    /// Log-probabilities of tokens whose text is still held back.
    logprobs: Option<PendingLogprobs>,
    /// Completion text sent so far (completions' `text_offset`).
    sent_bytes: usize,
    phase: Phase,
}

impl SseState {
    /// The next events to send; `None` once the stream is over.
    async fn next_events(&mut self) -> Option<Vec<SseEvent>> {
        match self.phase {
            Phase::Done => None,
            Phase::Start => {
                self.phase = Phase::Body;
                Some(match self.meta.kind {
                    Kind::Chat => vec![chunk(
                        &self.meta,
                        Delta { role: Some("assistant"), content: Some(String::new()), tool_calls: None },
                        None,
                        None,
                    )],
                    Kind::Text => vec![],
                })
            }
            Phase::Body => loop {
                match self.stream.next().await {
                    Some(Event::Token { text, logprobs, .. }) => {
                        self.meta.note_logprobs(&mut self.logprobs, logprobs.as_deref(), self.sent_bytes);
                        let piece = match self.meta.kind {
                            Kind::Chat => self.reader.push(&text),
                            Kind::Text => Piece { content: Some(text), tool_calls: Vec::new() },
                        };
                        if piece.is_empty() {
                            continue;
                        }
                        return Some(vec![self.piece_chunk(piece, None)]);
                    }
                    Some(Event::Finished { reason, usage, timing }) => {
                        log_finished(&self.meta, reason, &usage, &timing);
                        let mut evs = Vec::new();
                        let rest = self.reader.finish();
                        if !rest.is_empty() {
                            evs.push(self.piece_chunk(rest, None));
                        }
                        let finish = if self.reader.called_tools() { "tool_calls" } else { reason.as_str() };
                        evs.push(self.piece_chunk(Piece::default(), Some(finish)));
                        if self.meta.include_usage {
                            evs.push(usage_chunk(&self.meta, usage));
                        }
                        evs.push(SseEvent::default().data("[DONE]"));
                        self.phase = Phase::Done;
                        return Some(evs);
                    }
                    ended => {
                        // A failure, or the engine dropped the request without a word: either
                        // way the client gets an error event and `[DONE]`, never a bare EOF.
                        let err = match ended {
                            Some(Event::Error(e)) => ApiError::from(e),
                            _ => ApiError::Internal("the engine dropped the request".into()),
                        };
                        tracing::error!(error = %err, "generation failed mid-stream");
                        self.phase = Phase::Done;
                        return Some(vec![
                            SseEvent::default().data(serde_json::to_string(&err.body()).unwrap_or_default()),
                            SseEvent::default().data("[DONE]"),
                        ]);
                    }
                }
            },
        }
    }

    /// A chunk carrying `piece` and the log-probabilities gathered since the last chunk.
    fn piece_chunk(&mut self, piece: Piece, finish: Option<&'static str>) -> SseEvent {
        self.sent_bytes += piece.content.as_ref().map_or(0, String::len);
        let logprobs = self.logprobs.as_mut().and_then(|p| match p {
            PendingLogprobs::Chat(v) if !v.is_empty() => {
                Some(Logprobs::Chat(ChatLogprobs { content: std::mem::take(v), refusal: None }))
            }
            PendingLogprobs::Text(t) if !t.is_empty() => Some(Logprobs::Text(std::mem::take(t))),
            _ => None,
        });
        let tool_calls = (!piece.tool_calls.is_empty()).then_some(piece.tool_calls);
        chunk(&self.meta, Delta { role: None, content: piece.content, tool_calls }, finish, logprobs)
    }
}

enum Logprobs {
    Chat(ChatLogprobs),
    Text(TextLogprobs),
}

/// A content or finish chunk. The guidance echo rides on the finish chunk.
fn chunk(meta: &Meta, delta: Delta, finish: Option<&'static str>, logprobs: Option<Logprobs>) -> SseEvent {
    let usage = meta.include_usage.then_some(None);
    let guidance = finish.is_some().then_some(&meta.guidance);
    match meta.kind {
        Kind::Chat => {
            let logprobs = match logprobs {
                Some(Logprobs::Chat(l)) => Some(l),
                _ => None,
            };
            let choice = ChunkChoice { index: 0, delta, logprobs, finish_reason: finish };
            chunk_event(meta, vec![choice], usage, guidance)
        }
        Kind::Text => {
            let text = delta.content.unwrap_or_default();
            let logprobs = match logprobs {
                Some(Logprobs::Text(l)) => Some(l),
                _ => None,
            };
            let choice = TextChoice { text, index: 0, logprobs, finish_reason: finish };
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
