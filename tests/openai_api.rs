//! OpenAI request fields over HTTP with a tiny in-process model: `response_format`, `tools` and
//! `tool_choice` (plain and streamed), tool results in later turns, `logprobs`, `logit_bias`,
//! and the refusal of every field lethe does not implement.

mod common;

use common::http::{Server, assert_error, chat, sse};
use lethe::fixtures::TinySpec;
use serde_json::{Value, json};

/// A server whose tiny model has room for tool descriptions (byte-level tokens are short).
async fn start() -> Server {
    Server::start_with(TinySpec { max_positions: 2048, ..Default::default() }, |_| {}).await
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"], "additionalProperties": false},
    }})
}

async fn stream_chunks(s: &Server, body: Value) -> Vec<Value> {
    let resp = reqwest::Client::new().post(s.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let events = sse(resp).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_and_json_object_outputs_parse_and_validate() {
    let s = start().await;
    let schema = json!({"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "additionalProperties": false});
    for guidance in [json!(null), json!({"gamma": 3.0, "mode": "log"}), json!({"gamma": 2.0, "mode": "prob"})] {
        let mut extra = json!({"max_tokens": 200, "response_format": {"type": "json_schema", "json_schema": {"name": "person", "strict": true, "schema": schema}}});
        if !guidance.is_null() {
            extra["guidance"] = guidance;
        }
        let (status, body) = s.post("/v1/chat/completions", chat(&s.model(), extra)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
        let v: Value = serde_json::from_str(body["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
        assert!(v["name"].as_str().unwrap().chars().count() <= 8);
        assert!((0..=120).contains(&v["age"].as_i64().unwrap()));
    }
    let (status, body) = s
        .post(
            "/v1/chat/completions",
            chat(
                &s.model(),
                json!({"max_tokens": 300, "temperature": 0.8, "seed": 3, "response_format": {"type": "json_object"}}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    if body["choices"][0]["finish_reason"] == "stop" {
        let v: Value = serde_json::from_str(body["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
        assert!(v.is_object());
    } else {
        assert!(body["choices"][0]["message"]["content"].as_str().unwrap().starts_with('{'));
    }
    // What cannot be compiled is a 400 naming it; so is a schema lethe will not take.
    let bad = |schema: Value| json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}});
    let (status, body) =
        s.post("/v1/chat/completions", chat(&s.model(), bad(json!({"type": "object", "if": {}, "then": {}})))).await;
    assert_error(status, &body, 400, Some("response_format.json_schema.schema"));
    assert!(body["error"]["message"].as_str().unwrap().contains("\"if\""), "{body}");
    let (status, body) =
        s.post("/v1/chat/completions", chat(&s.model(), bad(json!({"$ref": "https://example.com/s.json"})))).await;
    assert_error(status, &body, 400, Some("response_format.json_schema.schema"));
    let (status, body) =
        s.post("/v1/chat/completions", chat(&s.model(), json!({"response_format": {"type": "xml"}}))).await;
    assert_error(status, &body, 400, Some("response_format.type"));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_plain_and_streamed_agree() {
    let s = start().await;
    for choice in [json!("required"), json!({"type": "function", "function": {"name": "get_weather"}})] {
        let extra = json!({"max_tokens": 200, "tools": [weather_tool()], "tool_choice": choice});
        let (status, body) = s.post("/v1/chat/completions", chat(&s.model(), extra.clone())).await;
        assert_eq!(status, 200, "{body}");
        let choice0 = &body["choices"][0];
        assert_eq!(choice0["finish_reason"], "tool_calls", "{body}");
        assert!(choice0["message"]["content"].is_null());
        let calls = choice0["message"]["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty());
        for c in calls {
            assert!(c["id"].as_str().unwrap().starts_with("call_"));
            assert_eq!(c["type"], "function");
            assert_eq!(c["function"]["name"], "get_weather");
            let args: Value = serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
            assert!(["C", "F"].contains(&args["unit"].as_str().unwrap()), "{args}");
        }
        // Streamed: a first delta per call with id and name, then argument fragments.
        let mut streamed = extra.clone();
        streamed["stream"] = json!(true);
        let chunks = stream_chunks(&s, chat(&s.model(), streamed)).await;
        let deltas: Vec<&Value> =
            chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array()).flatten().collect();
        let mut rebuilt: Vec<(String, String)> = Vec::new();
        for d in deltas {
            let i = d["index"].as_u64().unwrap() as usize;
            if let Some(name) = d["function"]["name"].as_str() {
                assert_eq!(i, rebuilt.len());
                assert!(d["id"].as_str().unwrap().starts_with("call_"));
                rebuilt.push((name.to_string(), String::new()));
            }
            rebuilt[i].1.push_str(d["function"]["arguments"].as_str().unwrap());
        }
        let plain: Vec<(String, String)> = calls
            .iter()
            .map(|c| {
                (c["function"]["name"].as_str().unwrap().into(), c["function"]["arguments"].as_str().unwrap().into())
            })
            .collect();
        assert_eq!(rebuilt, plain);
        assert!(chunks.iter().all(|c| c["choices"][0]["delta"]["content"].as_str().is_none_or(str::is_empty)));
        assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");
    }
    // `none`: no call; `auto`: either, well formed.
    for choice in ["none", "auto"] {
        let (status, body) = s
            .post("/v1/chat/completions", chat(&s.model(), json!({"tools": [weather_tool()], "tool_choice": choice})))
            .await;
        assert_eq!(status, 200, "{body}");
        let m = &body["choices"][0]["message"];
        if choice == "none" || body["choices"][0]["finish_reason"] != "tool_calls" {
            assert!(m["content"].is_string() && m.get("tool_calls").is_none(), "{body}");
        }
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_results_come_back_in_later_turns() {
    let s = start().await;
    let turns = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"C\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
    ]);
    let body = json!({"model": s.model(), "messages": turns, "tools": [weather_tool()], "max_tokens": 8});
    let (status, v) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{v}");
    // The tool result is part of the prompt: it makes the prompt longer.
    let mut shorter = body.clone();
    shorter["messages"][2]["content"] = json!("x");
    let (_, w) = s.post("/v1/chat/completions", shorter).await;
    assert!(v["usage"]["prompt_tokens"].as_u64() > w["usage"]["prompt_tokens"].as_u64(), "{v} {w}");
    let mut orphan = body.clone();
    orphan["messages"][2]["tool_call_id"] = json!("call_9");
    let (status, v) = s.post("/v1/chat/completions", orphan).await;
    assert_error(status, &v, 400, Some("messages[2].tool_call_id"));
    let mut broken = body.clone();
    broken["messages"][1]["tool_calls"][0]["function"]["arguments"] = json!("{not json");
    let (status, v) = s.post("/v1/chat/completions", broken).await;
    assert_error(status, &v, 400, Some("messages[1].tool_calls[0].function.arguments"));
    let (status, v) = s
        .post(
            "/v1/chat/completions",
            chat(
                &s.model(),
                json!({"tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            ),
        )
        .await;
    assert_error(status, &v, 400, Some("tool_choice.function.name"));
    let mut dup = weather_tool();
    dup["function"]["parameters"] = json!({"type": "array"});
    let (status, v) = s.post("/v1/chat/completions", chat(&s.model(), json!({"tools": [dup]}))).await;
    assert_error(status, &v, 400, Some("tools[0].function.parameters"));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_chat_and_completions() {
    let s = start().await;
    // Greedy: the chosen token is the most likely one.
    let (_, body) =
        s.post("/v1/chat/completions", chat(&s.model(), json!({"logprobs": true, "top_logprobs": 1}))).await;
    for e in body["choices"][0]["logprobs"]["content"].as_array().unwrap() {
        assert_eq!(e["top_logprobs"][0]["bytes"], e["bytes"], "{e}");
        assert!((e["top_logprobs"][0]["logprob"].as_f64().unwrap() - e["logprob"].as_f64().unwrap()).abs() < 1e-6);
    }
    // No special tokens (bias -100), so every token is text.
    let no_specials = json!({"0": -100, "1": -100, "2": -100});
    for guidance in [json!(null), json!({"gamma": 3.0, "mode": "log"}), json!({"gamma": 3.0, "mode": "prob"})] {
        let mut extra = json!({"logprobs": true, "top_logprobs": 3, "logit_bias": no_specials});
        if !guidance.is_null() {
            extra["guidance"] = guidance;
        }
        let (status, body) = s.post("/v1/chat/completions", chat(&s.model(), extra.clone())).await;
        assert_eq!(status, 200, "{body}");
        let content = body["choices"][0]["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len() as u64, body["usage"]["completion_tokens"].as_u64().unwrap());
        let text: Vec<u8> = content
            .iter()
            .flat_map(|e| e["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8))
            .collect();
        assert_eq!(String::from_utf8_lossy(&text), body["choices"][0]["message"]["content"].as_str().unwrap());
        for e in content {
            let lp = e["logprob"].as_f64().unwrap();
            let top = e["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 3);
            assert!(lp <= 0.0 && lp <= top[0]["logprob"].as_f64().unwrap() + 1e-6, "{e}");
            assert!(top.windows(2).all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()));
        }
        // Streaming carries the same entries.
        extra["stream"] = json!(true);
        let chunks = stream_chunks(&s, chat(&s.model(), extra)).await;
        let streamed: Vec<Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
            .flatten()
            .cloned()
            .collect();
        assert_eq!(&streamed, content);
    }
    let (status, body) = s
        .post("/v1/completions", json!({"model": s.model(), "prompt": "The capital", "max_tokens": 5, "temperature": 0, "logprobs": 2, "ignore_eos": true}))
        .await;
    assert_eq!(status, 200, "{body}");
    let lp = &body["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 5);
    assert!(lp["top_logprobs"].as_array().unwrap().iter().all(|m| (1..=2).contains(&m.as_object().unwrap().len())));
    let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    for (body, param) in [
        (chat(&s.model(), json!({"top_logprobs": 2})), "top_logprobs"),
        (chat(&s.model(), json!({"logprobs": true, "top_logprobs": 21})), "top_logprobs"),
    ] {
        let (status, v) = s.post("/v1/chat/completions", body).await;
        assert_error(status, &v, 400, Some(param));
    }
    let (status, v) = s.post("/v1/completions", json!({"model": s.model(), "prompt": "x", "logprobs": 6})).await;
    assert_error(status, &v, 400, Some("logprobs"));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_steers_and_unknown_fields_are_refused() {
    let s = start().await;
    // Push the first token of " fox" to the top: greedy decoding then writes it every time.
    let target = s.state.tokenizer.encode_plain(" fox").unwrap()[0];
    let want = s.state.tokenizer.decode(&[target], false).unwrap();
    let (status, biased) = s
        .post(
            "/v1/chat/completions",
            chat(&s.model(), json!({"max_tokens": 3, "logit_bias": {target.to_string(): 100}})),
        )
        .await;
    assert_eq!(status, 200, "{biased}");
    assert_eq!(biased["choices"][0]["message"]["content"].as_str().unwrap(), want.repeat(3), "{biased}");
    for bias in [json!({"999999": 1}), json!({"abc": 1}), json!({"5": 101})] {
        let (status, v) = s.post("/v1/chat/completions", chat(&s.model(), json!({"logit_bias": bias}))).await;
        assert_error(status, &v, 400, Some("logit_bias"));
    }
    for (field, value) in [
        ("frobnicate", json!(1)),
        ("functions", json!([])),
        ("function_call", json!("auto")),
        ("reasoning_effort", json!("low")),
        ("audio", json!({})),
        ("store", json!(true)),
        ("service_tier", json!("flex")),
        ("modalities", json!(["audio"])),
    ] {
        let mut body = chat(&s.model(), json!({}));
        body[field] = value;
        let (status, v) = s.post("/v1/chat/completions", body).await;
        assert_error(status, &v, 400, Some(field));
    }
    // Completions refuses chat-only fields; chat accepts caller bookkeeping.
    let (status, v) =
        s.post("/v1/completions", json!({"model": s.model(), "prompt": "x", "max_tokens": 2, "tools": []})).await;
    assert_error(status, &v, 400, Some("tools"));
    let (status, v) = s
        .post("/v1/chat/completions", chat(&s.model(), json!({"metadata": {"k": "v"}, "user": "u1", "store": false, "service_tier": "auto", "prompt_cache_key": "p"})))
        .await;
    assert_eq!(status, 200, "{v}");
    s.shutdown().await;
}
