//! `ft_trainer`: LoRA adapters and their optimizer over a model.

use super::params::{batches_arg, dtype_arg, gguf_type_arg};
use super::{
    ft_batch, ft_lora_params, ft_model, ft_status, ft_step_stats, ft_train_params, guard,
    guard_void, mut_arg, path_arg, ref_arg,
};
use crate::api::Trainer;
use crate::error::{Error, Result};
use crate::train::trainer::TrainConfig;
use std::ffi::{c_char, c_void};

/// LoRA adapters with their optimizer state (opaque). Not thread-safe: use one trainer from one
/// thread at a time. It holds its own reference to the model's weights, so the trainer and the
/// model may be freed in either order.
pub struct ft_trainer {
    pub(super) inner: Trainer,
}

/// Called after each step of `ft_trainer_train` with that step's statistics. Return 0 to go on,
/// anything else to stop: the call then returns `FT_ERR_CANCELLED` with the steps taken so far
/// applied.
pub type ft_progress_fn =
    Option<extern "C" fn(stats: *const ft_step_stats, user_data: *mut c_void) -> i32>;

fn train_params(p: *const ft_train_params) -> Result<TrainConfig> {
    if p.is_null() {
        Ok(TrainConfig::default())
    } else {
        ref_arg(p, "train_params")?.to_rust()
    }
}

fn publish(t: Trainer, out: *mut *mut ft_trainer) -> Result<()> {
    *mut_arg(out, "out")? = Box::into_raw(Box::new(ft_trainer { inner: t }));
    Ok(())
}

/// Attaches fresh LoRA adapters to `model` (A Kaiming-uniform from `lora->seed`, B zero, as PEFT
/// does). `lora` and `train` may be NULL for defaults. The caller frees `*out` with
/// `ft_trainer_free`.
#[no_mangle]
pub extern "C" fn ft_trainer_new(
    model: *const ft_model,
    lora: *const ft_lora_params,
    train: *const ft_train_params,
    out: *mut *mut ft_trainer,
) -> ft_status {
    guard(|| {
        mut_arg(out, "out")?;
        let m = &ref_arg(model, "model")?.inner;
        let lora = if lora.is_null() {
            Default::default()
        } else {
            ref_arg(lora, "lora")?.to_rust()
        };
        publish(Trainer::new(m, lora, train_params(train)?)?, out)
    })
}

/// Loads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) or a GGUF
/// LoRA adapter file onto `model`, to continue training or to generate with it. Fails with
/// `FT_ERR_ADAPTER_MISMATCH` when its shapes do not fit the model.
#[no_mangle]
pub extern "C" fn ft_trainer_load_adapter(
    model: *const ft_model,
    dir: *const c_char,
    train: *const ft_train_params,
    out: *mut *mut ft_trainer,
) -> ft_status {
    guard(|| {
        mut_arg(out, "out")?;
        let m = &ref_arg(model, "model")?.inner;
        publish(
            Trainer::from_adapter(m, path_arg(dir, "dir")?, train_params(train)?)?,
            out,
        )
    })
}

/// One optimizer step over `n_batches` micro-batches (gradient accumulation: the loss is the mean
/// over all their labelled tokens). `out` may be NULL. A non-finite loss or gradient returns
/// `FT_ERR_NON_FINITE` and leaves the adapters unchanged.
#[no_mangle]
pub extern "C" fn ft_trainer_step(
    trainer: *mut ft_trainer,
    batches: *const ft_batch,
    n_batches: usize,
    out: *mut ft_step_stats,
) -> ft_status {
    guard(|| {
        let t = mut_arg(trainer, "trainer")?;
        let batches = batches_arg(batches, n_batches)?;
        let stats = t.inner.step(&batches)?;
        // SAFETY: NULL is allowed; otherwise it points to writable stats.
        if let Some(o) = unsafe { out.as_mut() } {
            *o = stats.into();
        }
        Ok(())
    })
}

