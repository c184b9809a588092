//! Fuzzing the inputs (property tests): arbitrary JSON at the request → validation path,
//! arbitrary and mutated bytes at the GGUF, safetensors and PEFT readers, arbitrary roles and
//! content at the chat template renderer. The property is the same everywhere: never a panic,
//! always a typed error (for a request, a 4xx in OpenAI's shape: a 5xx would be a bug, and a
//! panic in a blocking task shows up as one).
//!
//! Cases per target: `LETHE_FUZZ_CASES` (default [`DEFAULT_CASES`], sized so the whole file runs
//! in a few seconds on 2 cores); e.g. `LETHE_FUZZ_CASES=20000 cargo test --release --test fuzz`.
//! With `LETHE_FUZZ_STATS=1` (and `--nocapture`) every case prints its target and outcome
//! (`ok`, or the error's first words), to see how deep the inputs get. Results and the crashes
//! found so far: docs/fuzzing.md.

use lethe::config::{ServeArgs, ServeConfig};
use lethe::fixtures::{PeftSpec, TinySpec, write_peft_adapter, write_tiny_gguf, write_tiny_model};
use lethe::model::LoadOptions;
use lethe::server::AppState;
use lethe::server::error::ApiError;
use lethe::server::extract::{self, BodyKeys};
use lethe::server::openai::{ChatCompletionRequest, CommonParams, CompletionRequest};
use lethe::server::validation::{self, Endpoint, TenantContext};
use lethe::tokenizer::{ChatMessage, ChatTemplate};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

const DEFAULT_CASES: u32 = 128;

/// Prints a case's outcome when `LETHE_FUZZ_STATS=1`.
fn note<T, E: std::fmt::Display>(target: &str, r: &Result<T, E>) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var("LETHE_FUZZ_STATS").is_ok_and(|v| v == "1")) {
        let what: String = match r {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string().split_whitespace().take(5).collect::<Vec<_>>().join(" "),
        };
        eprintln!("FUZZ {target}: {what}");
    }
}

fn config(weight: u32) -> Config {
    let cases = std::env::var("LETHE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_CASES);
    // No regression files in the source tree; a failure prints its minimal input.
    Config { cases: cases * weight, failure_persistence: None, ..Config::default() }
}

/// Fixtures written once per run, under the target directory.
fn workdir() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    // Earlier runs' fixtures, whose processes are gone.
    if cfg!(target_os = "linux")
        && let Ok(entries) = std::fs::read_dir(root)
    {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("fuzz-").and_then(|p| p.parse::<u32>().ok())
                && pid != std::process::id()
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = root.join(format!("fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Fixtures {
    dir: PathBuf,
    rt: tokio::runtime::Runtime,
    state: Arc<AppState>,
    /// The tiny model (adapters are checked against it).
    model: Arc<lethe::model::Llama>,
    gguf: Vec<u8>,
    /// Where the GGUF header ends (the tensor data starts).
    gguf_header: usize,
    safetensors: Vec<u8>,
    hf_config: Vec<u8>,
    adapter: lethe::adapters::files::AdapterFiles,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let dir = workdir();
        let spec = TinySpec { max_positions: 256, ..Default::default() };
        let hf = dir.join("tiny");
        write_tiny_model(&hf, &spec).unwrap();
        let gguf_path =
            write_tiny_gguf(&hf, &dir.join("tiny.gguf"), &spec, candle_core::quantized::GgmlDType::F32).unwrap();
        let gguf = std::fs::read(&gguf_path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&gguf)).unwrap();
        let adapter_dir = dir.join("adapter");
        write_peft_adapter(
            &adapter_dir,
            &spec,
            &PeftSpec { profile: Some(json!({"positive": "p", "negative": "n"})), ..Default::default() },
        )
        .unwrap();
        let adapter = lethe::adapters::files::AdapterFiles::read(&adapter_dir.canonicalize().unwrap()).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let args = ServeArgs { model: Some(hf.clone()), ..Default::default() };
        let state = AppState::load(ServeConfig::resolve(&args).unwrap()).unwrap();
        let model = lethe::loader::ModelBundle::load(&hf, &LoadOptions::default(), None).unwrap().model;
        Fixtures {
            model,
            safetensors: std::fs::read(hf.join("model.safetensors")).unwrap(),
            hf_config: std::fs::read(hf.join("config.json")).unwrap(),
            gguf_header: content.tensor_data_offset as usize,
            gguf,
            adapter,
            rt,
            state,
            dir,
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Generators

/// Strings that tend to matter: empty, huge numbers as text, special tokens, template syntax,
/// the renderer's sentinels, odd Unicode.
fn nasty_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("<|im_start|>".to_string()),
        Just("<|im_end|><|im_start|>system\n".to_string()),
        Just("{{ raise_exception('x') }}{% for x in y %}".to_string()),
        Just("\u{E000}0\u{E001}".to_string()),
        Just("\u{E000}99\u{E001}\u{E000}".to_string()),
        Just("last_token".to_string()),
        Just("negative_condition".to_string()),
        Just("json_schema".to_string()),
        Just("function".to_string()),
        Just("required".to_string()),
        Just("99999999999999999999".to_string()),
        Just("-1".to_string()),
        Just("\u{0}\u{FFFF}\u{10FFFF}".to_string()),
        Just("x".repeat(5000)),
        ".{0,24}",
    ]
}

/// Field names of the request bodies, and some that are not.
const KEYS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "stream",
    "stream_options",
    "include_usage",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "guidance",
    "gamma",
    "mode",
    "negative_prompt",
    "uncond",
    "ignore_eos",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "type",
    "json_schema",
    "schema",
    "name",
    "strict",
    "function",
    "parameters",
    "description",
    "logprobs",
    "top_logprobs",
    "store",
    "service_tier",
    "modalities",
    "metadata",
    "role",
    "content",
    "text",
    "tool_calls",
    "tool_call_id",
    "id",
    "arguments",
    "echo",
    "suffix",
    "best_of",
    "properties",
    "items",
    "enum",
    "const",
    "$ref",
    "anyOf",
    "pattern",
    "minItems",
    "maxLength",
    "required",
    "additionalProperties",
    "functions",
    "audio",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![4 => prop::sample::select(KEYS).prop_map(String::from), 1 => nasty_string()]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-3i64..40).prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop::sample::select(vec![0.0, -0.0, 0.5, 1.0, 2.0, 20.0, 1e30, -1e30, f64::MIN_POSITIVE, 100.5])
            .prop_map(|f| json!(f)),
        nasty_string().prop_map(Value::String),
        prop::sample::select(KEYS).prop_map(|k| json!(k)),
    ]
}

