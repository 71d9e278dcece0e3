//! `ft_model`: a frozen base model.

use super::params::{dtype_arg, gguf_type_arg};
use super::{
    ft_model_params, ft_status, guard, guard_void, mut_arg, path_arg, ref_arg, slice_arg, str_arg,
    FT_NCCL_UNIQUE_ID_BYTES,
};
use crate::api::{nccl_unique_id, Model, ModelParams};
use crate::backend::cuda::nccl::UNIQUE_ID_BYTES;
use crate::error::{Error, Result};
use crate::model::presets::preset;
use std::ffi::c_char;

/// A frozen base model (opaque). Created by `ft_model_load` or `ft_model_random`, released by
/// `ft_model_free`. Read-only once created: it may be used from several threads at once and
/// shared by several trainers (each keeps the weights alive, so frees may come in any order).
pub struct ft_model {
    pub(super) inner: Model,
}

/// Sizes of a loaded model.
#[repr(C)]
#[derive(Default)]
pub struct ft_model_info {
    pub vocab_size: u64,
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_layers: u64,
    pub num_heads: u64,
    pub num_kv_heads: u64,
    pub head_dim: u64,
}

/// Device memory held by a model's backend: its weights plus the tensors of every trainer and
/// call running on it.
#[repr(C)]
#[derive(Default)]
pub struct ft_device_memory {
    /// 1 when the model is on a GPU; 0 on the CPU (the byte counts are then 0).
    pub on_device: i32,
    pub live_bytes: u64,
    /// The most bytes held at once since the model was created or the peak was last reset.
    pub peak_bytes: u64,
}

fn model_params(params: *const ft_model_params) -> Result<ModelParams> {
    if params.is_null() {
        Ok(ModelParams::default())
    } else {
        ref_arg(params, "params")?.to_rust()
    }
}

fn publish(model: Model, out: *mut *mut ft_model) -> Result<()> {
    *mut_arg(out, "out")? = Box::into_raw(Box::new(ft_model { inner: model }));
    Ok(())
}

/// Loads a Hugging Face model directory (config.json and model.safetensors, or a sharded
/// model.safetensors.index.json) or a GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
/// Q4_K, Q5_K or Q6_K tensors, dequantized; its embedded tokenizer is kept) given as a UTF-8 path. `params` may be NULL for defaults. On
/// success `*out` receives a model the caller frees with `ft_model_free`; on failure `*out` is
/// left untouched.
#[no_mangle]
pub extern "C" fn ft_model_load(
    path: *const c_char,
    params: *const ft_model_params,
    out: *mut *mut ft_model,
) -> ft_status {
    guard(|| {
        mut_arg(out, "out")?;
        let model = Model::load(path_arg(path, "path")?, &model_params(params)?)?;
        publish(model, out)
    })
}

/// Creates a model of a named shape ("tiny", "smollm2-135m", "llama3-8b", ...) with random
/// weights drawn from `seed`: for tests, benchmarks and demos.
#[no_mangle]
pub extern "C" fn ft_model_random(
    shape: *const c_char,
    seed: u64,
    params: *const ft_model_params,
    out: *mut *mut ft_model,
) -> ft_status {
    guard(|| {
        mut_arg(out, "out")?;
        let cfg = preset(str_arg(shape, "shape")?)?;
        publish(Model::random(cfg, seed, &model_params(params)?)?, out)
    })
}

/// Fills `*out` with the model's sizes.
#[no_mangle]
pub extern "C" fn ft_model_get_info(model: *const ft_model, out: *mut ft_model_info) -> ft_status {
    guard(|| {
        let c = ref_arg(model, "model")?.inner.config();
        *mut_arg(out, "out")? = ft_model_info {
            vocab_size: c.vocab_size as u64,
            hidden_size: c.hidden_size as u64,
            intermediate_size: c.intermediate_size as u64,
            num_layers: c.num_layers as u64,
            num_heads: c.num_heads as u64,
            num_kv_heads: c.num_kv_heads as u64,
            head_dim: c.head_dim as u64,
        };
        Ok(())
    })
}

/// Fills `*out` with the device memory the model's backend holds now and its peak.
#[no_mangle]
pub extern "C" fn ft_model_device_memory(
    model: *const ft_model,
    out: *mut ft_device_memory,
) -> ft_status {
    guard(|| {
        let m = ref_arg(model, "model")?;
        *mut_arg(out, "out")? = match m.inner.device_memory() {
            Some(d) => ft_device_memory {
                on_device: 1,
                live_bytes: d.live_bytes as u64,
                peak_bytes: d.peak_bytes as u64,
            },
            None => ft_device_memory::default(),
        };
        Ok(())
    })
}

