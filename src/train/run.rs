//! A whole training run from a dataset file: encoding, eval split, epochs of shuffled (and
//! packed) batches, gradient accumulation, metrics, periodic evaluation, crash-safe checkpoints,
//! resumption, and the final adapter with its loss curve.

use super::checkpoint::{self, CheckpointState};
use super::metrics::{loss_curve_svg, read_curves, MetricsLog};
use super::trainer::{StepStats, TrainConfig};
use crate::api::{Model, Trainer};
use crate::data::dataset::{BadRecords, Dataset};
use crate::data::encode::{Encoded, LossOn};
use crate::data::loader::{DataLoader, LoaderConfig};
use crate::error::{Error, Result};
use crate::lora::LoraConfig;
use crate::train::batch::Batch;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything a run needs besides the model.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub dataset: PathBuf,
    /// Receives `adapter/`, `checkpoints/`, `metrics.jsonl` and `loss.svg`.
    pub output_dir: PathBuf,
    pub max_seq_len: usize,
    pub packing: bool,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub epochs: u64,
    /// Stop after this many steps (overrides `epochs`).
    pub max_steps: Option<u64>,
    pub eval_fraction: f32,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Checkpoint every this many steps (0: never during the run).
    pub save_every: u64,
    pub keep_checkpoints: usize,
    pub loss_on: LossOn,
    pub skip_bad_records: bool,
    /// Continue from the newest checkpoint in `output_dir` if there is one.
    pub resume: bool,
    /// Seed of the data order, the eval split and dropout.
    pub seed: u64,
    pub lora: LoraConfig,
    /// Optimizer settings; `total_steps` is set from the data.
    pub train: TrainConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            dataset: PathBuf::new(),
            output_dir: PathBuf::from("runs/latest"),
            max_seq_len: 512,
            packing: true,
            batch_size: 4,
            grad_accum: 1,
            epochs: 1,
            max_steps: None,
            eval_fraction: 0.0,
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 2,
            loss_on: LossOn::Completions,
            skip_bad_records: false,
            resume: false,
            seed: 0,
            lora: LoraConfig::default(),
            train: TrainConfig::default(),
        }
    }
}

/// Reported after every step.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub stats: StepStats,
    pub total_steps: u64,
    pub epoch: u64,
    pub tokens_per_second: f64,
    /// Set on steps where an evaluation ran.
    pub eval_loss: Option<f32>,
}

/// What a finished run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: u64,
    pub resumed_from: Option<u64>,
    pub final_loss: Option<f32>,
    pub eval_loss: Option<f32>,
    pub train_records: usize,
    pub eval_records: usize,
    pub skipped_records: usize,
    pub adapter_dir: PathBuf,
}

/// The data of a run, with its step plan.
struct Plan {
    loader: DataLoader,
    /// Micro-batches of each epoch, grouped `grad_accum` to a step; epochs beyond those computed
    /// repeat with new shuffles.
    total_steps: u64,
    skipped: usize,
}

