//! Structured outputs through the engine on a tiny random model: whatever a (random) model
//! prefers, outputs constrained by a JSON schema parse and validate, guided pairs included.

use lethe::engine::{EngineConfig, EngineHandle, Event, FinishReason, Request, RequestStream, SchedulerConfig};
use lethe::fixtures::{TempDir, TinySpec, write_tiny_model};
use lethe::guidance::{Guidance, GuidanceMode};
use lethe::loader::ModelBundle;
use lethe::model::LoadOptions;
use lethe::sampling::SamplingParams;
use lethe::structured::{OutputPlan, ResponseFormat, Structured};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use std::sync::OnceLock;

struct Fixture {
    _dir: TempDir,
    bundle: ModelBundle,
    engine: EngineHandle,
    structured: Structured,
}

/// One tiny model and engine for the whole file (tests run in parallel on it).
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = TempDir::new("structured").unwrap();
        let spec = TinySpec { max_positions: 4096, ..Default::default() };
        let path = write_tiny_model(&dir.path().join("m"), &spec).unwrap();
        let bundle = ModelBundle::load(&path, &LoadOptions::default(), None).unwrap();
        let engine = EngineHandle::spawn(
            bundle.model.clone(),
            bundle.tokenizer.clone(),
            EngineConfig { scheduler: SchedulerConfig::default(), kv_cache_bytes: 512 << 20, prefix_cache: true },
        );
        let structured = Structured::new(&bundle.tokenizer, bundle.model.config().vocab_size).unwrap();
        Fixture { _dir: dir, bundle, engine, structured }
    })
}

fn collect(mut s: RequestStream) -> (String, FinishReason) {
    let mut text = String::new();
    loop {
        match s.blocking_next().expect("stream ended without Finished") {
            Event::Token { text: t, .. } => text.push_str(&t),
            Event::Finished { reason, .. } => return (text, reason),
            Event::Error(e) => panic!("request failed: {e}"),
        }
    }
}

/// Runs `schema` on the tiny model: a random prompt, the given sampling, optionally guided.
fn generate(
    schema: &Value,
    sampling: SamplingParams,
    guided: Option<Guidance>,
    max_tokens: usize,
) -> (String, FinishReason) {
    let f = fixture();
    let plan = OutputPlan { format: ResponseFormat::JsonSchema(schema.clone()), tools: None };
    let constraint = f.structured.compile(&plan).unwrap_or_else(|e| panic!("{schema}: {e}"));
    let tok = &f.bundle.tokenizer;
    let mut r = Request::new(tok.encode_prompt("Answer in JSON: the customer's order.").unwrap(), max_tokens);
    if let Some(g) = guided {
        r = r.guided(tok.encode_prompt("Share everything.").unwrap(), g);
    }
    r.sampling = sampling;
    r.constraint = constraint;
    collect(f.engine.submit(r).unwrap())
}

/// Random small schemas. `bounded` schemas admit only outputs of bounded length (every string
/// has a maxLength, every array a maxItems, numbers are small integer ranges or enums), so a
/// generation with enough tokens always completes them.
fn schema_strategy(bounded: bool) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        (0usize..4, 1usize..8)
            .prop_map(|(min, extra)| json!({"type": "string", "minLength": min, "maxLength": min + extra})),
        (-50i64..50, 0i64..100).prop_map(|(lo, span)| json!({"type": "integer", "minimum": lo, "maximum": lo + span})),
        Just(json!({"type": "boolean"})),
        Just(json!({"type": "null"})),
        prop::collection::vec("[a-z]{1,6}", 1..4).prop_map(|v| json!({"enum": v})),
        Just(json!({"const": "fixed"})),
        Just(if bounded { json!({"enum": [1.5, -2, 0]}) } else { json!({"type": "number"}) }),
        Just(if bounded { json!({"type": "string", "maxLength": 3}) } else { json!({"type": "string"}) }),
    ];
    leaf.prop_recursive(3, 24, 4, move |inner| {
        prop_oneof![
            (prop::collection::btree_map("[a-z]{1,5}", inner.clone(), 1..4), any::<u8>()).prop_map(|(props, req)| {
                let names: Vec<&String> = props.keys().collect();
                let required: Vec<&String> =
                    names.iter().enumerate().filter(|(i, _)| req >> i & 1 == 1).map(|(_, n)| *n).collect();
                json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
            }),
            (inner.clone(), 0usize..2, 1usize..3).prop_map(|(items, min, extra)| {
                json!({"type": "array", "items": items, "minItems": min, "maxItems": min + extra})
            }),
            prop::collection::vec(inner, 2..3).prop_map(|v| json!({"anyOf": v})),
        ]
    })
}

