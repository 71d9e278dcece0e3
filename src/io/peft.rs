//! LoRA adapters in the layout Hugging Face PEFT saves and loads: `adapter_config.json` plus
//! `adapter_model.safetensors` with tensors named
//! `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::io::json::read_json;
use crate::io::safetensors::{write_safetensors, Dtype, SafetensorsFile};
use crate::lora::{LoraConfig, TargetModule};

/// Adapter configuration file name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// Adapter weights file name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The pickle weights file older PEFT versions wrote; recognised only to say it is unsupported.
const PICKLE_WEIGHTS_FILE: &str = "adapter_model.bin";
/// Prefix of every adapter tensor name: PeftModel → LoraModel → LlamaForCausalLM → LlamaModel.
const KEY_PREFIX: &str = "base_model.model.model.layers.";

/// The fields of PEFT's `LoraConfig` this library uses.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftAdapterConfig {
    /// LoRA rank.
    pub r: usize,
    /// Scaling numerator.
    pub lora_alpha: f32,
    /// Adapted projections.
    pub target_modules: Vec<TargetModule>,
    /// Dropout probability on the adapter input during training.
    pub lora_dropout: f32,
    /// Whether the scale is `alpha / sqrt(r)` rather than `alpha / r`.
    pub use_rslora: bool,
    /// The base model's Hub id or path, as recorded for the user.
    pub base_model_name_or_path: String,
    /// Bias training mode; only "none" is supported.
    pub bias: String,
}

impl PeftAdapterConfig {
    /// The PEFT configuration describing adapters built with `lora` on the model `base`.
    pub fn from_lora(lora: &LoraConfig, base: &str) -> Self {
        PeftAdapterConfig {
            r: lora.rank,
            lora_alpha: lora.alpha,
            target_modules: lora.target_list(),
            lora_dropout: lora.dropout,
            use_rslora: lora.use_rslora,
            base_model_name_or_path: base.to_string(),
            bias: "none".to_string(),
        }
    }

    /// The equivalent [`LoraConfig`]; `seed` is not part of a PEFT configuration.
    pub fn to_lora(&self, seed: u64) -> LoraConfig {
        LoraConfig {
            rank: self.r,
            alpha: self.lora_alpha,
            use_rslora: self.use_rslora,
            dropout: self.lora_dropout,
            targets: self.target_modules.iter().fold(0, |m, t| m | t.bit()),
            seed,
        }
    }

