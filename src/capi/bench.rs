//! `ft_bench`: the training-step benchmark of `finetune bench`, returning the same JSON.

use super::params::{ft_model_default_params, ft_model_params, FT_QUANT_NF4, FT_QUANT_NONE};
use super::{ft_status, guard, mut_arg, ref_arg, str_arg, string_out};
use crate::bench::{run, BenchConfig, BenchMode};
use crate::error::Result;
use std::ffi::c_char;

/// What `ft_bench` measures: the options of `finetune bench`. Get defaults from
/// `ft_bench_default_params()`. Strings are read during the call only.
#[repr(C)]
pub struct ft_bench_params {
    /// A named shape with random weights: "smollm2-135m", "llama3.2-1b", "llama3-8b",
    /// "mistral-7b", "qwen2.5-7b", "gemma-7b", or "tiny" (two layers, hidden size 32).
    pub model: *const c_char,
    /// "lora" (frozen weights in the device's own format) or "qlora" (frozen projection
    /// matrices quantized to NF4 at load); NULL means "lora".
    pub mode: *const c_char,
    /// Rows per step and GPU, at least 1.
    pub batch: u32,
    /// Tokens per row, at least 1.
    pub seq: u32,
    /// LoRA rank (alpha equals it), at least 1; all seven projections are adapted.
    pub rank: u32,
    /// Steps timed after the untimed warm-up (one step, two where the second records the pass
    /// on a GPU), at least 1.
    pub steps: u32,
    /// Non-zero: recompute each layer in the backward pass instead of keeping its activations.
    pub checkpointing: i32,
    /// CPU worker threads; 0 means one per core.
    pub n_threads: u32,
    /// "auto", "cpu", "cuda:N" or several GPUs ("cuda:0,cuda:1", "cuda:all"; each takes `batch`
    /// rows), as in `ft_model_params`; NULL means "auto".
    pub device: *const c_char,
    /// A cap on the device memory held, in MiB; 0 means none. GPU only (ignored on the CPU).
    pub max_device_memory_mib: u64,
    /// Non-zero: keep the saved layer inputs in pinned host memory (GPU only), as
    /// `ft_train_params.offload_activations`.
    pub offload_activations: i32,
    /// Non-zero: keep the LM head in pinned host memory (GPU only), as
    /// `ft_model_params.lm_head_in_host_memory`.
    pub lm_head_in_host_memory: i32,
    /// Decoder layers kept in pinned host memory (GPU only), as
    /// `ft_model_params.layers_in_host_memory`.
    pub layers_in_host_memory: u32,
    /// Layers that keep their MLP's gate and up products, as
    /// `ft_train_params.kept_mlp_layers`.
    pub kept_mlp_layers: u32,
}

/// Defaults, those of `finetune bench`: model "smollm2-135m", mode "lora", batch 4, seq 256,
/// rank 16, 3 timed steps, checkpointing on, one thread per core, device "auto" (NULL), no
/// device-memory cap, no offload, the LM head in device memory.
#[no_mangle]
pub extern "C" fn ft_bench_default_params() -> ft_bench_params {
    let d = BenchConfig::default();
    debug_assert_eq!(d.model, "smollm2-135m");
    debug_assert_eq!(d.params.quantization, BenchMode::Lora.quantization());
    let m = super::ft_model_default_params();
    ft_bench_params {
        model: c"smollm2-135m".as_ptr(),
        mode: c"lora".as_ptr(),
        batch: d.batch as u32,
        seq: d.seq as u32,
        rank: d.rank as u32,
        steps: d.steps as u32,
        checkpointing: d.checkpointing as i32,
        n_threads: m.n_threads,
        device: m.device,
        max_device_memory_mib: m.max_device_memory_mib,
        offload_activations: d.offload_activations as i32,
        lm_head_in_host_memory: m.lm_head_in_host_memory,
        layers_in_host_memory: m.layers_in_host_memory,
        kept_mlp_layers: d.kept_mlp_layers as u32,
    }
}

impl ft_bench_params {
    fn to_rust(&self) -> Result<BenchConfig> {
        let mode = if self.mode.is_null() {
            BenchMode::Lora
        } else {
            BenchMode::parse(str_arg(self.mode, "params->mode")?)?
        };
        let model_params = ft_model_params {
            device: self.device,
            n_threads: self.n_threads,
            quantization: match mode {
                BenchMode::Lora => FT_QUANT_NONE,
                BenchMode::Qlora => FT_QUANT_NF4,
            },
            max_device_memory_mib: self.max_device_memory_mib,
            lm_head_in_host_memory: self.lm_head_in_host_memory,
            layers_in_host_memory: self.layers_in_host_memory,
            ..ft_model_default_params()
        };
        Ok(BenchConfig {
            model: str_arg(self.model, "params->model")?.to_owned(),
            batch: self.batch as usize,
            seq: self.seq as usize,
            rank: self.rank as usize,
            steps: self.steps as usize,
            checkpointing: self.checkpointing != 0,
            offload_activations: self.offload_activations != 0,
            kept_mlp_layers: self.kept_mlp_layers as usize,
            params: model_params.to_rust()?,
        })
    }
}

/// Builds a model of the named shape with random weights on the device, runs the warm-up (one
/// step, two where the second records the pass) and `steps` timed training steps on random
/// tokens, and sets `*json_out` to the JSON object that `finetune bench` prints: model, device,
/// mode, ranks, batch, seq, rank, checkpointing, offload_activations, kept_mlp_layers,
/// lm_head_in_host, layers_in_host, steps, replayed
/// (whether the timed steps replayed a recorded pass), step_seconds_median,
/// cpu_seconds_median (null where the OS does not report it), tokens_per_second, first_loss,
/// last_loss, peak_rss_mib (the whole process's peak resident memory), peak_device_mib,
/// peak_device_set_by (what the allocation that reached the peak was for),
/// peak_device_purposes_mib (what the peak was made of: [purpose, MiB] pairs, largest first),
/// held_device_mib (held between steps; these four null on the CPU) and load_seconds.
/// The caller frees the string with `ft_string_free`; on failure `*json_out` is left untouched. `params` may be NULL for the
/// defaults. The call runs on the calling thread and may take minutes for the larger shapes.
/// An unknown model or mode, or a batch, seq, rank or steps of 0 fails with
/// `FT_ERR_INVALID_ARGUMENT` before any model is built.
#[no_mangle]
pub extern "C" fn ft_bench(
    params: *const ft_bench_params,
    json_out: *mut *mut c_char,
) -> ft_status {
    guard(|| {
        let out = mut_arg(json_out, "json_out")?;
        let cfg = if params.is_null() {
            BenchConfig::default()
        } else {
            ref_arg(params, "params")?.to_rust()?
        };
        string_out(run(&cfg)?.to_json(), out);
        Ok(())
    })
}