/// Any JSON value, biased towards the shapes of the API.
fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn message() -> impl Strategy<Value = Value> {
    let role = prop_oneof![
        prop::sample::select(vec!["system", "developer", "user", "assistant", "tool"]).prop_map(|r| json!(r)),
        json_value(),
    ];
    let content = prop_oneof![
        3 => nasty_string().prop_map(Value::String),
        1 => json_value(),
        1 => prop::collection::vec(
            (prop::sample::select(vec!["text", "image_url"]), prop::option::of(nasty_string()))
                .prop_map(|(t, text)| json!({"type": t, "text": text})),
            0..3
        )
        .prop_map(Value::Array),
    ];
    (role, content, prop::option::of(json_value())).prop_map(|(role, content, extra)| {
        let mut m = json!({"role": role, "content": content});
        if let Some(Value::Object(extra)) = extra {
            m.as_object_mut().unwrap().extend(extra);
        }
        m
    })
}

/// A valid request with some fields replaced, added or removed.
fn near_valid(endpoint: Endpoint) -> impl Strategy<Value = Value> {
    let fields = prop::sample::select(validation::accepted_fields(endpoint)).prop_map(String::from);
    let field = prop_oneof![8 => fields, 1 => key()];
    let edits = prop::collection::vec((field, prop::option::weighted(0.9, json_value())), 0..4);
    let messages = prop::collection::vec(message(), 0..4);
    (edits, messages, any::<bool>()).prop_map(move |(edits, messages, use_messages)| {
        let mut body = match endpoint {
            Endpoint::Chat => json!({
                "model": "tiny",
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 8,
            }),
            Endpoint::Completions => json!({"model": "tiny", "prompt": "Hello", "max_tokens": 8}),
        };
        let obj = body.as_object_mut().unwrap();
        if use_messages && endpoint == Endpoint::Chat {
            obj.insert("messages".into(), Value::Array(messages));
        }
        for (k, v) in edits {
            match v {
                Some(v) => obj.insert(k, v),
                None => obj.remove(&k),
            };
        }
        body
    })
}

/// A change to a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    /// Overwrite the byte at this position (modulo the region).
    Set(usize, u8),
    /// Overwrite 8 bytes with a little-endian integer (counts, lengths, offsets).
    SetU64(usize, u64),
    /// Cut the file here.
    Truncate(usize),
    /// Insert bytes here.
    Insert(usize, Vec<u8>),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let interesting = prop::sample::select(vec![0u64, 1, 2, 7, 255, 1 << 20, u32::MAX as u64, 1 << 40, u64::MAX]);
    let m = prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        2 => (any::<usize>(), prop_oneof![interesting, any::<u64>()]).prop_map(|(i, v)| Mutation::SetU64(i, v)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Mutation::Insert(i, b)),
    ];
    prop::collection::vec(m, 1..6)
}