/// Starts a new peak measurement: the peak of `ft_model_device_memory` becomes the bytes held now.
#[no_mangle]
pub extern "C" fn ft_model_reset_peak_memory(model: *const ft_model) -> ft_status {
    guard(|| {
        ref_arg(model, "model")?.inner.reset_peak_memory();
        Ok(())
    })
}

/// Writes the model as a Hugging Face directory (config.json + model.safetensors) with weights
/// of `dtype` (`FT_DTYPE_*`).
#[no_mangle]
pub extern "C" fn ft_model_save(
    model: *const ft_model,
    dir: *const c_char,
    dtype: i32,
) -> ft_status {
    guard(|| {
        let m = ref_arg(model, "model")?;
        m.inner
            .save_pretrained(path_arg(dir, "dir")?, dtype_arg(dtype)?, None)
    })
}

/// Writes the model as one GGUF file at `path` with matrices of type `ggml_type` (`FT_GGUF_*`), in
/// the layout llama.cpp loads. The tokenizer is included when the model was loaded from GGUF.
#[no_mangle]
pub extern "C" fn ft_model_save_gguf(
    model: *const ft_model,
    path: *const c_char,
    ggml_type: i32,
) -> ft_status {
    guard(|| {
        let m = ref_arg(model, "model")?;
        m.inner
            .save_gguf(path_arg(path, "path")?, gguf_type_arg(ggml_type)?, None)
    })
}

/// Greedy decoding: appends up to `max_new_tokens` arg-max tokens to the `n_prompt` prompt
/// tokens, stopping after `stop_token` if it is not negative. With a non-NULL `trainer` its
/// adapters are applied. Writes the new tokens to `out` (room for `max_new_tokens` values) and
/// their number to `*n_out`.
#[no_mangle]
pub extern "C" fn ft_model_generate(
    model: *const ft_model,
    trainer: *const super::ft_trainer,
    prompt: *const i32,
    n_prompt: usize,
    max_new_tokens: usize,
    stop_token: i32,
    out: *mut i32,
    n_out: *mut usize,
) -> ft_status {
    guard(|| {
        let m = &ref_arg(model, "model")?.inner;
        // SAFETY: NULL is allowed and means "no adapter"; otherwise it is a live trainer.
        // A trainer of another model is refused by the decode session.
        let adapter = unsafe { trainer.as_ref() }.map(|t| &t.inner);
        let prompt = slice_arg(prompt, n_prompt, "prompt")?;
        if prompt.is_empty() {
            return Err(Error::InvalidArgument("prompt is empty".into()));
        }
        let n_out = mut_arg(n_out, "n_out")?;
        if out.is_null() && max_new_tokens > 0 {
            return Err(Error::InvalidArgument("out is NULL".into()));
        }
        let stop = (stop_token >= 0).then_some(stop_token);
        let tokens = crate::generate::greedy(m, adapter, prompt, max_new_tokens, stop)?;
        // SAFETY: the caller provides room for max_new_tokens values, and greedy returns at most that.
        unsafe { std::ptr::copy_nonoverlapping(tokens.as_ptr(), out, tokens.len()) };
        *n_out = tokens.len();
        Ok(())
    })
}

/// Releases a model. NULL is ignored. Trainers created on it stay usable.
#[no_mangle]
pub extern "C" fn ft_model_free(model: *mut ft_model) {
    if !model.is_null() {
        // SAFETY: the pointer came from Box::into_raw in ft_model_load/ft_model_random.
        guard_void(|| drop(unsafe { Box::from_raw(model) }));
    }
}

/// Makes a fresh NCCL unique id for a data-parallel group spanning processes
/// (`ft_model_params.world_size` > 1) and writes its `FT_NCCL_UNIQUE_ID_BYTES` bytes to `out`
/// (`out_len` must be at least that). Call it on one rank and hand the bytes to the others
/// however the application likes (a file, an environment variable, its own messages); the
/// process that made it hosts the group's rendezvous and must stay alive until every rank has
/// loaded its model. Needs NCCL (libnccl.so.2): `FT_ERR_DEVICE` names it when absent.
#[no_mangle]
pub extern "C" fn ft_nccl_unique_id(out: *mut u8, out_len: usize) -> ft_status {
    guard(|| {
        if out.is_null() {
            return Err(Error::InvalidArgument("out is NULL".into()));
        }
        if out_len < FT_NCCL_UNIQUE_ID_BYTES {
            return Err(Error::InvalidArgument(format!(
                "out_len is {out_len}; an NCCL unique id needs {FT_NCCL_UNIQUE_ID_BYTES} bytes"
            )));
        }
        let id = nccl_unique_id()?;
        // SAFETY: checked non-NULL; the caller promises `out_len` ≥ the id's length writable bytes.
        unsafe { std::ptr::copy_nonoverlapping(id.as_ptr(), out, id.len()) };
        Ok(())
    })
}

const _: () = assert!(FT_NCCL_UNIQUE_ID_BYTES == UNIQUE_ID_BYTES);
