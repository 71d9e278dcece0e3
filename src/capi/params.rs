//! Parameter structs passed by pointer, each with an `ft_*_default_params()` constructor, and
//! their conversion to the Rust API's types.

use super::{slice_arg, str_arg};
use crate::api::{Device, ModelParams, ProcessGroup, DEFAULT_COLLECTIVE_TIMEOUT};
use crate::error::{Error, Result};
use crate::io::gguf::GgmlType;
use crate::io::safetensors::Dtype;
use crate::lora::LoraConfig;
use crate::quant::Quantization;
use crate::train::batch::Batch;
use crate::train::schedule::ScheduleKind;
use crate::train::trainer::{StepStats, TrainConfig};
use std::ffi::c_char;
use std::time::Duration;

/// LoRA target bits for `ft_lora_params.target_modules`.
pub const FT_TARGET_Q: u32 = 1;
pub const FT_TARGET_K: u32 = 2;
pub const FT_TARGET_V: u32 = 4;
pub const FT_TARGET_O: u32 = 8;
pub const FT_TARGET_GATE: u32 = 16;
pub const FT_TARGET_UP: u32 = 32;
pub const FT_TARGET_DOWN: u32 = 64;
pub const FT_TARGET_ALL: u32 = 127;

/// Learning-rate schedules for `ft_train_params.schedule`.
pub const FT_SCHEDULE_CONSTANT: i32 = 0;
pub const FT_SCHEDULE_LINEAR: i32 = 1;
pub const FT_SCHEDULE_COSINE: i32 = 2;

/// Label meaning "no loss at this position" in `ft_batch.labels`.
pub const FT_IGNORE_LABEL: i32 = -100;
const _: () = assert!(FT_IGNORE_LABEL == crate::backend::IGNORE_LABEL);

/// `ft_model_params.quantization`: frozen projection matrices in the device's own format (f32 on
/// the CPU, bf16 on a GPU).
pub const FT_QUANT_NONE: i32 = 0;
/// `ft_model_params.quantization`: frozen projection matrices in NF4 with double-quantized
/// absmax (QLoRA), dequantized on the fly for each product.
pub const FT_QUANT_NF4: i32 = 1;

/// Element types for exported weights.
pub const FT_DTYPE_F32: i32 = 0;
pub const FT_DTYPE_F16: i32 = 1;
pub const FT_DTYPE_BF16: i32 = 2;

/// Tensor types for GGUF export (`ft_model_save_gguf`, `ft_trainer_export_gguf`): ggml's type
/// numbers. Norm weights are always written as F32.
pub const FT_GGUF_F32: i32 = 0;
pub const FT_GGUF_F16: i32 = 1;
pub const FT_GGUF_Q8_0: i32 = 8;
pub const FT_GGUF_BF16: i32 = 30;