    /// The JSON PEFT writes for a LoRA adapter of a causal language model.
    fn to_json(&self) -> Value {
        let targets: Vec<&str> = self.target_modules.iter().map(|t| t.peft_name()).collect();
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": targets,
            "lora_dropout": self.lora_dropout,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "base_model_name_or_path": self.base_model_name_or_path,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": false,
            "revision": null,
        })
    }

    /// Parses PEFT's JSON, rejecting settings whose weights this library would misread.
    fn from_json(json: &Value, path: &Path) -> Result<Self> {
        let bad = |field: &str, problem: String| {
            Error::format(path, format!("field {field:?}: {problem}"))
        };
        let field = |name: &str| json.get(name).filter(|v| !v.is_null());
        if !json.is_object() {
            return Err(Error::format(path, "not a JSON object"));
        }
        match field("peft_type") {
            Some(Value::String(t)) if t == "LORA" => {}
            Some(other) => {
                return Err(bad(
                    "peft_type",
                    format!("{other}, only LORA adapters are supported"),
                ))
            }
            None => return Err(bad("peft_type", "missing".into())),
        }
        let r = match field("r") {
            Some(v) => v
                .as_u64()
                .filter(|&r| r >= 1)
                .and_then(|r| usize::try_from(r).ok())
                .ok_or_else(|| bad("r", format!("{v} is not a positive integer")))?,
            None => return Err(bad("r", "missing".into())),
        };
        let number = |name: &str, default: f32| match field(name) {
            Some(v) => v
                .as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| bad(name, format!("{v} is not a number"))),
            None => Ok(default),
        };
        let flag = |name: &str| match field(name) {
            Some(v) => v
                .as_bool()
                .ok_or_else(|| bad(name, format!("{v} is not a boolean"))),
            None => Ok(false),
        };
        if flag("use_dora")? {
            return Err(bad("use_dora", "DoRA adapters are not supported".into()));
        }
        if flag("fan_in_fan_out")? {
            return Err(bad(
                "fan_in_fan_out",
                "transposed (Conv1D) weights are not supported".into(),
            ));
        }
        for pattern in ["rank_pattern", "alpha_pattern"] {
            if field(pattern).is_some_and(|v| !v.as_object().is_some_and(|m| m.is_empty())) {
                return Err(bad(
                    pattern,
                    "per-module ranks or alphas are not supported".into(),
                ));
            }
        }
        let bias = match field("bias") {
            None => "none".to_string(),
            Some(Value::String(b)) if b == "none" => b.clone(),
            Some(other) => return Err(bad("bias", format!("{other}, only \"none\" is supported"))),
        };
        let base_model_name_or_path = match field("base_model_name_or_path") {
            None => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(bad(
                    "base_model_name_or_path",
                    format!("{other} is not a string"),
                ))
            }
        };
        Ok(PeftAdapterConfig {
            r,
            // PEFT's defaults for absent fields.
            lora_alpha: number("lora_alpha", 8.0)?,
            target_modules: parse_targets(field("target_modules"))
                .map_err(|problem| bad("target_modules", problem))?,
            lora_dropout: number("lora_dropout", 0.0)?,
            use_rslora: flag("use_rslora")?,
            base_model_name_or_path,
            bias,
        })
    }
}

/// Accepts a list of module names ("q_proj", or dotted paths ending in one), a single name, or
/// PEFT's "all-linear" (every projection of a decoder layer). Returns them in layer order.
fn parse_targets(value: Option<&Value>) -> std::result::Result<Vec<TargetModule>, String> {
    let names: Vec<&str> = match value {
        Some(Value::String(s)) if s == "all-linear" => return Ok(TargetModule::ALL.to_vec()),
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| format!("{v} is not a module name"))
            })
            .collect::<std::result::Result<_, _>>()?,
        Some(other) => return Err(format!("{other} is neither a list nor a string")),
        None => return Err("missing".into()),
    };
    let mut targets = BTreeSet::new();
    for name in names {
        let last = name.rsplit('.').next().unwrap_or(name);
        targets.insert(TargetModule::parse(last).map_err(|_| {
            format!("{name:?} is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
        })?);
    }
    if targets.is_empty() {
        return Err("names no module".into());
    }
    Ok(targets.into_iter().collect())
}

/// The LoRA factors of one adapted projection.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterModule {
    /// Decoder layer index.
    pub layer: usize,
    /// Adapted projection.
    pub module: TargetModule,
    /// Down-projection, `[r, in_features]` row-major.
    pub a: Vec<f32>,
    /// Up-projection, `[out_features, r]` row-major.
    pub b: Vec<f32>,
    /// Input width of the projection.
    pub in_features: usize,
    /// Output width of the projection.
    pub out_features: usize,
}

impl AdapterModule {
    /// The PEFT tensor name of this module's A (`"A"`) or B (`"B"`) factor.
    fn key(&self, factor: &str) -> String {
        format!(
            "{KEY_PREFIX}{}.{}.lora_{factor}.weight",
            self.layer,
            self.module.hf_path()
        )
    }
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (f32) so that PEFT's
/// `PeftModel.from_pretrained` loads them; creates `dir` if needed. Each file is replaced
/// atomically.
pub fn save_peft_adapter(
    dir: &Path,
    cfg: &PeftAdapterConfig,
    modules: &[AdapterModule],
) -> Result<()> {
    check_modules(cfg, modules)?;
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors = Vec::with_capacity(2 * modules.len());
    for m in modules {
        tensors.push((m.key("A"), vec![cfg.r, m.in_features], m.a.as_slice()));
        tensors.push((m.key("B"), vec![m.out_features, cfg.r], m.b.as_slice()));
    }
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, Dtype::F32, &metadata)?;
    let config = serde_json::to_vec_pretty(&cfg.to_json()).expect("JSON values serialise");
    write_atomic(&dir.join(CONFIG_FILE), |f| {
        std::io::Write::write_all(f, &config)
    })
}