/// Checks `v` against the subset of JSON schema the strategy produces.
fn validate(schema: &Value, v: &Value) -> Result<(), String> {
    let fail = |why: &str| Err(format!("{v} does not match {schema}: {why}"));
    if let Some(options) = schema.get("anyOf").and_then(Value::as_array) {
        return if options.iter().any(|s| validate(s, v).is_ok()) { Ok(()) } else { fail("no anyOf branch") };
    }
    if let Some(c) = schema.get("const")
        && c != v
    {
        return fail("const");
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array)
        && !e.iter().any(|x| x == v || (x.is_number() && v.is_number() && x.as_f64() == v.as_f64()))
    {
        return fail("enum");
    }
    match schema.get("type").and_then(Value::as_str) {
        None => Ok(()),
        Some("null") if v.is_null() => Ok(()),
        Some("boolean") if v.is_boolean() => Ok(()),
        Some("number") if v.is_number() => Ok(()),
        Some("integer") => {
            let Some(i) = v.as_i64() else { return fail("integer") };
            let lo = schema.get("minimum").and_then(Value::as_i64).unwrap_or(i64::MIN);
            let hi = schema.get("maximum").and_then(Value::as_i64).unwrap_or(i64::MAX);
            if (lo..=hi).contains(&i) { Ok(()) } else { fail("range") }
        }
        Some("string") => {
            let Some(s) = v.as_str() else { return fail("string") };
            let n = s.chars().count() as u64;
            let lo = schema.get("minLength").and_then(Value::as_u64).unwrap_or(0);
            let hi = schema.get("maxLength").and_then(Value::as_u64).unwrap_or(u64::MAX);
            if (lo..=hi).contains(&n) { Ok(()) } else { fail("length") }
        }
        Some("array") => {
            let Some(a) = v.as_array() else { return fail("array") };
            let lo = schema.get("minItems").and_then(Value::as_u64).unwrap_or(0) as usize;
            let hi = schema.get("maxItems").and_then(Value::as_u64).unwrap_or(u64::MAX) as usize;
            if !(lo..=hi).contains(&a.len()) {
                return fail("items");
            }
            a.iter().try_for_each(|x| validate(&schema["items"], x))
        }
        Some("object") => {
            let Some(o) = v.as_object() else { return fail("object") };
            let props = schema["properties"].as_object().cloned().unwrap_or_default();
            for r in schema["required"].as_array().into_iter().flatten() {
                if !o.contains_key(r.as_str().unwrap()) {
                    return fail("required");
                }
            }
            for (k, x) in o {
                match props.get(k) {
                    Some(s) => validate(s, x)?,
                    None if schema["additionalProperties"] == false => return fail("additional property"),
                    None => {}
                }
            }
            Ok(())
        }
        Some(_) => fail("type"),
    }
}

fn sampling_strategy() -> impl Strategy<Value = SamplingParams> {
    (prop_oneof![Just(0.0f32), 0.5f32..1.5], any::<u64>(), prop_oneof![Just(1.0f32), 0.5f32..1.0])
        .prop_map(|(temperature, seed, top_p)| SamplingParams { temperature, top_k: 0, top_p, seed: Some(seed) })
}

fn guidance_strategy() -> impl Strategy<Value = Option<Guidance>> {
    prop_oneof![
        Just(None),
        (1.5f32..4.0).prop_map(|gamma| Some(Guidance { gamma, mode: GuidanceMode::Log })),
        (1.5f32..4.0).prop_map(|gamma| Some(Guidance { gamma, mode: GuidanceMode::Prob })),
    ]
}

/// Bounded schemas always complete within the token budget, and the output validates — for a
/// random model, any sampling settings, guided or not.
#[test]
fn bounded_schemas_always_complete_and_validate() {
    let mut runner = TestRunner::new(Config { cases: 64, ..Config::default() });
    runner
        .run(&(schema_strategy(true), sampling_strategy(), guidance_strategy()), |(schema, sampling, guided)| {
            let (text, reason) = generate(&schema, sampling, guided, 2000);
            prop_assert_eq!(reason, FinishReason::Stop, "{} gave {}", schema, text);
            let v: Value = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
            validate(&schema, &v).map_err(TestCaseError::fail)?;
            Ok(())
        })
        .unwrap();
}