/// Applies `muts` to `bytes`, positions taken within `region` (the part worth hitting).
fn mutate(bytes: &[u8], region: std::ops::Range<usize>, muts: &[Mutation]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for m in muts {
        let start = region.start.min(out.len());
        let n = (region.end.min(out.len()) - start).max(1);
        match m {
            Mutation::Set(i, b) => {
                if let Some(x) = out.get_mut(start + i % n) {
                    *x = *b;
                }
            }
            Mutation::SetU64(i, v) => {
                let at = start + i % n;
                for (k, b) in v.to_le_bytes().iter().enumerate() {
                    if let Some(x) = out.get_mut(at + k) {
                        *x = *b;
                    }
                }
            }
            Mutation::Truncate(i) => out.truncate(i % (out.len() + 1)),
            Mutation::Insert(i, b) => {
                let at = i % (out.len() + 1);
                out.splice(at..at, b.iter().copied());
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The request → validation path

/// Everything a request body goes through before the engine queues it.
async fn validate_body(state: &Arc<AppState>, endpoint: Endpoint, body: &[u8]) -> Result<(), ApiError> {
    let ctx = TenantContext::of(state, "default")?;
    let prepared = match endpoint {
        Endpoint::Chat => {
            let (req, common, keys): (ChatCompletionRequest, CommonParams, BodyKeys) = extract::parse(body)?;
            validation::check_fields(&keys, endpoint)?;
            validation::prepare_chat(state, &ctx, req, common).await?
        }
        Endpoint::Completions => {
            let (req, common, keys): (CompletionRequest, CommonParams, BodyKeys) = extract::parse(body)?;
            validation::check_fields(&keys, endpoint)?;
            validation::prepare_completion(state, &ctx, req, common).await?
        }
    };
    state.engine.validate(&prepared.request)?;
    Ok(())
}

fn check_request(endpoint: Endpoint, body: &[u8]) -> Result<(), TestCaseError> {
    let f = fixtures();
    let mut body = body.to_vec();
    // The model id the server answers to.
    if let Ok(mut v) = serde_json::from_slice::<Value>(&body)
        && v.get("model") == Some(&json!("tiny"))
    {
        v["model"] = json!(f.state.model_id);
        body = serde_json::to_vec(&v).unwrap();
    }
    let r = f.rt.block_on(validate_body(&f.state, endpoint, &body));
    note(if endpoint == Endpoint::Chat { "chat" } else { "completions" }, &r);
    match r {
        Ok(()) => Ok(()),
        Err(e) => {
            let b = e.body();
            prop_assert!(e.status().is_client_error(), "{} {:?} for {}", e.status(), e, String::from_utf8_lossy(&body));
            prop_assert!(!b.error.message.is_empty());
            Ok(())
        }
    }
}

proptest! {
    #![proptest_config(config(2))]

    #[test]
    fn chat_requests_near_valid_never_panic(body in near_valid(Endpoint::Chat)) {
        check_request(Endpoint::Chat, &serde_json::to_vec(&body).unwrap())?;
    }

    #[test]
    fn completion_requests_near_valid_never_panic(body in near_valid(Endpoint::Completions)) {
        check_request(Endpoint::Completions, &serde_json::to_vec(&body).unwrap())?;
    }
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn arbitrary_json_bodies_never_panic(body in json_value(), chat in any::<bool>()) {
        let endpoint = if chat { Endpoint::Chat } else { Endpoint::Completions };
        check_request(endpoint, &serde_json::to_vec(&body).unwrap())?;
    }

    #[test]
    fn arbitrary_bytes_as_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
        check_request(Endpoint::Chat, &body)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Model and adapter files

fn case_dir(name: &str) -> PathBuf {
    // One directory per test thread: cases of one test run one after the other.
    let d = fixtures().dir.join(format!("{name}-{:?}", std::thread::current().id()).replace(['(', ')'], ""));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Opens a model as the server does (format detection, metadata, tokenizer, every tensor);
/// any failure must be an error value. The tiny GGUF has no vocabulary of its own: `tokenizer`
/// gives it one, so that loading goes on to the tensors.
fn load_model(target: &str, path: &Path, tokenizer: Option<&Path>) {
    let opts = LoadOptions::default();
    let r = lethe::loader::ModelBundle::load(path, &opts, tokenizer);
    note(target, &r);
    if let Ok(bundle) = r {
        // A model that loads must also run.
        let _ = bundle.tokenizer.encode_prompt("Hello");
    }
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn mutated_gguf_files_are_errors_not_crashes(muts in mutations(), region in 0..4u8, vocab in prop::bool::weighted(0.2)) {
        let f = fixtures();
        // The tensor infos (names, shapes, types, offsets) end the header; the vocabulary is
        // most of the rest.
        let region = match region {
            0 | 1 => f.gguf_header.saturating_sub(2048)..f.gguf_header,
            2 => 0..f.gguf_header,
            _ => 0..f.gguf.len(),
        };
        let bytes = mutate(&f.gguf, region, &muts);
        let path = case_dir("gguf").join("m.gguf");
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(g) = lethe::model::load::gguf::GgufFile::open(&path) {
            let _ = g.config();
            let _ = lethe::tokenizer::Tokenizer::from_gguf(g.metadata());
        }
        let tokenizer = (!vocab).then(|| f.dir.join("tiny").join("tokenizer.json"));
        load_model("gguf", &path, tokenizer.as_deref());
    }

    #[test]
    fn arbitrary_gguf_headers_are_errors_not_crashes(
        version in prop::sample::select(vec![1u32, 2, 3, 4, u32::MAX]),
        rest in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(version.to_le_bytes());
        bytes.extend(rest);
        let path = case_dir("gguf-raw").join("r.gguf");
        std::fs::write(&path, &bytes).unwrap();
        load_model("gguf-raw", &path, None);
    }

    #[test]
    fn mutated_safetensors_models_are_errors_not_crashes(
        muts in mutations(),
        header_only in prop::bool::weighted(0.8),
        config in prop::option::weighted(0.1, json_value()),
    ) {
        let f = fixtures();
        let header = 8 + u64::from_le_bytes(f.safetensors[..8].try_into().unwrap()) as usize;
        let region = if header_only { 0..header } else { 0..f.safetensors.len() };
        let dir = case_dir("st");
        std::fs::write(dir.join("model.safetensors"), mutate(&f.safetensors, region, &muts)).unwrap();
        let config = match config {
            Some(v) => serde_json::to_vec(&v).unwrap(),
            None => f.hf_config.clone(),
        };
        std::fs::write(dir.join("config.json"), config).unwrap();
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            if !dir.join(name).exists() {
                std::fs::copy(f.dir.join("tiny").join(name), dir.join(name)).unwrap();
            }
        }
        if let Ok(st) = lethe::model::load::safetensors::SafetensorsDir::open(&dir) {
            let _ = st.config();
        }
        load_model("safetensors", &dir, None);
    }

    #[test]
    fn safetensors_headers_with_arbitrary_entries_are_errors_not_crashes(
        entry in prop_oneof![
            1 => json_value(),
            1 => prop::sample::select(vec!["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F64"]).prop_map(|d| json!(d)),
            2 => prop::collection::vec(prop_oneof![0u64..70, Just(1u64 << 33), Just(u64::MAX)], 0..4).prop_map(|v| json!(v)),
        ],
        field in prop::sample::select(vec!["dtype", "shape", "data_offsets", "__metadata__", "whole"]),
    ) {
        let f = fixtures();
        let n = u64::from_le_bytes(f.safetensors[..8].try_into().unwrap()) as usize;
        let mut header: Value = serde_json::from_slice(&f.safetensors[8..8 + n]).unwrap();
        let name = header.as_object().unwrap().keys().find(|k| *k != "__metadata__").unwrap().clone();
        match field {
            "whole" => header[&name] = entry,
            "__metadata__" => header["__metadata__"] = entry,
            other => header[&name][other] = entry,
        }
        let text = serde_json::to_vec(&header).unwrap();
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend(&text);
        bytes.extend(&f.safetensors[8 + n..]);
        let dir = case_dir("st-entry");
        std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
        std::fs::write(dir.join("config.json"), &f.hf_config).unwrap();
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            if !dir.join(name).exists() {
                std::fs::copy(f.dir.join("tiny").join(name), dir.join(name)).unwrap();
            }
        }
        load_model("safetensors-entry", &dir, None);
    }

    #[test]
    fn mutated_peft_adapters_are_errors_not_crashes(
        muts in mutations(),
        config_edits in prop::collection::vec((key_or_peft(), json_value()), 0..3),
        profile in prop::option::weighted(0.3, json_value()),
        touch_weights in prop::bool::weighted(0.7),
    ) {
        let f = fixtures();
        let mut files = f.adapter.clone();
        let mut config: Value = serde_json::from_slice(&files.config).unwrap();
        for (k, v) in config_edits {
            config[k] = v;
        }
        files.config = serde_json::to_vec(&config).unwrap();
        if touch_weights {
            let header = 8 + u64::from_le_bytes(files.weights[..8].try_into().unwrap()) as usize;
            files.weights = mutate(&files.weights, 0..header, &muts);
        }
        if let Some(p) = profile {
            files.profile = Some(serde_json::to_vec(&p).unwrap());
        }
        let model = &f.model;
        note("peft", &lethe::adapters::peft::parse(&files, model));
        let _ = lethe::adapters::peft::parse_file(&files, model.config());
    }
}

fn key_or_peft() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
            "peft_type", "task_type", "bias", "fan_in_fan_out", "layers_to_transform", "modules_to_save",
            "base_model_name_or_path", "lora_dropout", "init_lora_weights",
        ])
        .prop_map(String::from),
        1 => key(),
    ]
}

