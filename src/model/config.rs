//! The decoder's hyper-parameters, read from a Hugging Face `config.json`.
//!
//! One [`ModelConfig`] describes every supported family; the family only switches a few features:
//!
//! | family  | q/k/v bias | q/k norm | MLP    | RMSNorm weight | embeddings × sqrt(hidden) |
//! |---------|------------|----------|--------|----------------|---------------------------|
//! | llama   | no         | no       | SwiGLU | w              | no                        |
//! | mistral | no         | no       | SwiGLU | w              | no                        |
//! | qwen2   | yes        | no       | SwiGLU | w              | no                        |
//! | qwen3   | no         | yes      | SwiGLU | w              | no                        |
//! | gemma   | no         | no       | GeGLU  | 1 + w          | yes                       |

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// The model family, from `model_type` (or `architectures`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma,
}

impl Family {
    /// Parses a `model_type` such as "llama" or an architecture such as "Qwen2ForCausalLM".
    pub fn parse(name: &str) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        let stem = lower.strip_suffix("forcausallm").unwrap_or(&lower);
        Ok(match stem {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma" => Family::Gemma,
            _ => return Err(Error::UnsupportedArchitecture(name.to_string())),
        })
    }

    /// The `model_type` string written into exported configs.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma => "gemma",
        }
    }
}

/// The gated MLP's activation: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// silu(g) = g · sigmoid(g)
    Silu,
    /// The tanh approximation of GELU: 0.5·g·(1 + tanh(sqrt(2/π)·(g + 0.044715·g³)))
    GeluTanh,
}

impl Activation {
    const GELU_C: f32 = 0.797_884_6; // sqrt(2/π)

    /// act(g).
    pub fn value(self, g: f32) -> f32 {
        match self {
            Activation::Silu => g / (1.0 + (-g).exp()),
            Activation::GeluTanh => {
                0.5 * g * (1.0 + (Self::GELU_C * (g + 0.044715 * g * g * g)).tanh())
            }
        }
    }

    /// d act(g) / dg: silu' = σ(g)·(1 + g·(1 − σ(g))); gelu' = 0.5·(1 + tanh a) +
    /// 0.5·g·(1 − tanh² a)·sqrt(2/π)·(1 + 3·0.044715·g²) with a = sqrt(2/π)·(g + 0.044715·g³).
    pub fn derivative(self, g: f32) -> f32 {
        match self {
            Activation::Silu => {
                let s = 1.0 / (1.0 + (-g).exp());
                s * (1.0 + g * (1.0 - s))
            }
            Activation::GeluTanh => {
                let t = (Self::GELU_C * (g + 0.044715 * g * g * g)).tanh();
                0.5 * (1.0 + t)
                    + 0.5 * g * (1.0 - t * t) * Self::GELU_C * (1.0 + 3.0 * 0.044715 * g * g)
            }
        }
    }
}

/// Rotary-embedding frequency scaling (`rope_scaling` in config.json).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Every inverse frequency divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3's band-wise scaling of long wavelengths.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: f32,
    },
}

/// Hyper-parameters of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (qwen2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (qwen3).
    pub qk_norm: bool,
    pub activation: Activation,
    /// RMSNorm multiplies by (1 + w) instead of w (gemma).
    pub norm_unit_offset: bool,
    /// Embeddings are multiplied by sqrt(hidden_size) (gemma).
    pub scale_embeddings: bool,
}

fn field<'a>(v: &'a Value, key: &str, path: &Path) -> Result<&'a Value> {
    v.get(key)
        .filter(|x| !x.is_null())
        .ok_or_else(|| Error::format(path, format!("missing field \"{key}\"")))
}

fn usize_field(v: &Value, key: &str, path: &Path) -> Result<usize> {
    let x = field(v, key, path)?;
    x.as_u64()
        .filter(|n| *n > 0 && *n < (1 << 40))
        .map(|n| n as usize)
        .ok_or_else(|| {
            Error::format(
                path,
                format!("field \"{key}\" must be a positive integer, got {x}"),
            )
        })
}

fn opt_usize(v: &Value, key: &str, path: &Path) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => usize_field(v, key, path).map(Some),
    }
}

fn f32_field(v: &Value, key: &str, default: f32, path: &Path) -> Result<f32> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_f64()
            .map(|f| f as f32)
            .filter(|f| f.is_finite())
            .ok_or_else(|| {
                Error::format(path, format!("field \"{key}\" must be a number, got {x}"))
            }),
    }
}

fn bool_field(v: &Value, key: &str, default: bool, path: &Path) -> Result<bool> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x.as_bool().ok_or_else(|| {
            Error::format(
                path,
                format!("field \"{key}\" must be true or false, got {x}"),
            )
        }),
    }
}

/// The rotary settings: top-level `rope_theta` / `rope_scaling` (transformers 4), or the
/// `rope_parameters` object that transformers 5 writes instead (theta and scaling together).
fn rope_parameters(v: &Value) -> Option<&Value> {
    v.get("rope_parameters").filter(|x| x.is_object())
}

