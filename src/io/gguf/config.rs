//! [`ModelConfig`] from and to the `{arch}.*` metadata keys of a GGUF model.
//!
//! | key ({arch} = general.architecture)      | config field                  |
//! |-------------------------------------------|-------------------------------|
//! | {arch}.embedding_length                   | hidden_size                   |
//! | {arch}.feed_forward_length                | intermediate_size             |
//! | {arch}.block_count                        | num_layers                    |
//! | {arch}.attention.head_count(_kv)          | num_heads, num_kv_heads       |
//! | {arch}.attention.key_length               | head_dim (default hidden/heads) |
//! | {arch}.attention.layer_norm_rms_epsilon   | rms_norm_eps                  |
//! | {arch}.rope.freq_base                     | rope_theta (default 10000)    |
//! | {arch}.rope.scaling.type/factor           | rope_scaling (linear)         |
//! | {arch}.context_length                     | max_position_embeddings       |
//! | {arch}.vocab_size or the token list       | vocab_size                    |
//!
//! Architectures: "llama" (also what llama.cpp writes for Mistral), "qwen2", "qwen3".

use super::reader::GgufHeader;
use super::types::{MetaValue, Metadata};
use crate::error::{Error, Result};
use crate::model::config::{Activation, Family, ModelConfig, RopeScaling};

/// Largest accepted size field; larger values are corruption.
const MAX_SIZE: i128 = 1 << 32;

/// The `general.architecture` written for a family; `None` when GGUF export does not support it.
pub fn architecture(family: Family) -> Option<&'static str> {
    match family {
        Family::Llama | Family::Mistral => Some("llama"),
        Family::Qwen2 => Some("qwen2"),
        Family::Qwen3 => Some("qwen3"),
        Family::Gemma => None,
    }
}

fn size(meta: &Metadata, key: &str) -> Result<Option<usize>, String> {
    match meta.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_int()
            .filter(|n| (1..MAX_SIZE).contains(n))
            .map(|n| Some(n as usize))
            .ok_or_else(|| format!("metadata {key} must be a positive integer, got {v:?}")),
    }
}

fn required(meta: &Metadata, key: &str) -> Result<usize, String> {
    size(meta, key)?.ok_or_else(|| format!("metadata {key} is missing"))
}

fn float(meta: &Metadata, key: &str, default: f32) -> Result<f32, String> {
    match meta.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .map(|f| f as f32)
            .filter(|f| f.is_finite() && *f > 0.0)
            .ok_or_else(|| format!("metadata {key} must be a positive number, got {v:?}")),
    }
}