// ---------------------------------------------------------------------------------------------
// The chat template renderer

fn templates() -> &'static Vec<(String, ChatTemplate)> {
    static T: OnceLock<Vec<(String, ChatTemplate)>> = OnceLock::new();
    T.get_or_init(|| {
        let mut out = vec![(
            "chatml (tiny fixture)".to_string(),
            ChatTemplate::new(lethe::fixtures::CHATML_TEMPLATE, "", "<|im_end|>").unwrap(),
        )];
        // The default model's own template, when it has been fetched.
        let real = Path::new(env!("CARGO_MANIFEST_DIR")).join(lethe::DEFAULT_MODEL_PATH);
        if let Ok(g) = lethe::model::load::gguf::GgufFile::open(&real)
            && let Some(src) = g.metadata().get("tokenizer.chat_template").and_then(|v| v.to_string().ok())
        {
            out.push(("SmolLM2".into(), ChatTemplate::new(src, "<|im_start|>", "<|im_end|>").unwrap()));
        } else if std::env::var("LETHE_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
            panic!("{} is missing (LETHE_REQUIRE_MODEL=1)", real.display());
        }
        out
    })
}

fn chat_messages() -> impl Strategy<Value = Vec<ChatMessage>> {
    let role = prop_oneof![
        3 => prop::sample::select(vec!["system", "user", "assistant", "tool"]).prop_map(String::from),
        1 => nasty_string(),
    ];
    prop::collection::vec((role, nasty_string()).prop_map(|(r, c)| ChatMessage::new(r, c)), 0..6)
}