fn parse_rope_theta(v: &Value, path: &Path) -> Result<f32> {
    match (v.get("rope_theta"), rope_parameters(v)) {
        (None, Some(rp)) => f32_field(rp, "rope_theta", 10000.0, path),
        _ => f32_field(v, "rope_theta", 10000.0, path),
    }
}

fn parse_rope_scaling(v: &Value, path: &Path) -> Result<Option<RopeScaling>> {
    let scaling = v.get("rope_scaling").filter(|x| !x.is_null());
    let Some(rs) = scaling.or_else(|| rope_parameters(v)) else {
        return Ok(None);
    };
    let kind = rs
        .get("rope_type")
        .or_else(|| rs.get("type"))
        .and_then(Value::as_str)
        .ok_or_else(|| Error::format(path, "rope_scaling has no \"rope_type\""))?;
    let factor = f32_field(rs, "factor", 1.0, path)?;
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor: f32_field(rs, "low_freq_factor", 1.0, path)?,
            high_freq_factor: f32_field(rs, "high_freq_factor", 4.0, path)?,
            original_max_position_embeddings: f32_field(
                rs,
                "original_max_position_embeddings",
                8192.0,
                path,
            )?,
        }),
        other => {
            return Err(Error::format(
                path,
                format!("rope_scaling type {other:?} is not supported (supported: linear, llama3)"),
            ))
        }
    })
}

impl ModelConfig {
    /// Reads `config.json` from a model directory.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            Error::format(
                path,
                format!(
                    "invalid JSON at line {} column {}: {e}",
                    e.line(),
                    e.column()
                ),
            )
        })?;
        Self::from_json(&v, path)
    }

    /// Interprets a parsed config.json; `path` only labels errors.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        if !v.is_object() {
            return Err(Error::format(path, "config must be a JSON object"));
        }
        let family = match v.get("model_type").and_then(Value::as_str) {
            Some(t) => Family::parse(t)?,
            None => {
                let arch = v
                    .get("architectures")
                    .and_then(|a| a.get(0))
                    .and_then(Value::as_str)
                    .ok_or_else(|| Error::format(path, "missing field \"model_type\""))?;
                Family::parse(arch)?
            }
        };
        let hidden_size = usize_field(v, "hidden_size", path)?;
        let num_heads = usize_field(v, "num_attention_heads", path)?;
        let num_kv_heads = opt_usize(v, "num_key_value_heads", path)?.unwrap_or(num_heads);
        let head_dim = opt_usize(v, "head_dim", path)?.unwrap_or(hidden_size / num_heads);
        let is_gemma = family == Family::Gemma;
        let activation = match v
            .get("hidden_activation")
            .or_else(|| v.get("hidden_act"))
            .and_then(Value::as_str)
        {
            None if is_gemma => Activation::GeluTanh,
            None | Some("silu") | Some("swish") => Activation::Silu,
            Some("gelu_pytorch_tanh") | Some("gelu") | Some("gelu_new") => Activation::GeluTanh,
            Some(other) => {
                return Err(Error::format(
                    path,
                    format!(
                    "hidden_act {other:?} is not supported (supported: silu, gelu_pytorch_tanh)"
                ),
                ))
            }
        };
        let cfg = ModelConfig {
            family,
            vocab_size: usize_field(v, "vocab_size", path)?,
            hidden_size,
            intermediate_size: usize_field(v, "intermediate_size", path)?,
            num_layers: usize_field(v, "num_hidden_layers", path)?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f32_field(v, "rms_norm_eps", 1e-6, path)?,
            rope_theta: parse_rope_theta(v, path)?,
            rope_scaling: parse_rope_scaling(v, path)?,
            max_position_embeddings: opt_usize(v, "max_position_embeddings", path)?.unwrap_or(4096),
            tie_word_embeddings: bool_field(v, "tie_word_embeddings", is_gemma, path)?,
            qkv_bias: family == Family::Qwen2 || bool_field(v, "attention_bias", false, path)?,
            qk_norm: family == Family::Qwen3,
            activation,
            norm_unit_offset: is_gemma,
            scale_embeddings: is_gemma,
        };
        cfg.validate().map_err(|e| Error::format(path, e))?;
        Ok(cfg)
    }

    /// Checks the relations between sizes that the kernels rely on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            ));
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(format!("vocab_size {} is too large", self.vocab_size));
        }
        Ok(())
    }

    /// The config.json this model is described by (used by merged export).
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::json!({
            "architectures": [format!("{}ForCausalLM", match self.family {
                Family::Llama => "Llama", Family::Mistral => "Mistral", Family::Qwen2 => "Qwen2",
                Family::Qwen3 => "Qwen3", Family::Gemma => "Gemma" })],
            "model_type": self.family.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias,
            "hidden_act": match self.activation { Activation::Silu => "silu", Activation::GeluTanh => "gelu_pytorch_tanh" },
            "torch_dtype": "float32",
        });
        if let Some(rs) = self.rope_scaling {
            v["rope_scaling"] = match rs {
                RopeScaling::Linear { factor } => {
                    serde_json::json!({"rope_type": "linear", "factor": factor})
                }
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                } => serde_json::json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings as u64,
                }),
            };
        }
        v
    }

    /// Output width of a projection.
    pub fn out_features(&self, m: crate::lora::TargetModule) -> usize {
        use crate::lora::TargetModule::*;
        match m {
            Q => self.num_heads * self.head_dim,
            K | V => self.num_kv_heads * self.head_dim,
            O | Down => self.hidden_size,
            Gate | Up => self.intermediate_size,
        }
    }

    /// Input width of a projection.
    pub fn in_features(&self, m: crate::lora::TargetModule) -> usize {
        use crate::lora::TargetModule::*;
        match m {
            Q | K | V | Gate | Up => self.hidden_size,
            O => self.num_heads * self.head_dim,
            Down => self.intermediate_size,
        }
    }

    /// Inverse rotary frequencies `1 / theta^(2i/d)` for i in 0..head_dim/2, after `rope_scaling`.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let f = 1.0 / (self.rope_theta as f64).powf(2.0 * i as f64 / self.head_dim as f64);
                scale_frequency(f, self.rope_scaling) as f32
            })
            .collect()
    }
}