/// Reads the model's configuration from a GGUF header.
pub fn model_config(h: &GgufHeader) -> Result<ModelConfig, String> {
    let meta = &h.metadata;
    let arch = meta
        .get("general.architecture")
        .and_then(MetaValue::as_str)
        .ok_or("metadata general.architecture is missing")?;
    let family = match arch {
        "llama" => Family::Llama,
        "qwen2" => Family::Qwen2,
        "qwen3" => Family::Qwen3,
        other => return Err(Error::UnsupportedArchitecture(other.into()).to_string()),
    };
    let k = |name: &str| format!("{arch}.{name}");
    let hidden_size = required(meta, &k("embedding_length"))?;
    let num_heads = required(meta, &k("attention.head_count"))?;
    let num_kv_heads = size(meta, &k("attention.head_count_kv"))?.unwrap_or(num_heads);
    let head_dim = size(meta, &k("attention.key_length"))?.unwrap_or(hidden_size / num_heads);
    if let Some(rot) = size(meta, &k("rope.dimension_count"))? {
        if rot != head_dim {
            return Err(format!(
                "{} is {rot} but heads have {head_dim} dimensions; partial rotary embeddings are not supported",
                k("rope.dimension_count")
            ));
        }
    }
    if h.tensor("rope_freqs.weight").is_some() {
        return Err(
            "the rope_freqs.weight tensor (Llama 3.1 frequency factors) is not supported".into(),
        );
    }
    let vocab_size = match size(meta, &k("vocab_size"))? {
        Some(n) => n,
        None => match meta
            .get("tokenizer.ggml.tokens")
            .and_then(MetaValue::as_array)
        {
            Some(tokens) if !tokens.is_empty() => tokens.len(),
            _ => h
                .tensor("token_embd.weight")
                .and_then(|t| t.dims.get(1).copied())
                .ok_or(
                    "cannot tell the vocabulary size: no vocab_size, tokens or token_embd.weight",
                )? as usize,
        },
    };
    let rope_scaling = match meta
        .get(&k("rope.scaling.type"))
        .and_then(MetaValue::as_str)
    {
        None | Some("none") => None,
        Some("linear") => Some(RopeScaling::Linear {
            factor: float(meta, &k("rope.scaling.factor"), 1.0)?,
        }),
        Some(other) => {
            return Err(format!(
                "rope scaling {other:?} is not supported (supported: linear)"
            ))
        }
    };
    let cfg = ModelConfig {
        family,
        vocab_size,
        hidden_size,
        intermediate_size: required(meta, &k("feed_forward_length"))?,
        num_layers: required(meta, &k("block_count"))?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: float(meta, &k("attention.layer_norm_rms_epsilon"), 1e-6)?,
        rope_theta: float(meta, &k("rope.freq_base"), 10000.0)?,
        rope_scaling,
        max_position_embeddings: size(meta, &k("context_length"))?.unwrap_or(4096),
        tie_word_embeddings: h.tensor("output.weight").is_none(),
        qkv_bias: family == Family::Qwen2 || h.tensor("blk.0.attn_q.bias").is_some(),
        qk_norm: family == Family::Qwen3,
        activation: Activation::Silu,
        norm_unit_offset: false,
        scale_embeddings: false,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The `general.*` and `{arch}.*` keys describing `cfg`.
pub fn metadata(cfg: &ModelConfig, name: &str) -> Result<Vec<(String, MetaValue)>> {
    let arch = architecture(cfg.family).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "GGUF export supports llama, mistral, qwen2 and qwen3 models, not {}",
            cfg.family.model_type()
        ))
    })?;
    let u32v = |n: usize| MetaValue::U32(n as u32);
    let mut kv = vec![
        ("general.architecture", MetaValue::String(arch.into())),
        ("general.name", MetaValue::String(name.into())),
        ("{arch}.vocab_size", u32v(cfg.vocab_size)),
        ("{arch}.context_length", u32v(cfg.max_position_embeddings)),
        ("{arch}.embedding_length", u32v(cfg.hidden_size)),
        ("{arch}.feed_forward_length", u32v(cfg.intermediate_size)),
        ("{arch}.block_count", u32v(cfg.num_layers)),
        ("{arch}.attention.head_count", u32v(cfg.num_heads)),
        ("{arch}.attention.head_count_kv", u32v(cfg.num_kv_heads)),
        ("{arch}.attention.key_length", u32v(cfg.head_dim)),
        ("{arch}.attention.value_length", u32v(cfg.head_dim)),
        ("{arch}.rope.dimension_count", u32v(cfg.head_dim)),
        ("{arch}.rope.freq_base", MetaValue::F32(cfg.rope_theta)),
        (
            "{arch}.attention.layer_norm_rms_epsilon",
            MetaValue::F32(cfg.rms_norm_eps),
        ),
    ];
    match cfg.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => {
            kv.push((
                "{arch}.rope.scaling.type",
                MetaValue::String("linear".into()),
            ));
            kv.push(("{arch}.rope.scaling.factor", MetaValue::F32(factor)));
        }
        Some(RopeScaling::Llama3 { .. }) => {
            return Err(Error::InvalidArgument(
                "GGUF export of Llama 3 rope scaling (rope_freqs) is not supported".into(),
            ))
        }
    }
    Ok(kv
        .into_iter()
        .map(|(k, v)| (k.replace("{arch}", arch), v))
        .collect())
}