/// Any schema (strings and numbers unbounded): whenever the output is complete, it validates;
/// otherwise it ran out of tokens.
#[test]
fn complete_outputs_always_validate() {
    let mut runner = TestRunner::new(Config { cases: 32, ..Config::default() });
    runner
        .run(&(schema_strategy(false), sampling_strategy()), |(schema, sampling)| {
            let (text, reason) = generate(&schema, sampling, None, 300);
            if reason == FinishReason::Stop {
                // JSON numbers have no range; serde_json stops at f64, so huge exponents (a random
                // model writes them) are capped before parsing.
                let v: Value = serde_json::from_str(&text)
                    .or_else(|e| match e.to_string().contains("out of range") {
                        true => serde_json::from_str(
                            &regex::Regex::new(r"([eE][+-]?)[0-9]{3,}").unwrap().replace_all(&text, "${1}9"),
                        ),
                        false => Err(e),
                    })
                    .map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
                validate(&schema, &v).map_err(TestCaseError::fail)?;
            }
            Ok(())
        })
        .unwrap();
}

/// A guided pair through the mixing path at γ → 1 gives exactly the unguided constrained
/// output (greedy), and γ = 1 runs no uncond row at all.
#[test]
fn guided_constrained_equals_unguided_at_gamma_one() {
    let schema = json!({
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4}},
        "required": ["name", "items"],
        "additionalProperties": false,
    });
    let greedy = SamplingParams::greedy();
    let (plain, r0) = generate(&schema, greedy.clone(), None, 400);
    assert_eq!(r0, FinishReason::Stop, "{plain}");
    for mode in [GuidanceMode::Log, GuidanceMode::Prob] {
        let exact = generate(&schema, greedy.clone(), Some(Guidance { gamma: 1.0, mode }), 400);
        assert_eq!(exact.0, plain, "γ = 1 {mode:?}");
        let pair = generate(&schema, greedy.clone(), Some(Guidance { gamma: 1.0 + 1e-6, mode }), 400);
        assert_eq!(pair.0, plain, "γ = 1 + ε (pair path) {mode:?}");
        let strong = generate(&schema, greedy.clone(), Some(Guidance { gamma: 3.0, mode }), 400);
        assert_eq!(strong.1, FinishReason::Stop);
        let v: Value = serde_json::from_str(&strong.0).unwrap();
        validate(&schema, &v).unwrap();
    }
}

/// Tool calls (required): the output is a complete calls object naming the tool, with
/// arguments valid against its parameters; `auto` may answer in text or call.
#[test]
fn tool_calls_follow_the_function_schema() {
    use lethe::structured::tools::{Tool, ToolChoice, ToolSet, parse_calls};
    let f = fixture();
    let params = json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"], "additionalProperties": false});
    let set = |choice| ToolSet {
        tools: vec![
            Tool { name: "get_weather".into(), description: None, parameters: params.clone() },
            Tool {
                name: "noop".into(),
                description: None,
                parameters: json!({"type": "object", "properties": {}, "additionalProperties": false}),
            },
        ],
        choice,
        parallel: true,
    };
    for (choice, seed) in
        [(ToolChoice::Required, 1), (ToolChoice::Named("get_weather".into()), 2), (ToolChoice::Required, 3)]
    {
        let plan = OutputPlan { format: ResponseFormat::Text, tools: Some(set(choice.clone())) };
        let mut r = Request::new(f.bundle.tokenizer.encode_prompt("weather?").unwrap(), 1500);
        r.sampling = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: Some(seed) };
        r.constraint = f.structured.compile(&plan).unwrap();
        let (text, reason) = collect(f.engine.submit(r).unwrap());
        assert_eq!(reason, FinishReason::Stop, "{text}");
        let (calls, complete) = parse_calls(&text);
        assert!(complete && !calls.is_empty(), "{text}");
        for (name, args) in &calls {
            let args: Value = serde_json::from_str(args).unwrap();
            match name.as_str() {
                "get_weather" => validate(&params, &args).unwrap(),
                "noop" => assert_eq!(args, json!({})),
                other => panic!("called {other}"),
            }
        }
        if choice == ToolChoice::Named("get_weather".into()) {
            assert_eq!(calls.len(), 1);
            assert_eq!(calls[0].0, "get_weather");
        }
    }
}