/// Applies `rope_scaling` to one inverse frequency.
///
/// Llama 3: with wavelength λ = 2π/f, L = original context, λ_hi = L/high_freq_factor and
/// λ_lo = L/low_freq_factor: λ < λ_hi keeps f; λ > λ_lo gives f/factor; in between it blends,
/// s = (L/λ − low)/(high − low), f' = (1 − s)·f/factor + s·f.
fn scale_frequency(f: f64, scaling: Option<RopeScaling>) -> f64 {
    match scaling {
        None => f,
        Some(RopeScaling::Linear { factor }) => f / factor as f64,
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let (factor, low, high, ctx) = (
                factor as f64,
                low_freq_factor as f64,
                high_freq_factor as f64,
                original_max_position_embeddings as f64,
            );
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < ctx / high {
                f
            } else if wavelen > ctx / low {
                f / factor
            } else {
                let s = (ctx / wavelen - low) / (high - low);
                (1.0 - s) * f / factor + s * f
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(
            &serde_json::from_str(text).unwrap(),
            Path::new("config.json"),
        )
    }

    const LLAMA: &str = r#"{"model_type":"llama","vocab_size":100,"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2}"#;

    #[test]
    fn llama_defaults() {
        let c = parse(LLAMA).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.activation, Activation::Silu);
        assert!(!c.tie_word_embeddings && !c.qkv_bias && !c.qk_norm);
    }

    #[test]
    fn families_switch_features() {
        let q2 = parse(&LLAMA.replace("llama", "qwen2")).unwrap();
        assert!(q2.qkv_bias);
        let q3 = parse(&LLAMA.replace("llama", "qwen3")).unwrap();
        assert!(q3.qk_norm && !q3.qkv_bias);
        let g = parse(&LLAMA.replace("llama", "gemma")).unwrap();
        assert!(g.norm_unit_offset && g.scale_embeddings && g.tie_word_embeddings);
        assert_eq!(g.activation, Activation::GeluTanh);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let e = parse(&LLAMA.replace("llama", "gpt_neox")).unwrap_err();
        assert!(e.to_string().contains("gpt_neox"), "{e}");
    }

    #[test]
    fn missing_field_is_named() {
        let e = parse(&LLAMA.replace("\"hidden_size\":64,", "")).unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
    }

    #[test]
    fn transformers_5_rope_parameters_are_read() {
        // transformers 5 writes theta and scaling inside "rope_parameters".
        let text = LLAMA.replace(
            "\"num_key_value_heads\":2",
            r#""num_key_value_heads":2,"rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,
            "factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0)
        );
        let plain = LLAMA.replace(
            "\"num_key_value_heads\":2",
            r#""num_key_value_heads":2,"rope_parameters":{"rope_type":"default","rope_theta":1000000.0}"#,
        );
        let c = parse(&plain).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling), (1e6, None));
    }

    #[test]
    fn llama3_rope_scaling_bands() {
        // Llama 3.1 values: high-frequency bands untouched, the lowest divided by the factor.
        let text = LLAMA.replace(
            "\"num_key_value_heads\":2",
            r#""num_key_value_heads":2,"rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3",
            "factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        );
        let c = parse(&text).unwrap();
        let unscaled = ModelConfig {
            rope_scaling: None,
            ..c.clone()
        };
        let (a, b) = (c.rope_inv_freq(), unscaled.rope_inv_freq());
        assert_eq!(a[0], b[0]);
        let last = a.len() - 1;
        assert!((a[last] - b[last] / 8.0).abs() <= 1e-6 * b[last]);
    }

    #[test]
    fn malformed_json_names_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, "{\n \"model_type\": \"llama\",\n oops\n}").unwrap();
        let e = ModelConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("line 3"), "{e}");
    }
}