/// How to load a model. Get defaults from `ft_model_default_params()`.
#[repr(C)]
pub struct ft_model_params {
    /// "auto" (the first CUDA GPU when its driver, NVRTC and cuBLAS load, else the CPU), "cpu",
    /// "cuda:N", a list such as "cuda:0,cuda:1" or "cuda:all" (several GPUs of this process
    /// training as one data-parallel group over NCCL: each holds a replica and takes its share
    /// of every batch's rows); NULL means "auto". Read during the call only.
    pub device: *const c_char,
    /// CPU worker threads; 0 means one per core.
    pub n_threads: u32,
    /// How the frozen projection matrices (q, k, v, o, gate, up, down) are stored: `FT_QUANT_NONE`
    /// or `FT_QUANT_NF4` (QLoRA). The embedding and LM head are never quantized. A
    /// bitsandbytes-4bit checkpoint stays in NF4 as read with `FT_QUANT_NF4` and is dequantized
    /// with `FT_QUANT_NONE`.
    pub quantization: i32,
    /// A cap on the device memory the model and its trainers hold, in MiB; 0 means none. An
    /// allocation past it fails with `FT_ERR_OUT_OF_MEMORY`, leaving the model and trainers
    /// usable. GPU only (ignored on the CPU).
    pub max_device_memory_mib: u64,
    /// Ranks in a data-parallel group spanning processes or hosts; 0 or 1 means this process
    /// trains alone (or over the GPUs `device` lists). With more, `device` must be one "cuda:N",
    /// `rank` and `nccl_unique_id` say where this process stands, and each step's batches are
    /// this rank's own share: the gradients are summed over the group as if one trainer had
    /// taken the union of all ranks' batches. Loading waits until every rank has joined.
    pub world_size: u32,
    /// This process's rank, 0 ≤ rank < world_size.
    pub rank: u32,
    /// `FT_NCCL_UNIQUE_ID_BYTES` bytes made by `ft_nccl_unique_id` on one rank and handed to the
    /// others by the application; read during the call only. Ignored when world_size ≤ 1.
    pub nccl_unique_id: *const u8,
    /// How long a rank waits for the others (joining, each step) before failing with
    /// `FT_ERR_COLLECTIVE` instead of hanging, in milliseconds; 0 means 300000 (5 minutes).
    pub collective_timeout_ms: u32,
    /// Non-zero: keep the LM head (or, tied, the embedding table serving as one) in pinned host
    /// memory instead of device memory (GPU only; 1 GiB less held on Llama 3). Each micro-batch's
    /// forward pass starts copying it to the device in chunks of rows beside its last quarter of
    /// layers (after the last layer kept in host memory), and the loss takes the rest chunk by
    /// chunk (~384 MiB of it ahead of the chunk being read); evaluation and generation copy it
    /// whole for each product (a generated token then costs one copy of it over the bus).
    pub lm_head_in_host_memory: i32,
    /// Decoder layers whose projection matrices stay in pinned host memory instead of device
    /// memory (GPU only; bf16 matrices whole, 421 MiB a layer on Llama 3 8B; NF4 ones their
    /// codes, ~105 MiB): spread evenly over the layers, at most all of them. A training pass
    /// copies each to the device ahead of the layer, beside the layers before it, holding one
    /// such copy at a time (two where host layers are adjacent: the next comes over while one
    /// runs); evaluation and generation bring them the same way (generation: each host layer
    /// once a token). Adjacent bf16 host layers make a pass wait on the bus (a layer's copy takes
    /// about as long as its forward); up to (layers − 2)/2 of them are never adjacent. 0: none.
    pub layers_in_host_memory: u32,
}

/// Bytes of an NCCL unique id (`ft_nccl_unique_id`).
pub const FT_NCCL_UNIQUE_ID_BYTES: usize = 128;

/// LoRA shape. Get defaults from `ft_lora_default_params()`: r 16, alpha 16, all seven targets.
#[repr(C)]
pub struct ft_lora_params {
    pub rank: u32,
    pub alpha: f32,
    /// Non-zero: scale alpha/sqrt(rank) (rsLoRA) instead of alpha/rank.
    pub use_rslora: i32,
    /// Dropout on the adapter input while training, in [0, 1).
    pub dropout: f32,
    /// OR of `FT_TARGET_*` bits.
    pub target_modules: u32,
    /// Seed of the A initialisation.
    pub seed: u64,
}

/// Optimizer and schedule. Get defaults from `ft_train_default_params()`.
#[repr(C)]
pub struct ft_train_params {
    pub learning_rate: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub max_grad_norm: f32,
    /// One of `FT_SCHEDULE_*`.
    pub schedule: i32,
    pub warmup_steps: u64,
    /// Steps the schedule decays over.
    pub total_steps: u64,
    /// Non-zero: recompute each layer in the backward pass (less memory, ~1/3 more compute).
    pub gradient_checkpointing: i32,
    /// Seed of the dropout masks.
    pub seed: u64,
    /// Non-zero: keep the saved layer inputs in pinned host memory instead of device memory,
    /// copied out and back beside the compute (GPU only); with checkpointing, each layer's
    /// attention output, its inputs (q, k, v) and x1 too when all of them take at most a quarter
    /// of the host's memory (the backward then skips the recomputed attention forward and, where
    /// the adapters' inputs are kept, every product before the MLP).
    pub offload_activations: i32,
    /// With checkpointing: the last this many decoder layers keep their MLP's gate and up
    /// products on the device instead of recomputing them in the backward pass (faster;
    /// 2 × tokens × intermediate_size bf16 values a layer of device memory on a GPU). 0: none.
    pub kept_mlp_layers: u32,
}

/// A batch of `batch_size` rows of `seq_len` tokens, each array holding batch_size·seq_len values
/// row by row. `labels[t]` is the token expected after position t, or `FT_IGNORE_LABEL` (-100) for no loss
/// there.
/// `positions` (NULL: 0..seq_len in every row) and `segment_ids` (NULL: one segment a row) let
/// several examples share a row without attending to each other. The arrays are read during the
/// call only.
#[repr(C)]
pub struct ft_batch {
    pub input_ids: *const i32,
    pub labels: *const i32,
    pub positions: *const i32,
    pub segment_ids: *const i32,
    pub batch_size: u32,
    pub seq_len: u32,
}

