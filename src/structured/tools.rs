//! Tool calls: how the model is told about functions, the one format it calls them in, and the
//! parser that turns that output back into OpenAI's `tool_calls` (whole or streamed).
//!
//! The model calls functions by writing exactly
//! `{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, …]}`: a JSON
//! object the grammar enforces (names from the request, arguments valid against each
//! function's parameter schema). The functions are described in the system prompt, and earlier
//! calls in the conversation are rendered in the same format, so the model sees one convention
//! throughout, whatever its chat template (this is lethe's documented fallback for templates
//! without tool support, used for all templates; tool results use the template's `tool` role
//! when it has one, else a user turn).

use super::StructuredError;
use serde_json::{Value, json};

/// How every tool-call output starts.
pub const CALLS_PREFIX: &str = "{\"tool_calls\": [";
const CALL_OPEN: &str = "{\"name\": \"";
const NAME_CLOSE: &str = "\", \"arguments\": ";

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON schema of the arguments (an object).
    pub parameters: Value,
}

/// OpenAI's `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// Never call a function (the functions are not even described to the model).
    None,
    /// Call functions or answer.
    Auto,
    /// Call at least one function.
    Required,
    /// Call this function, once.
    Named(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolSet {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// Several calls in one answer (`parallel_tool_calls`, default true).
    pub parallel: bool,
}

/// True for a valid function name (OpenAI's rule: `^[a-zA-Z0-9_-]{1,64}$`).
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ToolSet {
    /// True when the model may call a function.
    pub fn calls_possible(&self) -> bool {
        !self.tools.is_empty() && self.choice != ToolChoice::None
    }

    /// The functions the model is offered.
    fn offered(&self) -> Vec<&Tool> {
        match &self.choice {
            ToolChoice::None => Vec::new(),
            ToolChoice::Named(n) => self.tools.iter().filter(|t| &t.name == n).collect(),
            _ => self.tools.iter().collect(),
        }
    }

    /// The JSON schema of a calls object. Each function's parameters move under `$defs/f{i}`,
    /// with their local `$ref`s rewritten to match.
    pub fn calls_schema(&self) -> Result<Value, StructuredError> {
        let mut defs = serde_json::Map::new();
        let mut calls = Vec::new();
        for (i, t) in self.tools.iter().enumerate() {
            if !self.offered().iter().any(|o| o.name == t.name) {
                continue;
            }
            let mut params = t.parameters.clone();
            rebase_refs(&mut params, &format!("/$defs/f{i}"), &format!("tools[{i}].function.parameters"))?;
            defs.insert(format!("f{i}"), params);
            calls.push(json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": {"$ref": format!("#/$defs/f{i}")}},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            }));
        }
        let single = !self.parallel || matches!(self.choice, ToolChoice::Named(_));
        let mut list = json!({"type": "array", "items": {"anyOf": calls}, "minItems": 1});
        if single {
            list["maxItems"] = json!(1);
        }
        Ok(json!({
            "type": "object",
            "properties": {"tool_calls": list},
            "required": ["tool_calls"],
            "additionalProperties": false,
            "$defs": defs,
        }))
    }

    /// The system prompt block that describes the functions and the call format; `None` when
    /// no call is possible.
    pub fn system_prompt(&self) -> Option<String> {
        if !self.calls_possible() {
            return None;
        }
        let mut s = String::from("You can call these functions:\n");
        for t in self.offered() {
            let mut f = json!({"name": t.name, "parameters": t.parameters});
            if let Some(d) = &t.description {
                f["description"] = json!(d);
            }
            s.push_str(&to_json_text(&f));
            s.push('\n');
        }
        s.push_str(&format!(
            "\nTo call functions, reply with only this JSON and nothing else:\n{CALLS_PREFIX}{CALL_OPEN}<function name>{NAME_CLOSE}<arguments as a JSON object>}}]}}\n"
        ));
        s.push_str(&match &self.choice {
            ToolChoice::Auto => "If no function is needed, answer normally.".to_string(),
            ToolChoice::Required => "You must call at least one function.".to_string(),
            ToolChoice::Named(n) => format!("You must call the function {n:?}."),
            ToolChoice::None => String::new(),
        });
        Some(s)
    }
}

/// Prefixes every local `$ref` (`#…`) in `schema` with `base`, so the schema can live at `base`
/// inside a larger document. Remote references are refused.
fn rebase_refs(schema: &mut Value, base: &str, param: &str) -> Result<(), StructuredError> {
    match schema {
        Value::Object(m) => {
            for (k, v) in m.iter_mut() {
                if k == "$ref" {
                    let Some(r) = v.as_str() else {
                        return Err(StructuredError::new(format!("{param}: $ref must be a string."), param));
                    };
                    let Some(rest) = r.strip_prefix('#') else {
                        return Err(StructuredError::new(
                            format!("{param}: only local $ref (\"#/...\") are supported, not {r:?}."),
                            param,
                        ));
                    };
                    *v = Value::String(format!("#{base}{rest}"));
                } else {
                    rebase_refs(v, base, param)?;
                }
            }
            Ok(())
        }
        Value::Array(a) => a.iter_mut().try_for_each(|v| rebase_refs(v, base, param)),
        _ => Ok(()),
    }
}

/// JSON text with the separators the grammar uses (`", "`, `": "`) and no other whitespace.
pub fn to_json_text(v: &Value) -> String {
    let mut out = String::new();
    write_json(v, &mut out);
    out
}

fn write_json(v: &Value, out: &mut String) {
    match v {
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_json(x, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The text of earlier calls (an assistant turn of the conversation): `(name, arguments)`,
/// the arguments as the JSON text OpenAI messages carry. An error names what does not parse.
pub fn calls_text(calls: &[(String, String)]) -> Result<String, usize> {
    let mut out = String::from(CALLS_PREFIX);
    for (i, (name, args)) in calls.iter().enumerate() {
        let args: Value = serde_json::from_str(args).map_err(|_| i)?;
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(CALL_OPEN);
        out.push_str(name);
        out.push_str(NAME_CLOSE);
        out.push_str(&to_json_text(&args));
        out.push('}');
    }
    out.push_str("]}");
    Ok(out)
}

/// What the parser found in a piece of output.
#[derive(Debug, Clone, PartialEq)]
pub enum CallEvent {
    /// Call `index` to function `name` starts.
    Begin { index: usize, name: String },
    /// More of call `index`'s arguments (JSON text).
    Arguments { index: usize, fragment: String },
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Matching a fixed piece of the format; then `then`.
    Literal {
        text: &'static str,
        at: usize,
        then: Box<State>,
    },
    Name(String),
    Arguments {
        depth: usize,
        in_string: bool,
        escaped: bool,
    },
    /// After a call's closing brace: `, ` and another call, or `]}`.
    AfterCall,
    Done,
    /// The output left the format (a stop string cut it, or it is not a call at all).
    Malformed,
}

/// Turns tool-call output into calls, incrementally: feed it text as it comes.
#[derive(Debug, Clone)]
pub struct CallParser {
    state: State,
    index: usize,
}

impl Default for CallParser {
    fn default() -> Self {
        Self {
            state: literal(CALLS_PREFIX, State::Literal { text: CALL_OPEN, at: 0, then: Box::new(name()) }),
            index: 0,
        }
    }
}

fn literal(text: &'static str, then: State) -> State {
    State::Literal { text, at: 0, then: Box::new(then) }
}

fn name() -> State {
    State::Name(String::new())
}

impl CallParser {
    /// True once the output closed its last call.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Parses more output.
    pub fn feed(&mut self, text: &str) -> Vec<CallEvent> {
        let mut events: Vec<CallEvent> = Vec::new();
        for c in text.chars() {
            let state = std::mem::replace(&mut self.state, State::Malformed);
            self.state = match state {
                State::Literal { text, at, then } => {
                    if text[at..].starts_with(c) {
                        let at = at + c.len_utf8();
                        if at == text.len() { *then } else { State::Literal { text, at, then } }
                    } else {
                        State::Malformed
                    }
                }
                State::Name(mut n) => {
                    if c == '"' {
                        events.push(CallEvent::Begin { index: self.index, name: n });
                        State::Literal {
                            text: NAME_CLOSE,
                            at: 1,
                            then: Box::new(State::Arguments { depth: 0, in_string: false, escaped: false }),
                        }
                    } else {
                        n.push(c);
                        State::Name(n)
                    }
                }
                State::Arguments { depth, in_string, escaped } => {
                    push_argument(&mut events, self.index, c);
                    let (depth, in_string, escaped) = match (in_string, escaped, c) {
                        (true, true, _) => (depth, true, false),
                        (true, false, '\\') => (depth, true, true),
                        (true, false, '"') => (depth, false, false),
                        (true, false, _) => (depth, true, false),
                        (false, _, '"') => (depth, true, false),
                        (false, _, '{' | '[') => (depth + 1, false, false),
                        (false, _, '}' | ']') => (depth.saturating_sub(1), false, false),
                        _ => (depth, false, false),
                    };
                    if depth == 0 && !in_string && matches!(c, '}' | ']') {
                        literal("}", State::AfterCall)
                    } else {
                        State::Arguments { depth, in_string, escaped }
                    }
                }
                State::AfterCall => match c {
                    ',' => {
                        self.index += 1;
                        literal(" ", literal(CALL_OPEN, name()))
                    }
                    ']' => literal("}", State::Done),
                    _ => State::Malformed,
                },
                State::Done | State::Malformed => State::Malformed,
            };
        }
        events
    }
}

/// Appends `c` to call `index`'s arguments, in the last event when it is theirs.
fn push_argument(events: &mut Vec<CallEvent>, index: usize, c: char) {
    match events.last_mut() {
        Some(CallEvent::Arguments { index: i, fragment }) if *i == index => fragment.push(c),
        _ => events.push(CallEvent::Arguments { index, fragment: c.to_string() }),
    }
}

/// Parses a whole output into `(name, arguments)` calls; `complete` is false when the output
/// stopped before closing its last call.
pub fn parse_calls(text: &str) -> (Vec<(String, String)>, bool) {
    let mut p = CallParser::default();
    let mut calls: Vec<(String, String)> = Vec::new();
    for e in p.feed(text) {
        match e {
            CallEvent::Begin { name, .. } => calls.push((name, String::new())),
            CallEvent::Arguments { index, fragment } => {
                if let Some(c) = calls.get_mut(index) {
                    c.1.push_str(&fragment);
                }
            }
        }
    }
    (calls, p.is_done())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tool(name: &str, params: Value) -> Tool {
        Tool { name: name.into(), description: Some(format!("does {name}")), parameters: params }
    }

    #[test]
    fn calls_round_trip_through_text_and_parser() {
        let calls = vec![
            ("get_weather".to_string(), r#"{"city": "Paris", "days": [1, 2], "q": "a \"}\" b"}"#.to_string()),
            ("noop".to_string(), "{}".to_string()),
        ];
        let text = calls_text(&calls).unwrap();
        assert!(text.starts_with(CALLS_PREFIX), "{text}");
        let (parsed, complete) = parse_calls(&text);
        assert!(complete);
        assert_eq!(parsed, calls);
        assert_eq!(calls_text(&[("f".into(), "{not json".into())]), Err(0));
    }

    #[test]
    fn a_cut_output_gives_the_calls_so_far() {
        let text = calls_text(&[("f".into(), r#"{"a": 1}"#.into()), ("g".into(), r#"{"b": 2}"#.into())]).unwrap();
        let (parsed, complete) = parse_calls(&text[..text.len() - 6]);
        assert!(!complete);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].0, "g");
        assert_eq!(parse_calls("Hello").0, vec![]);
    }

    #[test]
    fn refs_move_with_the_parameters() {
        let set = ToolSet {
            tools: vec![
                tool(
                    "a",
                    json!({"type": "object", "properties": {"x": {"$ref": "#/$defs/X"}}, "$defs": {"X": {"type": "integer"}}}),
                ),
                tool("b", json!({"type": "object", "properties": {"self": {"$ref": "#"}}})),
            ],
            choice: ToolChoice::Required,
            parallel: false,
        };
        let s = set.calls_schema().unwrap();
        assert_eq!(s["$defs"]["f0"]["properties"]["x"]["$ref"], "#/$defs/f0/$defs/X");
        assert_eq!(s["$defs"]["f1"]["properties"]["self"]["$ref"], "#/$defs/f1");
        assert_eq!(s["properties"]["tool_calls"]["maxItems"], 1);
        let named = ToolSet { choice: ToolChoice::Named("b".into()), parallel: true, ..set.clone() };
        let s = named.calls_schema().unwrap();
        assert_eq!(s["properties"]["tool_calls"]["items"]["anyOf"].as_array().unwrap().len(), 1);
        assert!(named.system_prompt().unwrap().contains("You must call the function \"b\""));
        let remote = ToolSet { tools: vec![tool("c", json!({"$ref": "http://x/y"}))], ..set };
        assert!(remote.calls_schema().unwrap_err().message.contains("only local $ref"));
    }

    proptest! {
        /// However the output is cut into pieces, streaming gives the same calls.
        #[test]
        fn streaming_equals_whole(
            args in prop::collection::vec("[a-z\"{}\\[\\]\\\\ ,:]{0,12}", 1..4),
            cuts in prop::collection::vec(0usize..200, 0..8)
        ) {
            let calls: Vec<(String, String)> = args
                .iter()
                .enumerate()
                .map(|(i, a)| (format!("f{i}"), serde_json::to_string(&json!({"s": a, "n": [i]})).unwrap()))
                .collect();
            let text = calls_text(&calls).unwrap();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).filter(|&c| text.is_char_boundary(c)).collect();
            cuts.sort();
            let mut p = CallParser::default();
            let mut streamed: Vec<(String, String)> = Vec::new();
            let mut last = 0;
            for c in cuts.into_iter().chain([text.len()]) {
                for e in p.feed(&text[last..c]) {
                    match e {
                        CallEvent::Begin { index, name } => { prop_assert_eq!(index, streamed.len()); streamed.push((name, String::new())) }
                        CallEvent::Arguments { index, fragment } => streamed[index].1.push_str(&fragment),
                    }
                }
                last = c;
            }
            prop_assert!(p.is_done());
            let want: Vec<(String, String)> = calls.iter().map(|(n, a)| (n.clone(), to_json_text(&serde_json::from_str(a).unwrap()))).collect();
            prop_assert_eq!(streamed, want);
        }
    }
}