/// Checks that `modules` are distinct, listed in the configuration and sized for rank `cfg.r`.
fn check_modules(cfg: &PeftAdapterConfig, modules: &[AdapterModule]) -> Result<()> {
    if cfg.r == 0 {
        return Err(Error::InvalidArgument(
            "adapter rank r must be at least 1".into(),
        ));
    }
    let mut seen = BTreeSet::new();
    for m in modules {
        let what = format!("adapter for layer {} {}", m.layer, m.module.peft_name());
        if !seen.insert((m.layer, m.module)) {
            return Err(Error::InvalidArgument(format!("{what} appears twice")));
        }
        if !cfg.target_modules.contains(&m.module) {
            return Err(Error::InvalidArgument(format!(
                "{what} is not in target_modules"
            )));
        }
        if m.a.len() != cfg.r * m.in_features || m.b.len() != m.out_features * cfg.r {
            return Err(Error::InvalidArgument(format!(
                "{what}: A has {} values and B {}, expected [{r}, {}] and [{}, {r}]",
                m.a.len(),
                m.b.len(),
                m.in_features,
                m.out_features,
                r = cfg.r
            )));
        }
    }
    Ok(())
}

/// Reads an adapter PEFT saved (or [`save_peft_adapter`] wrote). Modules come sorted by layer,
/// then projection. Shapes are checked against `r` only; whether they fit a model is the
/// caller's check, using [`AdapterModule::in_features`] and [`AdapterModule::out_features`].
pub fn load_peft_adapter(dir: &Path) -> Result<(PeftAdapterConfig, Vec<AdapterModule>)> {
    let config_path = dir.join(CONFIG_FILE);
    let cfg = PeftAdapterConfig::from_json(&read_json(&config_path)?, &config_path)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.exists() && dir.join(PICKLE_WEIGHTS_FILE).exists() {
        return Err(Error::format(
            dir.join(PICKLE_WEIGHTS_FILE),
            format!("pickle adapter weights are not supported; only {WEIGHTS_FILE} is"),
        ));
    }
    let file = SafetensorsFile::open(&weights_path)?;
    let pairs = pair_keys(&file)?;
    let mut modules = Vec::with_capacity(pairs.len());
    for ((layer, module), (a_key, b_key)) in pairs {
        let bad = |message: String| Error::format(&weights_path, message);
        let (Some(a_key), Some(b_key)) = (&a_key, &b_key) else {
            let (present, missing) = match &a_key {
                Some(a) => (a, "lora_B"),
                None => (b_key.as_ref().expect("one factor present"), "lora_A"),
            };
            return Err(bad(format!(
                "tensor {present:?} has no matching {missing} tensor"
            )));
        };
        if !cfg.target_modules.contains(&module) {
            return Err(bad(format!(
                "tensor {a_key:?} adapts {}, which {CONFIG_FILE} target_modules does not list",
                module.peft_name()
            )));
        }
        let a_shape = &file.info(a_key).expect("key from file").shape;
        let b_shape = &file.info(b_key).expect("key from file").shape;
        if a_shape.len() != 2 || a_shape[0] != cfg.r {
            return Err(bad(format!(
                "tensor {a_key:?} has shape {a_shape:?}, expected [r = {}, in_features]",
                cfg.r
            )));
        }
        if b_shape.len() != 2 || b_shape[1] != cfg.r {
            return Err(bad(format!(
                "tensor {b_key:?} has shape {b_shape:?}, expected [out_features, r = {}]",
                cfg.r
            )));
        }
        modules.push(AdapterModule {
            layer,
            module,
            in_features: a_shape[1],
            out_features: b_shape[0],
            a: file.read_f32(a_key)?,
            b: file.read_f32(b_key)?,
        });
    }
    Ok((cfg, modules))
}

