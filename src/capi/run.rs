//! `ft_run`: a whole training run from a dataset file in one call.

use super::params::{ft_lora_params, ft_train_params};
use super::{ft_model, ft_status, ft_step_stats, guard, path_arg, ref_arg};
use crate::data::encode::LossOn;
use crate::error::Result;
use crate::train::run::{run, Progress, RunConfig};
use std::ffi::{c_char, c_void};
use std::path::PathBuf;

/// Settings of a run. Get defaults from `ft_run_default_params()`, then set at least `dataset`
/// and `output_dir`. Strings are read during the call only.
#[repr(C)]
pub struct ft_run_params {
    /// JSONL or JSON array of text, alpaca, chat (`messages`) or ShareGPT records.
    pub dataset: *const c_char,
    /// Receives adapter/, checkpoints/, metrics.jsonl and loss.svg.
    pub output_dir: *const c_char,
    pub max_seq_len: u32,
    /// Non-zero: several records per row (attention stays inside each record).
    pub packing: i32,
    /// Rows per micro-batch.
    pub batch_size: u32,
    /// Micro-batches per optimizer step.
    pub grad_accum: u32,
    pub epochs: u32,
    /// Stop after this many steps; 0: run `epochs` epochs.
    pub max_steps: u64,
    /// Share of records held out for evaluation, in [0, 1).
    pub eval_fraction: f32,
    /// Evaluate every this many steps; 0: only at the end.
    pub eval_every: u64,
    /// Checkpoint every this many steps; 0: never during the run.
    pub save_every: u64,
    pub keep_checkpoints: u32,
    /// Non-zero: loss on every token, not only assistant turns and completions.
    pub loss_on_all_tokens: i32,
    /// Non-zero: leave out unreadable records (counted) instead of failing.
    pub skip_bad_records: i32,
    /// Non-zero: continue from the newest checkpoint in `output_dir`.
    pub resume: i32,
    /// Seed of data order, eval split, LoRA initialisation and dropout.
    pub seed: u64,
    pub lora: ft_lora_params,
    /// `total_steps` is ignored: the run computes it from the data.
    pub train: ft_train_params,
}

/// Progress of a run, after each step.
#[repr(C)]
pub struct ft_run_progress {
    pub stats: ft_step_stats,
    pub total_steps: u64,
    pub epoch: u64,
    pub tokens_per_second: f32,
    /// Evaluation loss when this step evaluated, NaN otherwise.
    pub eval_loss: f32,
}

/// Called after each step of `ft_run`; return 0 to go on, non-zero to stop (a checkpoint is
/// written first and `ft_run` returns `FT_ERR_CANCELLED`; resume later with `resume = 1`).
pub type ft_run_progress_fn =
    Option<extern "C" fn(progress: *const ft_run_progress, user_data: *mut c_void) -> i32>;

/// Defaults: max_seq_len 512, packing, batch 4, no accumulation, 1 epoch, no eval split, no
/// intermediate checkpoints (2 kept when enabled), loss on completions only, seed 0, and the
/// LoRA and optimizer defaults.
#[no_mangle]
pub extern "C" fn ft_run_default_params() -> ft_run_params {
    let d = RunConfig::default();
    ft_run_params {
        dataset: std::ptr::null(),
        output_dir: std::ptr::null(),
        max_seq_len: d.max_seq_len as u32,
        packing: d.packing as i32,
        batch_size: d.batch_size as u32,
        grad_accum: d.grad_accum as u32,
        epochs: d.epochs as u32,
        max_steps: 0,
        eval_fraction: d.eval_fraction,
        eval_every: d.eval_every,
        save_every: d.save_every,
        keep_checkpoints: d.keep_checkpoints as u32,
        loss_on_all_tokens: 0,
        skip_bad_records: 0,
        resume: 0,
        seed: d.seed,
        lora: super::ft_lora_default_params(),
        train: super::ft_train_default_params(),
    }
}

impl ft_run_params {
    fn to_rust(&self) -> Result<RunConfig> {
        Ok(RunConfig {
            dataset: PathBuf::from(path_arg(self.dataset, "params->dataset")?),
            output_dir: PathBuf::from(path_arg(self.output_dir, "params->output_dir")?),
            max_seq_len: self.max_seq_len as usize,
            packing: self.packing != 0,
            batch_size: self.batch_size as usize,
            grad_accum: self.grad_accum as usize,
            epochs: self.epochs as u64,
            max_steps: (self.max_steps > 0).then_some(self.max_steps),
            eval_fraction: self.eval_fraction,
            eval_every: self.eval_every,
            save_every: self.save_every,
            keep_checkpoints: self.keep_checkpoints as usize,
            loss_on: if self.loss_on_all_tokens != 0 {
                LossOn::All
            } else {
                LossOn::Completions
            },
            skip_bad_records: self.skip_bad_records != 0,
            resume: self.resume != 0,
            seed: self.seed,
            lora: self.lora.to_rust(),
            train: self.train.to_rust()?,
        })
    }
}

/// Trains LoRA adapters on `params->dataset` with the model's tokenizer and chat template, and
/// writes them to `params->output_dir`/adapter. `progress` may be NULL.
#[no_mangle]
pub extern "C" fn ft_run(
    model: *const ft_model,
    params: *const ft_run_params,
    progress: ft_run_progress_fn,
    user_data: *mut c_void,
) -> ft_status {
    guard(|| {
        let m = &ref_arg(model, "model")?.inner;
        let cfg = ref_arg(params, "params")?.to_rust()?;
        let mut report = |p: &Progress| match progress {
            None => true,
            Some(cb) => {
                let c = ft_run_progress {
                    stats: p.stats.into(),
                    total_steps: p.total_steps,
                    epoch: p.epoch,
                    tokens_per_second: p.tokens_per_second as f32,
                    eval_loss: p.eval_loss.unwrap_or(f32::NAN),
                };
                cb(&c, user_data) == 0
            }
        };
        run(m, &cfg, &mut report).map(|_| ())
    })
}