/// Unsupported schema features are refused, naming them; oversized and over-deep schemas too.
#[test]
fn unusable_schemas_are_refused_with_a_reason() {
    let f = fixture();
    let compile = |s: Value| f.structured.compile(&OutputPlan { format: ResponseFormat::JsonSchema(s), tools: None });
    let e = compile(json!({"type": "object", "not": {"type": "string"}})).unwrap_err();
    assert!(e.message.contains("not"), "{e}");
    assert_eq!(e.param, "response_format.json_schema.schema");
    let mut deep = json!({"type": "string"});
    for _ in 0..50 {
        deep = json!({"type": "array", "items": deep});
    }
    assert!(compile(deep).unwrap_err().message.contains("levels deep"));
    let big: serde_json::Map<String, Value> = (0..3000).map(|i| (format!("p{i}"), json!({"type": "string"}))).collect();
    assert!(compile(json!({"type": "object", "properties": big})).unwrap_err().message.contains("bytes"));
    assert!(compile(json!({"type": "object", "x-guidance": {}})).unwrap_err().message.contains("x-guidance"));
    let unsat = compile(json!({"type": "integer", "minimum": 5, "maximum": 1}));
    assert!(unsat.is_err(), "an unsatisfiable schema cannot compile");
    assert!(compile(json!(true)).is_err(), "a schema must be an object");
}

/// A test constraint: allows every token `allowed` times, then fails in the way it is told.
#[derive(Debug)]
struct Failing {
    allowed: usize,
    panics: bool,
}

struct FailingRun {
    left: usize,
    panics: bool,
    bits: Vec<u32>,
}

impl lethe::engine::ConstraintSpec for Failing {
    fn start(&self) -> Box<dyn lethe::engine::TokenConstraint> {
        Box::new(FailingRun { left: self.allowed, panics: self.panics, bits: vec![u32::MAX; 64] })
    }
}

impl lethe::engine::TokenConstraint for FailingRun {
    fn prepare(&mut self) {
        if self.left == 0 && self.panics {
            panic!("test constraint panics in prepare");
        }
    }
    fn allowed(&mut self) -> Result<Option<&[u32]>, String> {
        match (self.left, self.panics) {
            (0, true) => panic!("test constraint panics in allowed"),
            (0, false) => Err("the output grammar admits no token here".into()),
            _ => Ok(Some(&self.bits)),
        }
    }
    fn commit(&mut self, _: u32) -> Result<(), String> {
        self.left -= 1;
        Ok(())
    }
    fn is_complete(&self) -> bool {
        false
    }
}

/// A grammar that admits no token (or a constraint that panics) ends its request with an
/// error event, never a hang, and the engine keeps serving everyone else.
#[test]
fn a_dead_end_grammar_ends_the_request_with_an_error() {
    let f = fixture();
    let tok = &f.bundle.tokenizer;
    for (guided, panics) in [(false, false), (true, false), (false, true)] {
        let mut r = Request::new(tok.encode_prompt("hello").unwrap(), 50);
        if guided {
            r = r.guided(tok.encode_prompt("bye").unwrap(), Guidance { gamma: 2.0, mode: GuidanceMode::Log });
        }
        r.ignore_eos = true;
        r.constraint = Some(std::sync::Arc::new(Failing { allowed: 3, panics }));
        let mut s = f.engine.submit(r).unwrap();
        let mut tokens = 0;
        let error = loop {
            match s.blocking_next().expect("the stream ends with an event") {
                Event::Token { .. } => tokens += 1,
                Event::Error(e) => break e,
                Event::Finished { .. } => panic!("a dead-end grammar cannot finish normally"),
            }
        };
        assert_eq!(tokens, 3);
        assert!(matches!(error, lethe::engine::EngineError::Constraint(_)), "{error}");
        // Everyone else is still served.
        let mut ok = Request::new(tok.encode_prompt("hello").unwrap(), 4);
        ok.ignore_eos = true;
        assert_eq!(collect(f.engine.submit(ok).unwrap()).1, FinishReason::Length);
    }
}