proptest! {
    #![proptest_config(config(2))]

    #[test]
    fn the_chat_template_renders_any_messages_or_says_why(messages in chat_messages(), add_generation in any::<bool>()) {
        for (_, t) in templates() {
            note("template", &t.render_text(&messages, add_generation));
            if let Ok(segments) = t.render_segments(&messages, add_generation) {
                // Content comes back verbatim, each message at most once.
                for s in segments {
                    if let lethe::tokenizer::Segment::Content { message, text } = s {
                        prop_assert_eq!(&text, &messages[message].content);
                    }
                }
            }
        }
        // Through the tokenizer and the guided rows, as a request is.
        let f = fixtures();
        let _ = f.state.tokenizer.encode_chat(&messages, add_generation);
        let conds = lethe::engine::Conditions { positive: "Be kind.".into(), negative: "Be rude.".into() };
        for placement in [lethe::engine::prompt::Placement::System, lethe::engine::prompt::Placement::SystemDefault] {
            let _ = lethe::engine::prompt::chat_rows_placed(
                &f.state.tokenizer,
                &messages,
                Some((&conds, &lethe::engine::UncondSource::NegativeCondition)),
                placement,
            );
        }
    }
}

/// Deeply nested values where the server recurses: JSON schemas (response_format, tool
/// parameters) and the body itself, up to serde_json's nesting limit.
fn nested(depth: usize, kind: u8) -> Value {
    let mut v = json!({"type": "string"});
    for _ in 0..depth {
        v = match kind % 4 {
            0 => json!({"type": "object", "properties": {"a": v}, "required": ["a"]}),
            1 => json!({"type": "array", "items": v}),
            2 => json!({"anyOf": [v, {"type": "null"}]}),
            _ => json!([v]),
        };
    }
    v
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn deeply_nested_schemas_are_errors_not_crashes(depth in 1usize..130, kind in 0u8..4, tool in any::<bool>()) {
        let schema = nested(depth, kind);
        let body = if tool {
            json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                   "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": schema}}}}],
                   "tool_choice": "required"})
        } else {
            json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                   "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})
        };
        check_request(Endpoint::Chat, &serde_json::to_vec(&body).unwrap())?;
    }
}
