//! An estimate of the memory a training configuration needs on the CPU backend (f32), by part,
//! and the host's physical memory.

use crate::lora::LoraConfig;
use crate::model::config::ModelConfig;
use crate::model::decoder::{mlp_chunk_ranges, mlp_chunk_rows_for};

/// Bytes by part; `total` is their sum.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MemoryEstimate {
    /// Frozen base weights.
    pub weights: u64,
    /// LoRA parameters, gradients and the two AdamW moments.
    pub adapters: u64,
    /// Activations kept for the backward pass, plus the largest transient buffers.
    pub activations: u64,
    pub total: u64,
}

/// Counts f32 values: weights from the tensor list; per token and layer the cached activations
/// (norm inputs/outputs, q/k/v, attention output, the attention projections' LoRA
/// intermediates, and without checkpointing the MLP's gate and up products); with checkpointing
/// only each layer's input is kept for every layer, plus one layer's cache. Transients: one
/// sequence's score matrix per head group, one LM-head chunk of logits, a few `[tokens, hidden]`
/// gradients and one MLP chunk's intermediates and their gradients.
pub fn estimate(
    cfg: &ModelConfig,
    lora: &LoraConfig,
    batch: usize,
    seq: usize,
    checkpointing: bool,
) -> MemoryEstimate {
    const F32: u64 = 4;
    let weights: u64 = crate::model::weights::tensor_specs(cfg)
        .iter()
        .map(|s| (s.rows * s.cols) as u64)
        .sum::<u64>()
        * F32;
    let per_layer_lora: u64 = lora
        .target_list()
        .iter()
        .map(|&m| (lora.rank * (cfg.in_features(m) + cfg.out_features(m))) as u64)
        .sum();
    let adapters = per_layer_lora * cfg.num_layers as u64 * 4 * F32;
    let tokens = (batch * seq) as u64;
    let (d, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let q = (cfg.num_heads * cfg.head_dim) as u64;
    let kv = (cfg.num_kv_heads * cfg.head_dim) as u64;
    let layer_cache =
        tokens * (4 * d + 2 * q + 2 * kv + cfg.num_heads as u64 + 4 * lora.rank as u64) * F32;
    let kept = if checkpointing {
        cfg.num_layers as u64 * tokens * d * F32 + layer_cache
    } else {
        let mlp_products = 2 * tokens * i * F32;
        cfg.num_layers as u64 * (tokens * d * F32 + layer_cache + mlp_products)
    };
    // The largest MLP chunk: the first.
    let max_rows = mlp_chunk_rows_for(cfg.intermediate_size);
    let mlp_chunk = mlp_chunk_ranges(tokens as usize, max_rows)
        .next()
        .map_or(0, |c| c.1) as u64;
    let transient = (2 * (seq * seq) as u64 + 256 * cfg.vocab_size as u64) * F32
        + (4 * tokens * d + 6 * mlp_chunk * i) * F32;
    let activations = kept + transient;
    MemoryEstimate {
        weights,
        adapters,
        activations,
        total: weights + adapters + activations,
    }
}

/// The host's physical memory in bytes (`MemTotal` of /proc/meminfo, read once); None where
/// that is not readable (not Linux).
pub fn host_memory_bytes() -> Option<u64> {
    static TOTAL: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *TOTAL.get_or_init(|| {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    })
}