fn encode(model: &Model, cfg: &RunConfig) -> Result<(Vec<Encoded>, usize)> {
    let codec = model.codec().ok_or_else(|| {
        Error::InvalidArgument(
            "the model has no tokenizer (tokenizer.json or GGUF vocabulary) to read a dataset"
                .into(),
        )
    })?;
    let bad = if cfg.skip_bad_records {
        BadRecords::Skip
    } else {
        BadRecords::Fail
    };
    let ds = Dataset::read(&cfg.dataset, bad)?;
    let encoded = ds
        .examples
        .iter()
        .zip(&ds.lines)
        .map(|(ex, line)| {
            codec
                .encode_example(ex, cfg.loss_on)
                .map_err(|e| Error::format(&cfg.dataset, format!("line {line}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((encoded, ds.skipped.len()))
}

fn steps_in_epoch(loader: &DataLoader, epoch: u64, accum: usize) -> u64 {
    loader.batches_in_epoch(epoch).div_ceil(accum) as u64
}

fn plan(model: &Model, cfg: &RunConfig) -> Result<Plan> {
    if cfg.grad_accum == 0 {
        return Err(Error::InvalidArgument(
            "grad_accum must be at least 1".into(),
        ));
    }
    let (encoded, skipped) = encode(model, cfg)?;
    let pad_id = model
        .codec()
        .and_then(|c| c.eos.as_ref())
        .map_or(0, |t| t.id as i32);
    let loader = DataLoader::new(
        encoded,
        LoaderConfig {
            max_len: cfg.max_seq_len,
            packing: cfg.packing,
            batch_size: cfg.batch_size,
            eval_fraction: cfg.eval_fraction,
            seed: cfg.seed,
            pad_id,
        },
    )?;
    let total_steps = match cfg.max_steps {
        Some(n) => n,
        None => (0..cfg.epochs)
            .map(|e| steps_in_epoch(&loader, e, cfg.grad_accum))
            .sum(),
    };
    if total_steps == 0 {
        return Err(Error::InvalidArgument(
            "the run has no step (epochs or max_steps is 0)".into(),
        ));
    }
    Ok(Plan {
        loader,
        total_steps,
        skipped,
    })
}

/// Settings that must match between a run and the checkpoint it resumes (a data-parallel run
/// resumes with the same number of ranks).
fn fingerprint(cfg: &RunConfig, total_steps: u64, world_size: usize) -> String {
    let fp = format!(
        "{:?}|{}|{}|{}|{}|{}|{:?}|{:?}|{:?}|{}",
        cfg.dataset,
        cfg.max_seq_len,
        cfg.packing,
        cfg.batch_size,
        cfg.grad_accum,
        cfg.eval_fraction,
        cfg.loss_on,
        cfg.lora,
        cfg.train,
        total_steps
    );
    match world_size {
        1 => fp,
        n => format!("{fp}|ranks {n}"),
    }
}

fn eval_loss(trainer: &Trainer, batches: &[Batch]) -> Result<Option<f32>> {
    let (mut sum, mut count) = (0.0f64, 0usize);
    for b in batches {
        let n = b.labelled();
        if n > 0 {
            sum += trainer.eval_loss(b)? as f64 * n as f64;
            count += n;
        }
    }
    Ok((count > 0).then(|| (sum / count as f64) as f32))
}

/// Runs training; `on_progress` is called after every step and returns `false` to stop (a
/// checkpoint is written first, and the call returns [`Error::Cancelled`]).
///
/// In a data-parallel group every rank runs this with the same settings and output directory
/// (shared between hosts): each builds the same batches, the ranks of one process split them
/// by rows inside the step, a group spanning processes gives each process its share first.
/// Only rank 0 writes metrics, checkpoints, the adapter and the loss curve, and the ranks wait
/// for each other after each checkpoint and at the end; every rank resumes from the newest
/// checkpoint, which must have been made with as many ranks (the ranks check that they found
/// the same one). A stop asked for
/// by `on_progress` must be asked on every rank at the same step.
pub fn run(
    model: &Model,
    cfg: &RunConfig,
    on_progress: &mut dyn FnMut(&Progress) -> bool,
) -> Result<RunSummary> {
    let plan = plan(model, cfg)?;
    let train_cfg = TrainConfig {
        total_steps: plan.total_steps,
        seed: cfg.seed,
        ..cfg.train.clone()
    };
    let fp = fingerprint(cfg, plan.total_steps, model.world_size());
    let writes = model.rank() == 0;
    let root = cfg.output_dir.join("checkpoints");
    std::fs::create_dir_all(&cfg.output_dir).map_err(|e| Error::io(&cfg.output_dir, e))?;

    let resumed = match checkpoint::latest(&root)? {
        Some(dir) if cfg.resume => Some(checkpoint::load(&dir, model, train_cfg.clone())?),
        _ => None,
    };
    if let Some((_, s)) = &resumed {
        if s.fingerprint != fp {
            return Err(Error::InvalidArgument(format!(
                "checkpoint step {} in {} was made with other settings; use another output directory or the same settings",
                s.step,
                root.display()
            )));
        }
    }
    let (mut trainer, mut state) = match resumed {
        Some(resumed) => resumed,
        None => (
            Trainer::new(
                model,
                LoraConfig {
                    seed: cfg.seed,
                    ..cfg.lora.clone()
                },
                train_cfg,
            )?,
            CheckpointState {
                step: 0,
                epoch: 0,
                step_in_epoch: 0,
                seed: cfg.seed,
                fingerprint: fp,
            },
        ),
    };
    // Every rank of a group spanning processes must resume from the same checkpoint.
    let mut steps = [state.step as f64];
    trainer.sum_over_processes(&mut steps)?;
    if let Some((_, world)) = model.process_share() {
        if steps[0] != (state.step * world as u64) as f64 {
            return Err(Error::InvalidArgument(format!(
                "the ranks found different checkpoints in {} (this rank: step {}); give every \
                 rank the same output directory",
                root.display(),
                state.step
            )));
        }
    }
    let resumed_from = (state.step > 0).then_some(state.step);
    let mut log = writes
        .then(|| MetricsLog::open(&cfg.output_dir.join("metrics.jsonl"), resumed_from))
        .transpose()?;
    let eval_batches = plan.loader.eval_batches()?;
    let mut rows = plan.loader.epoch_rows(state.epoch).0;
    let (mut last_loss, mut last_eval) = (None, None);

    while state.step < plan.total_steps {
        let accum = cfg.grad_accum;
        let first = state.step_in_epoch as usize * accum;
        let n_batches = rows.len().div_ceil(cfg.batch_size);
        let mut micro = (first..(first + accum).min(n_batches))
            .map(|i| plan.loader.batch(&rows, i))
            .collect::<Result<Vec<_>>>()?;
        if let Some((rank, world)) = model.process_share() {
            micro = micro.iter().filter_map(|b| b.share(rank, world)).collect();
        }
        let t0 = Instant::now();
        let stats = trainer.step(&micro)?;
        let tokens_per_second = stats.tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        state.step = stats.step;
        state.step_in_epoch += 1;
        if state.step_in_epoch as usize * accum >= n_batches {
            state.epoch += 1;
            state.step_in_epoch = 0;
            rows = plan.loader.epoch_rows(state.epoch).0;
        }
        last_loss = Some(stats.loss);
        if let Some(log) = &mut log {
            log.write(&json!({
                "step": stats.step, "epoch": state.epoch, "loss": stats.loss, "lr": stats.lr,
                "grad_norm": stats.grad_norm, "tokens": stats.tokens,
                "tokens_per_second": tokens_per_second,
            }))?;
        }
        let done = state.step == plan.total_steps;
        let eval_now = !eval_batches.is_empty()
            && (done || (cfg.eval_every > 0 && state.step % cfg.eval_every == 0));
        let eval = if eval_now {
            eval_loss(&trainer, &eval_batches)?
        } else {
            None
        };
        if let (Some(e), Some(log)) = (eval, &mut log) {
            log.write(&json!({"step": stats.step, "eval_loss": e}))?;
        }
        last_eval = eval.or(last_eval);
        let progress = Progress {
            stats,
            total_steps: plan.total_steps,
            epoch: state.epoch,
            tokens_per_second,
            eval_loss: eval,
        };
        let go_on = on_progress(&progress);
        let save_now = !go_on || (cfg.save_every > 0 && state.step % cfg.save_every == 0 && !done);
        if writes && save_now {
            checkpoint::save(&root, &trainer, &state, cfg.keep_checkpoints)?;
        }
        if save_now {
            // No rank goes on (or stops) before rank 0's checkpoint is whole.
            trainer.sum_over_processes(&mut [0.0])?;
        }
        if !go_on {
            return Err(Error::Cancelled);
        }
    }
    let adapter_dir = cfg.output_dir.join("adapter");
    if writes {
        trainer.save_adapter(&adapter_dir)?;
        write_loss_curve(&cfg.output_dir)?;
    }
    trainer.sum_over_processes(&mut [0.0])?;
    Ok(RunSummary {
        steps: state.step,
        resumed_from,
        final_loss: last_loss,
        eval_loss: last_eval,
        train_records: plan.loader.train_records(),
        eval_records: plan.loader.eval_records(),
        skipped_records: plan.skipped,
        adapter_dir,
    })
}

/// Draws `loss.svg` beside the adapter from `metrics.jsonl`.
pub fn write_loss_curve(output_dir: &Path) -> Result<()> {
    let (train, eval) = read_curves(&output_dir.join("metrics.jsonl"))?;
    let svg = loss_curve_svg(&train, &eval);
    crate::io::atomic::write_atomic(&output_dir.join("loss.svg"), |f| {
        std::io::Write::write_all(f, svg.as_bytes())
    })
}