/// A module's A and B tensor names, either possibly absent.
type KeyPair = (Option<String>, Option<String>);

/// Groups the file's tensor names by (layer, projection); any other name, or a factor given twice
/// (as `lora_A.weight` and `lora_A.default.weight`), is an error naming the key.
fn pair_keys(file: &SafetensorsFile) -> Result<BTreeMap<(usize, TargetModule), KeyPair>> {
    let mut pairs: BTreeMap<(usize, TargetModule), KeyPair> = BTreeMap::new();
    for key in file.names() {
        let (layer, module, is_a) = parse_key(key).ok_or_else(|| {
            Error::format(
                file.path(),
                format!(
                    "unexpected tensor {key:?} (expected {KEY_PREFIX}{{layer}}.{{self_attn|mlp}}.{{projection}}.lora_{{A|B}}.weight)"
                ),
            )
        })?;
        let pair = pairs.entry((layer, module)).or_default();
        let slot = if is_a { &mut pair.0 } else { &mut pair.1 };
        if let Some(previous) = slot.replace(key.to_string()) {
            return Err(Error::format(
                file.path(),
                format!("tensors {previous:?} and {key:?} hold the same factor"),
            ));
        }
    }
    Ok(pairs)
}

/// Splits a PEFT key into (layer, projection, whether it is lora_A). Accepts the saved form
/// `...lora_A.weight` and the in-memory form `...lora_A.default.weight`.
fn parse_key(key: &str) -> Option<(usize, TargetModule, bool)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (layer, rest) = rest.split_once('.')?;
    if !layer.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let layer = layer.parse().ok()?;
    let rest = rest
        .strip_suffix(".weight")
        .map(|r| r.strip_suffix(".default").unwrap_or(r))?;
    let (path, factor) = rest.rsplit_once(".lora_")?;
    let is_a = match factor {
        "A" => true,
        "B" => false,
        _ => return None,
    };
    let module = TargetModule::ALL
        .into_iter()
        .find(|t| t.hf_path() == path)?;
    Some((layer, module, is_a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(
        layer: usize,
        module: TargetModule,
        r: usize,
        inf: usize,
        outf: usize,
    ) -> AdapterModule {
        AdapterModule {
            layer,
            module,
            a: (0..r * inf).map(|i| i as f32 * 0.25 - 1.0).collect(),
            b: (0..outf * r).map(|i| 0.5 - i as f32 * 0.125).collect(),
            in_features: inf,
            out_features: outf,
        }
    }

    fn config(r: usize, targets: &[TargetModule]) -> PeftAdapterConfig {
        let lora = LoraConfig {
            rank: r,
            alpha: 32.0,
            use_rslora: true,
            dropout: 0.05,
            targets: targets.iter().fold(0, |m, t| m | t.bit()),
            seed: 7,
        };
        PeftAdapterConfig::from_lora(&lora, "meta-llama/Llama-3.2-1B")
    }

    #[test]
    fn lora_config_round_trip() {
        let cfg = config(8, &[TargetModule::V, TargetModule::Q]);
        assert_eq!(cfg.target_modules, [TargetModule::Q, TargetModule::V]);
        let lora = cfg.to_lora(7);
        assert_eq!(
            PeftAdapterConfig::from_lora(&lora, "meta-llama/Llama-3.2-1B"),
            cfg
        );
        assert_eq!((lora.rank, lora.seed, lora.use_rslora), (8, 7, true));
    }

    #[test]
    fn adapter_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adapter");
        let cfg = config(4, &[TargetModule::Q, TargetModule::Down]);
        let modules = vec![
            module(1, TargetModule::Down, 4, 12, 8),
            module(0, TargetModule::Q, 4, 8, 8),
            module(1, TargetModule::Q, 4, 8, 8),
        ];
        save_peft_adapter(&out, &cfg, &modules).unwrap();

        let (loaded_cfg, loaded) = load_peft_adapter(&out).unwrap();
        assert_eq!(loaded_cfg, cfg);
        let mut expected = modules.clone();
        expected.sort_by_key(|m| (m.layer, m.module));
        assert_eq!(loaded, expected);

        let json = read_json(&out.join(CONFIG_FILE)).unwrap();
        assert_eq!(json["peft_type"], "LORA");
        assert_eq!(json["task_type"], "CAUSAL_LM");
        assert_eq!(json["target_modules"], json!(["q_proj", "down_proj"]));
        assert_eq!(json["use_dora"], false);
        let file = SafetensorsFile::open(&out.join(WEIGHTS_FILE)).unwrap();
        let a = file
            .info("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")
            .unwrap();
        assert_eq!((a.dtype, a.shape.as_slice()), (Dtype::F32, &[4, 12][..]));
        let b = file
            .info("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
            .unwrap();
        assert_eq!(b.shape, [8, 4]);
        assert_eq!(file.metadata()["format"], "pt");
    }

    #[test]
    fn accepts_default_adapter_keys_and_string_targets() {
        let dir = tempfile::tempdir().unwrap();
        let m = module(3, TargetModule::V, 2, 4, 6);
        let a_key = "base_model.model.model.layers.3.self_attn.v_proj.lora_A.default.weight";
        let b_key = "base_model.model.model.layers.3.self_attn.v_proj.lora_B.default.weight";
        let tensors = [
            (a_key.to_string(), vec![2, 4], m.a.as_slice()),
            (b_key.to_string(), vec![6, 2], m.b.as_slice()),
        ];
        write_safetensors(
            &dir.path().join(WEIGHTS_FILE),
            &tensors,
            Dtype::BF16,
            &BTreeMap::new(),
        )
        .unwrap();
        let config =
            r#"{"peft_type": "LORA", "r": 2, "target_modules": "v_proj", "lora_alpha": 4}"#;
        fs::write(dir.path().join(CONFIG_FILE), config).unwrap();
        let (cfg, modules) = load_peft_adapter(dir.path()).unwrap();
        assert_eq!(cfg.target_modules, [TargetModule::V]);
        assert_eq!(
            (cfg.lora_alpha, cfg.lora_dropout, cfg.bias.as_str()),
            (4.0, 0.0, "none")
        );
        assert_eq!(modules.len(), 1);
        assert_eq!(
            (
                modules[0].layer,
                modules[0].in_features,
                modules[0].out_features
            ),
            (3, 4, 6)
        );
        assert_eq!(modules[0].a, m.a); // small multiples of 1/8 are exact in bf16
    }

    #[test]
    fn all_linear_targets_every_projection() {
        assert_eq!(
            parse_targets(Some(&json!("all-linear"))).unwrap(),
            TargetModule::ALL
        );
        assert!(parse_targets(Some(&json!([".*q_proj"]))).is_err());
    }

    #[test]
    fn parses_only_peft_keys() {
        let key = "base_model.model.model.layers.12.mlp.gate_proj.lora_B.weight";
        assert_eq!(parse_key(key), Some((12, TargetModule::Gate, false)));
        for bad in [
            "base_model.model.model.layers.x.mlp.gate_proj.lora_B.weight",
            "base_model.model.model.layers.1.mlp.q_proj.lora_A.weight",
            "base_model.model.model.layers.1.mlp.gate_proj.lora_C.weight",
            "base_model.model.model.layers.1.mlp.gate_proj.lora_magnitude_vector",
            "base_model.model.lm_head.lora_A.weight",
        ] {
            assert_eq!(parse_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn save_rejects_module_outside_targets() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(2, &[TargetModule::Q]);
        let err = save_peft_adapter(dir.path(), &cfg, &[module(0, TargetModule::K, 2, 4, 4)])
            .unwrap_err();
        assert!(err.to_string().contains("not in target_modules"), "{err}");
    }
}
