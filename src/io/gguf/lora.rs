//! LoRA adapters as llama.cpp's GGUF adapter files (`--lora`, `llama_adapter_lora_init`).
//!
//! Metadata: `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, and the
//! base model's `general.architecture`. Tensors: `blk.{i}.{module}.weight.lora_a` with
//! ne = [in, r] (PEFT's A `[r, in]`) and `...lora_b` with ne = [r, out] (B `[out, r]`).
//! llama.cpp scales by `alpha / r`; an rsLoRA scale `alpha / sqrt(r)` is written as
//! alpha' = alpha·sqrt(r). In llama GGUFs the rows of B for q and k are permuted like the
//! base weights (see [`super::names`]).

use std::collections::BTreeMap;
use std::path::Path;

use super::config::architecture;
use super::names::{module_name, permute_rows, permuted_heads, Direction};
use super::quant::quantize;
use super::types::{GgmlType, MetaValue};
use super::writer::{write_gguf, TensorEntry};
use super::GgufFile;
use crate::error::{Error, Result};
use crate::io::peft::AdapterModule;
use crate::lora::{LoraConfig, TargetModule};
use crate::model::config::ModelConfig;

fn tensor_names(layer: usize, m: TargetModule) -> (String, String) {
    let base = format!("blk.{layer}.{}.weight", module_name(m));
    (format!("{base}.lora_a"), format!("{base}.lora_b"))
}

/// Writes `modules` (adapters of rank `lora.rank` on a model of `cfg`) as a GGUF LoRA adapter.
pub fn write_lora_adapter(
    path: &Path,
    cfg: &ModelConfig,
    lora: &LoraConfig,
    modules: &[AdapterModule],
    name: &str,
) -> Result<()> {
    let arch = architecture(cfg.family).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "GGUF adapters support llama, mistral, qwen2 and qwen3 models, not {}",
            cfg.family.model_type()
        ))
    })?;
    let r = lora.rank;
    let meta = vec![
        (
            "general.architecture".into(),
            MetaValue::String(arch.into()),
        ),
        ("general.type".into(), MetaValue::String("adapter".into())),
        ("general.name".into(), MetaValue::String(name.into())),
        ("adapter.type".into(), MetaValue::String("lora".into())),
        (
            "adapter.lora.alpha".into(),
            MetaValue::F32(lora.scale() * r as f32),
        ),
    ];
    let mut entries = Vec::new();
    for m in modules {
        let (a, b) = tensor_names(m.layer, m.module);
        entries.push(TensorEntry::new(a, m.in_features, Some(r), GgmlType::F32));
        entries.push(TensorEntry::new(b, r, Some(m.out_features), GgmlType::F32));
    }
    write_gguf(path, &meta, &entries, |i| {
        let m = &modules[i / 2];
        Ok(quantize(
            GgmlType::F32,
            &if i % 2 == 0 {
                m.a.clone()
            } else {
                match permuted_heads(cfg, m.module) {
                    Some(h) => permute_rows(&m.b, h, r, Direction::HfToGguf),
                    None => m.b.clone(),
                }
            },
        ))
    })
}

/// Reads a GGUF LoRA adapter for a model of `cfg`: its LoRA settings (rank from the tensors,
/// alpha from the metadata, targets from the modules present) and its modules in PEFT layout.
pub fn read_lora_adapter(
    path: &Path,
    cfg: &ModelConfig,
    seed: u64,
) -> Result<(LoraConfig, Vec<AdapterModule>)> {
    let file = GgufFile::open(path)?;
    let bad = |m: String| Error::format(path, m);
    let meta = file.metadata();
    let text = |k: &str| meta.get(k).and_then(MetaValue::as_str);
    if text("general.type") != Some("adapter") || text("adapter.type") != Some("lora") {
        return Err(bad(
            "not a LoRA adapter (general.type must be \"adapter\" and adapter.type \"lora\")"
                .into(),
        ));
    }
    if text("general.architecture") != architecture(cfg.family) {
        return Err(Error::AdapterMismatch(format!(
            "{}: adapter for architecture {:?}, the model is {}",
            path.display(),
            text("general.architecture"),
            cfg.family.model_type()
        )));
    }
    let mut found = BTreeMap::new();
    let mut rank = None;
    for t in &file.header().tensors {
        let Some((layer, m, is_a)) = parse_name(&t.name) else {
            return Err(bad(format!("tensor {:?} is not a LoRA tensor", t.name)));
        };
        let (Some(&d0), Some(&d1), 2) = (t.dims.first(), t.dims.get(1), t.dims.len()) else {
            return Err(bad(format!("tensor {:?} is not a matrix", t.name)));
        };
        let r = if is_a { d1 } else { d0 } as usize;
        if *rank.get_or_insert(r) != r || r == 0 {
            return Err(bad(format!(
                "tensor {:?} has rank {r}, others {rank:?}",
                t.name
            )));
        }
        let values = file.read_f32(&t.name)?;
        let entry = found.entry((layer, m)).or_insert((None, None, 0, 0));
        if is_a {
            entry.0 = Some(values);
            entry.2 = d0 as usize;
        } else {
            entry.1 = Some(values);
            entry.3 = d1 as usize;
        }
    }
    let rank = rank.ok_or_else(|| bad("the adapter has no tensors".into()))?;
    let alpha = meta
        .get("adapter.lora.alpha")
        .and_then(MetaValue::as_f64)
        .filter(|a| a.is_finite() && *a > 0.0)
        .map_or(rank as f32, |a| a as f32);
    let mut modules = Vec::new();
    let mut targets = 0;
    for ((layer, m), (a, b, in_features, out_features)) in found {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(bad(format!(
                "layer {layer} {} has only one of lora_a and lora_b",
                module_name(m)
            )));
        };
        let b = match permuted_heads(cfg, m) {
            Some(h) if out_features % h == 0 => permute_rows(&b, h, rank, Direction::GgufToHf),
            Some(_) => {
                return Err(Error::AdapterMismatch(format!(
                    "{}: layer {layer} {} does not fit the model's heads",
                    path.display(),
                    module_name(m)
                )))
            }
            None => b,
        };
        targets |= m.bit();
        modules.push(AdapterModule {
            layer,
            module: m,
            a,
            b,
            in_features,
            out_features,
        });
    }
    let lora = LoraConfig {
        rank,
        alpha,
        use_rslora: false,
        dropout: 0.0,
        targets,
        seed,
    };
    Ok((lora, modules))
}

/// "blk.{i}.{module}.weight.lora_{a|b}" → (i, module, is_a).
fn parse_name(name: &str) -> Option<(usize, TargetModule, bool)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, which) = rest.split_once(".weight.lora_")?;
    let m = TargetModule::ALL
        .into_iter()
        .find(|m| module_name(*m) == module)?;
    let is_a = match which {
        "a" => true,
        "b" => false,
        _ => return None,
    };
    Some((layer.parse().ok()?, m, is_a))
}