/// Takes `steps` optimizer steps, step i on `batches[i % n_batches]`, calling `progress` (may be
/// NULL) after each. Returns `FT_ERR_CANCELLED` if `progress` asks to stop.
#[no_mangle]
pub extern "C" fn ft_trainer_train(
    trainer: *mut ft_trainer,
    batches: *const ft_batch,
    n_batches: usize,
    steps: u64,
    progress: ft_progress_fn,
    user_data: *mut c_void,
) -> ft_status {
    guard(|| {
        let t = mut_arg(trainer, "trainer")?;
        let batches = batches_arg(batches, n_batches)?;
        for i in 0..steps {
            let stats: ft_step_stats = t
                .inner
                .step(std::slice::from_ref(
                    &batches[(i % n_batches as u64) as usize],
                ))?
                .into();
            if let Some(cb) = progress {
                if cb(&stats, user_data) != 0 {
                    return Err(Error::Cancelled);
                }
            }
        }
        Ok(())
    })
}

/// Mean loss on one batch with the current adapters, no dropout and no update.
#[no_mangle]
pub extern "C" fn ft_trainer_eval_loss(
    trainer: *const ft_trainer,
    batch: *const ft_batch,
    out: *mut f32,
) -> ft_status {
    guard(|| {
        let t = ref_arg(trainer, "trainer")?;
        let b = ref_arg(batch, "batch")?.to_rust(0)?;
        *mut_arg(out, "out")? = t.inner.eval_loss(&b)?;
        Ok(())
    })
}

/// Writes the adapters in PEFT's format into `dir` (created if needed): adapter_config.json and
/// adapter_model.safetensors, each replaced atomically.
#[no_mangle]
pub extern "C" fn ft_trainer_save_adapter(
    trainer: *const ft_trainer,
    dir: *const c_char,
) -> ft_status {
    guard(|| {
        ref_arg(trainer, "trainer")?
            .inner
            .save_adapter(path_arg(dir, "dir")?)
    })
}

/// Writes the base model with the adapters merged (W + scale·B·A) as a Hugging Face directory
/// with weights of `dtype` (`FT_DTYPE_*`).
#[no_mangle]
pub extern "C" fn ft_trainer_export_merged(
    trainer: *const ft_trainer,
    dir: *const c_char,
    dtype: i32,
) -> ft_status {
    guard(|| {
        let t = ref_arg(trainer, "trainer")?;
        t.inner
            .export_merged(path_arg(dir, "dir")?, dtype_arg(dtype)?)
    })
}

/// Writes the adapters as one GGUF LoRA adapter file at `path` (general.type "adapter"), which
/// llama.cpp applies to the base model with `--lora` or `llama_adapter_lora_init`.
#[no_mangle]
pub extern "C" fn ft_trainer_save_adapter_gguf(
    trainer: *const ft_trainer,
    path: *const c_char,
) -> ft_status {
    guard(|| {
        ref_arg(trainer, "trainer")?
            .inner
            .save_adapter_gguf(path_arg(path, "path")?)
    })
}

/// Writes the base model with the adapters merged (W + scale·B·A) as one GGUF file at `path`
/// with matrices of type `ggml_type` (`FT_GGUF_*`).
#[no_mangle]
pub extern "C" fn ft_trainer_export_gguf(
    trainer: *const ft_trainer,
    path: *const c_char,
    ggml_type: i32,
) -> ft_status {
    guard(|| {
        let t = ref_arg(trainer, "trainer")?;
        t.inner
            .export_gguf(path_arg(path, "path")?, gguf_type_arg(ggml_type)?)
    })
}

/// Releases a trainer. NULL is ignored.
#[no_mangle]
pub extern "C" fn ft_trainer_free(trainer: *mut ft_trainer) {
    if !trainer.is_null() {
        // SAFETY: the pointer came from Box::into_raw in ft_trainer_new/ft_trainer_load_adapter.
        guard_void(|| drop(unsafe { Box::from_raw(trainer) }));
    }
}