/// What one optimizer step did.
#[repr(C)]
#[derive(Default)]
pub struct ft_step_stats {
    /// 1-based number of the step just taken.
    pub step: u64,
    /// Mean cross-entropy over the labelled tokens.
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub learning_rate: f32,
    pub tokens: u64,
    pub labelled_tokens: u64,
}

/// Defaults: device "auto", one thread per core, no quantization, no device-memory cap, no
/// process group, the LM head in device memory.
#[no_mangle]
pub extern "C" fn ft_model_default_params() -> ft_model_params {
    ft_model_params {
        device: std::ptr::null(),
        n_threads: 0,
        quantization: FT_QUANT_NONE,
        max_device_memory_mib: 0,
        world_size: 0,
        rank: 0,
        nccl_unique_id: std::ptr::null(),
        collective_timeout_ms: 0,
        lm_head_in_host_memory: 0,
        layers_in_host_memory: 0,
    }
}

/// Defaults: rank 16, alpha 16, no rsLoRA, no dropout, all seven projections, seed 0.
#[no_mangle]
pub extern "C" fn ft_lora_default_params() -> ft_lora_params {
    let d = LoraConfig::default();
    ft_lora_params {
        rank: d.rank as u32,
        alpha: d.alpha,
        use_rslora: d.use_rslora as i32,
        dropout: d.dropout,
        target_modules: d.targets,
        seed: d.seed,
    }
}

/// Defaults: AdamW lr 2e-4, betas 0.9/0.999, eps 1e-8, no weight decay, clip 1.0, linear
/// schedule over 100 steps without warmup, checkpointing on, no offload, seed 0.
#[no_mangle]
pub extern "C" fn ft_train_default_params() -> ft_train_params {
    let d = TrainConfig::default();
    ft_train_params {
        learning_rate: d.learning_rate,
        weight_decay: d.weight_decay,
        beta1: d.beta1,
        beta2: d.beta2,
        eps: d.eps,
        max_grad_norm: d.max_grad_norm,
        schedule: FT_SCHEDULE_LINEAR,
        warmup_steps: d.warmup_steps,
        total_steps: d.total_steps,
        gradient_checkpointing: d.checkpointing as i32,
        seed: d.seed,
        offload_activations: d.offload_activations as i32,
        kept_mlp_layers: d.kept_mlp_layers as u32,
    }
}

impl ft_model_params {
    pub(super) fn to_rust(&self) -> Result<ModelParams> {
        let device = if self.device.is_null() {
            Device::Auto
        } else {
            Device::parse(str_arg(self.device, "params->device")?)?
        };
        let quantization = match self.quantization {
            FT_QUANT_NONE => Quantization::None,
            FT_QUANT_NF4 => Quantization::Nf4,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "params->quantization is {other} (expected FT_QUANT_NONE or FT_QUANT_NF4)"
                )))
            }
        };
        let max_device_memory_mib = usize::try_from(self.max_device_memory_mib).map_err(|_| {
            Error::InvalidArgument(format!(
                "params->max_device_memory_mib {} is too large",
                self.max_device_memory_mib
            ))
        })?;
        let process_group = match self.world_size {
            0 | 1 => None,
            world_size => {
                if self.rank >= world_size {
                    return Err(Error::InvalidArgument(format!(
                        "params->rank {} is outside a group of params->world_size {world_size}",
                        self.rank
                    )));
                }
                if self.nccl_unique_id.is_null() {
                    return Err(Error::InvalidArgument(
                        "params->nccl_unique_id is NULL but params->world_size is above 1".into(),
                    ));
                }
                // SAFETY: the header asks for FT_NCCL_UNIQUE_ID_BYTES readable bytes.
                let id = unsafe {
                    std::slice::from_raw_parts(self.nccl_unique_id, FT_NCCL_UNIQUE_ID_BYTES)
                };
                Some(ProcessGroup {
                    rank: self.rank as usize,
                    world_size: world_size as usize,
                    unique_id: id.try_into().expect("the slice has the id's length"),
                })
            }
        };
        let collective_timeout = match self.collective_timeout_ms {
            0 => DEFAULT_COLLECTIVE_TIMEOUT,
            ms => Duration::from_millis(ms as u64),
        };
        Ok(ModelParams {
            device,
            threads: self.n_threads as usize,
            quantization,
            max_device_memory_mib,
            process_group,
            collective_timeout,
            lm_head_in_host: self.lm_head_in_host_memory != 0,
            layers_in_host: self.layers_in_host_memory as usize,
        })
    }
}

