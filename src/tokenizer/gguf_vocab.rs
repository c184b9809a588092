//! Builds a `tokenizers::Tokenizer` from the vocabulary embedded in a GGUF file
//! (`tokenizer.ggml.*`), so a single .gguf is enough to serve a model.
//!
//! Only byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`: GPT-2, SmolLM, StarCoder,
//! Llama 3, Qwen2) are supported. The pre-tokenizer is chosen from `tokenizer.ggml.pre` with the
//! same regular expressions llama.cpp uses for each name.

use super::TokenizerError;
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// What the GGUF says about its tokenizer.
pub struct GgufVocab {
    pub tokenizer: Tokenizer,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

pub fn from_metadata(md: &HashMap<String, Value>) -> Result<GgufVocab, TokenizerError> {
    let bad = |m: String| TokenizerError::Gguf(m);
    let model = md.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).map(String::as_str).unwrap_or("");
    if model != "gpt2" {
        return Err(bad(format!(
            "tokenizer.ggml.model {model:?} is not supported (only byte-level BPE, \"gpt2\"); \
             pass a tokenizer.json with --tokenizer"
        )));
    }
    let tokens = string_array(md, "tokenizer.ggml.tokens")?;
    let merges_raw = string_array(md, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(bad(format!("{} token types for {} tokens", types.len(), tokens.len())));
    }
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    if vocab.len() != tokens.len() {
        // A map drops the later copy: that id could never be produced or decoded right.
        let mut seen = std::collections::HashSet::new();
        let dup = tokens.iter().find(|t| !seen.insert(*t)).expect("a duplicate exists");
        return Err(bad(format!("the vocabulary lists token {dup:?} more than once")));
    }
    let merges: Vec<(String, String)> = merges_raw
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| bad(format!("malformed merge {m:?}")))
        })
        .collect::<Result<_, _>>()?;
    let bpe =
        BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| bad(format!("cannot build BPE: {e}")))?;
    let mut tk = Tokenizer::new(bpe);
    let pre = md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map(String::as_str).unwrap_or("default");
    tk.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    tk.add_special_tokens(specials).map_err(|e| bad(format!("cannot add special tokens: {e}")))?;

    let id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
    let mut eos: Vec<u32> =
        ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
            .iter()
            .filter_map(|k| id(k))
            .collect();
    eos.dedup();
    Ok(GgufVocab {
        tokenizer: tk,
        bos: id("tokenizer.ggml.bos_token_id"),
        eos,
        add_bos: md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false),
        chat_template: md.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned(),
    })
}

fn string_array(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>, TokenizerError> {
    match md.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.to_string().cloned().map_err(|_| TokenizerError::Gguf(format!("{key} holds a non-string"))))
            .collect(),
        _ => Err(TokenizerError::Gguf(format!("GGUF has no {key}"))),
    }
}

/// llama.cpp's pre-tokenizer for each `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex);
    let split = |re: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
        let s = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| TokenizerError::Gguf(format!("bad pre-tokenizer regex: {e}")))?;
        Ok(s.into())
    };
    Ok(match pre {
        // GPT-2 regex after splitting every digit on its own (StarCoder-style vocabularies).
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" => {
            Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into()
        }
        "gpt2" | "default" | "gpt-2" | "olmo" | "phi-2" => byte_level(true).into(),
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => {
            Sequence::new(vec![split(LLAMA3_REGEX)?, byte_level(false).into()]).into()
        }
        "qwen2" | "deepseek-r1-qwen" => Sequence::new(vec![split(QWEN2_REGEX)?, byte_level(false).into()]).into(),
        other => {
            return Err(TokenizerError::Gguf(format!(
                "tokenizer.ggml.pre {other:?} is not supported (smollm, starcoder, gpt2, llama3, qwen2); \
                 pass a tokenizer.json with --tokenizer"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(tokens: &[&str], types: &[i32]) -> HashMap<String, Value> {
        let strings = |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
        HashMap::from([
            ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens".to_string(), strings(tokens)),
            ("tokenizer.ggml.merges".to_string(), strings(&["a b"])),
            ("tokenizer.ggml.token_type".to_string(), Value::Array(types.iter().map(|&t| Value::I32(t)).collect())),
            ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(0)),
        ])
    }

    /// A duplicated token or a token-type array of another length would silently lose ids or
    /// special tokens: both are errors.
    #[test]
    fn inconsistent_vocabularies_are_refused() {
        let err = |md| match from_metadata(&md) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        };
        assert!(from_metadata(&metadata(&["<eos>", "a", "b", "ab"], &[3, 1, 1, 1])).is_ok());
        let e = err(metadata(&["<eos>", "a", "b", "a"], &[3, 1, 1, 1]));
        assert!(e.contains("\"a\" more than once"), "{e}");
        let e = err(metadata(&["<eos>", "a", "b", "ab"], &[3, 1]));
        assert!(e.contains("2 token types for 4 tokens"), "{e}");
    }
}
