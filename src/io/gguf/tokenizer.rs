//! The tokenizer a GGUF file embeds (`tokenizer.ggml.*`), rebuilt as a Hugging Face
//! [`Tokenizer`] so that a lone .gguf file is enough to train and generate.
//!
//! Two vocabularies are supported, as llama.cpp names them in `tokenizer.ggml.model`:
//! - "gpt2": byte-level BPE from `tokens` and `merges`, pre-tokenized by the regular expressions
//!   llama.cpp associates with `tokenizer.ggml.pre` (GPT-2's when unknown);
//! - "llama": SentencePiece BPE from `tokens` and `scores` with byte fallback (`<0xNN>` tokens);
//!   the merges are every split of a token into two tokens, ranked by the merged token's score.
//!
//! Control and user-defined tokens become added tokens (matched in text before the model runs);
//! `add_bos_token`/`add_eos_token` become a post-processor. The tokenizer is assembled as
//! tokenizer.json content, the format the tokenizers library defines and keeps stable.

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::types::{MetaValue, Metadata};

/// `tokenizer.ggml.token_type` values.
const TOKEN_NORMAL: i128 = 1;
const TOKEN_CONTROL: i128 = 3;
const TOKEN_USER_DEFINED: i128 = 4;

/// SentencePiece tokens longer than this are not split into merges (real ones are far shorter;
/// the bound keeps a corrupt vocabulary from costing quadratic time).
const MAX_MERGED_TOKEN_BYTES: usize = 256;

/// Llama 3 ("llama-bpe"): up to three digits per piece, letters with one leading non-letter.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2: as Llama 3 but one digit per piece.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The chat template stored in the file, if any.
pub fn chat_template(meta: &Metadata) -> Option<String> {
    meta.get("tokenizer.chat_template")
        .and_then(MetaValue::as_str)
        .map(str::to_string)
}

/// The `tokenizer.*` entries of `meta`, to carry into files exported from this model.
pub fn vocabulary_keys(meta: &Metadata) -> Vec<(String, MetaValue)> {
    meta.iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn strings<'a>(meta: &'a Metadata, key: &str) -> Result<Vec<&'a str>, String> {
    meta.get(key)
        .and_then(MetaValue::as_array)
        .ok_or_else(|| format!("metadata {key} is missing or not an array"))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| format!("metadata {key} holds a non-string"))
        })
        .collect()
}

fn numbers(
    meta: &Metadata,
    key: &str,
    n: usize,
    get: fn(&MetaValue) -> Option<f64>,
) -> Result<Option<Vec<f64>>, String> {
    let Some(v) = meta.get(key) else {
        return Ok(None);
    };
    let items = v
        .as_array()
        .ok_or_else(|| format!("metadata {key} is not an array"))?;
    if items.len() != n {
        return Err(format!(
            "metadata {key} has {} entries for {n} tokens",
            items.len()
        ));
    }
    items
        .iter()
        .map(|v| get(v).ok_or_else(|| format!("metadata {key} holds a non-number")))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A special token id from `tokenizer.ggml.{name}_token_id`, checked against the vocabulary.
fn token_id(meta: &Metadata, name: &str, n: usize) -> Result<Option<u32>, String> {
    let key = format!("tokenizer.ggml.{name}_token_id");
    match meta.get(&key) {
        None => Ok(None),
        Some(v) => match v.as_int() {
            Some(id) if (0..n as i128).contains(&id) => Ok(Some(id as u32)),
            // llama.cpp writes -1 (as a u32: 0xFFFFFFFF) for "none".
            Some(-1) | Some(0xFFFF_FFFF) => Ok(None),
            _ => Err(format!(
                "metadata {key} = {v:?} is not a token of the {n}-token vocabulary"
            )),
        },
    }
}

fn flag(meta: &Metadata, key: &str, default: bool) -> bool {
    match meta.get(key) {
        Some(MetaValue::Bool(b)) => *b,
        _ => default,
    }
}

/// The special tokens a GGUF vocabulary names, and whether text starts with BOS.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
}

/// Reads `tokenizer.ggml.{bos,eos}_token_id` and `add_bos_token` for a vocabulary of `n` tokens.
pub fn special_tokens(meta: &Metadata, n: usize) -> Result<SpecialTokens, String> {
    Ok(SpecialTokens {
        bos: token_id(meta, "bos", n)?,
        eos: token_id(meta, "eos", n)?,
        add_bos: flag(meta, "tokenizer.ggml.add_bos_token", false),
    })
}