impl ft_lora_params {
    pub(super) fn to_rust(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank as usize,
            alpha: self.alpha,
            use_rslora: self.use_rslora != 0,
            dropout: self.dropout,
            targets: self.target_modules,
            seed: self.seed,
        }
    }
}

impl ft_train_params {
    pub(super) fn to_rust(&self) -> Result<TrainConfig> {
        let schedule = match self.schedule {
            FT_SCHEDULE_CONSTANT => ScheduleKind::Constant,
            FT_SCHEDULE_LINEAR => ScheduleKind::Linear,
            FT_SCHEDULE_COSINE => ScheduleKind::Cosine,
            other => return Err(Error::InvalidArgument(format!("unknown schedule {other}"))),
        };
        let cfg = TrainConfig {
            learning_rate: self.learning_rate,
            weight_decay: self.weight_decay,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            max_grad_norm: self.max_grad_norm,
            schedule,
            warmup_steps: self.warmup_steps,
            total_steps: self.total_steps,
            checkpointing: self.gradient_checkpointing != 0,
            offload_activations: self.offload_activations != 0,
            kept_mlp_layers: self.kept_mlp_layers as usize,
            seed: self.seed,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl ft_batch {
    pub(super) fn to_rust(&self, index: usize) -> Result<Batch> {
        let (b, s) = (self.batch_size as usize, self.seq_len as usize);
        let n = b.checked_mul(s).filter(|&n| n > 0).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "batch {index}: batch_size {b} x seq_len {s} is empty"
            ))
        })?;
        let field =
            |p: *const i32, name: &str| slice_arg(p, n, &format!("batches[{index}].{name}"));
        let mut batch = Batch::new(
            b,
            s,
            field(self.input_ids, "input_ids")?.to_vec(),
            field(self.labels, "labels")?.to_vec(),
        )?;
        if !self.positions.is_null() {
            batch.positions = field(self.positions, "positions")?.to_vec();
        }
        if !self.segment_ids.is_null() {
            batch.segments = field(self.segment_ids, "segment_ids")?.to_vec();
        }
        Ok(batch)
    }
}

impl From<StepStats> for ft_step_stats {
    fn from(s: StepStats) -> Self {
        ft_step_stats {
            step: s.step,
            loss: s.loss,
            grad_norm: s.grad_norm,
            learning_rate: s.lr,
            tokens: s.tokens,
            labelled_tokens: s.labelled_tokens,
        }
    }
}

pub(super) fn dtype_arg(dtype: i32) -> Result<Dtype> {
    match dtype {
        FT_DTYPE_F32 => Ok(Dtype::F32),
        FT_DTYPE_F16 => Ok(Dtype::F16),
        FT_DTYPE_BF16 => Ok(Dtype::BF16),
        other => Err(Error::InvalidArgument(format!(
            "unknown dtype {other} (expected FT_DTYPE_F32, _F16 or _BF16)"
        ))),
    }
}

/// A GGUF export type argument (`FT_GGUF_*`).
pub(super) fn gguf_type_arg(ty: i32) -> Result<GgmlType> {
    match ty {
        FT_GGUF_F32 => Ok(GgmlType::F32),
        FT_GGUF_F16 => Ok(GgmlType::F16),
        FT_GGUF_Q8_0 => Ok(GgmlType::Q8_0),
        FT_GGUF_BF16 => Ok(GgmlType::BF16),
        other => Err(Error::InvalidArgument(format!(
            "unknown GGUF type {other} (expected FT_GGUF_F32, _F16, _BF16 or _Q8_0)"
        ))),
    }
}

/// The batches of a call, converted.
pub(super) fn batches_arg(batches: *const ft_batch, n: usize) -> Result<Vec<Batch>> {
    if n == 0 {
        return Err(Error::InvalidArgument("n_batches is 0".into()));
    }
    slice_arg(batches, n, "batches")?
        .iter()
        .enumerate()
        .map(|(i, b)| b.to_rust(i))
        .collect()
}