/// Builds the tokenizer of a GGUF file; `Ok(None)` when it has none or one of another kind.
pub fn from_metadata(meta: &Metadata) -> Result<Option<Tokenizer>, String> {
    let kind = match meta.get("tokenizer.ggml.model").and_then(MetaValue::as_str) {
        Some(k @ ("gpt2" | "llama")) => k,
        _ => return Ok(None),
    };
    let tokens = strings(meta, "tokenizer.ggml.tokens")?;
    let n = tokens.len();
    if n == 0 || n > u32::MAX as usize {
        return Err(format!("tokenizer.ggml.tokens has {n} entries"));
    }
    let types = numbers(meta, "tokenizer.ggml.token_type", n, |v| {
        v.as_int().map(|i| i as f64)
    })?
    .unwrap_or_else(|| vec![TOKEN_NORMAL as f64; n]);
    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &t))| t as i128 == TOKEN_CONTROL || t as i128 == TOKEN_USER_DEFINED)
        .map(|(id, (content, &t))| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": t as i128 == TOKEN_CONTROL})
        })
        .collect();
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let mut doc = match kind {
        "gpt2" => byte_level(meta, vocab)?,
        _ => sentencepiece(meta, &tokens, &types, vocab)?,
    };
    doc["version"] = json!("1.0");
    doc["added_tokens"] = Value::Array(added);
    doc["post_processor"] = post_processor(meta, &tokens)?;
    let text = doc.to_string();
    Tokenizer::from_bytes(text.as_bytes())
        .map(Some)
        .map_err(|e| format!("the embedded {kind} tokenizer is invalid: {e}"))
}

/// Byte-level BPE ("gpt2").
fn byte_level(meta: &Metadata, vocab: serde_json::Map<String, Value>) -> Result<Value, String> {
    let merges: Vec<Value> = strings(meta, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| format!("merge {m:?} is not two tokens separated by a space"))
        })
        .collect::<Result<_, _>>()?;
    let pre = meta
        .get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    let (pre_tokenizers, ignore_merges) = match pre {
        "llama-bpe" | "llama3" => (vec![split(LLAMA3_SPLIT), byte_level(false)], true),
        "qwen2" => (vec![split(QWEN2_SPLIT), byte_level(false)], false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" => (
            vec![
                json!({"type": "Digits", "individual_digits": true}),
                byte_level(true),
            ],
            false,
        ),
        // GPT-2's expression, built into byte-level pre-tokenization.
        _ => (vec![byte_level(true)], false),
    };
    Ok(json!({
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                  "byte_fallback": false, "ignore_merges": ignore_merges,
                  "vocab": vocab, "merges": merges},
        "decoder": byte_level(true),
    }))
}

/// SentencePiece BPE with byte fallback ("llama").
fn sentencepiece(
    meta: &Metadata,
    tokens: &[&str],
    types: &[f64],
    vocab: serde_json::Map<String, Value>,
) -> Result<Value, String> {
    let scores = numbers(
        meta,
        "tokenizer.ggml.scores",
        tokens.len(),
        MetaValue::as_f64,
    )?
    .ok_or("metadata tokenizer.ggml.scores is missing")?;
    // Every way of writing a normal token as two tokens is a merge, ranked by the merged token's
    // score (higher first), which is the order SentencePiece's BPE merges in.
    let mut ranked: Vec<(f64, usize, &str, &str)> = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        if types[id] as i128 != TOKEN_NORMAL || token.len() > MAX_MERGED_TOKEN_BYTES {
            continue;
        }
        for (cut, _) in token.char_indices().skip(1) {
            let (a, b) = token.split_at(cut);
            if vocab.contains_key(a) && vocab.contains_key(b) {
                ranked.push((scores[id], id, a, b));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let merges: Vec<Value> = ranked.iter().map(|(_, _, a, b)| json!([a, b])).collect();
    let unk = token_id(meta, "unknown", tokens.len())?.map(|id| tokens[id as usize]);
    let prefix = flag(meta, "tokenizer.ggml.add_space_prefix", true);
    let mut normalizers = vec![];
    if prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                  "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
        "decoder": {"type": "Sequence", "decoders": decoders},
    }))
}

/// BOS/EOS around each sequence, as `add_bos_token`/`add_eos_token` ask.
fn post_processor(meta: &Metadata, tokens: &[&str]) -> Result<Value, String> {
    let n = tokens.len();
    let bos =
        token_id(meta, "bos", n)?.filter(|_| flag(meta, "tokenizer.ggml.add_bos_token", false));
    let eos =
        token_id(meta, "eos", n)?.filter(|_| flag(meta, "tokenizer.ggml.add_eos_token", false));
    if bos.is_none() && eos.is_none() {
        return Ok(Value::Null);
    }
    let special = |id: u32| json!({"SpecialToken": {"id": tokens[id as usize], "type_id": 0}});
    let sequence = |name: &str| json!({"Sequence": {"id": name, "type_id": 0}});
    let template = |names: &[&str]| -> Vec<Value> {
        let mut t = Vec::new();
        for name in names {
            t.extend(bos.map(special));
            t.push(sequence(name));
            t.extend(eos.map(special));
        }
        t
    };
    let special_tokens: serde_json::Map<String, Value> = bos
        .into_iter()
        .chain(eos)
        .map(|id| {
            let t = tokens[id as usize];
            (t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}))
        })
        .collect();
    Ok(
        json!({"type": "TemplateProcessing", "single": template(&["A"]),
              "pair": template(&["A", "B"]), "special_tokens": special_tokens}),
    )
}
