//! `finetune train`: a run from a TOML/JSON config file and flags, with a progress bar.

use clap::Args;
use finetune::api::{Device, Model, ModelParams};
use finetune::data::encode::LossOn;
use finetune::lora::{LoraConfig, TargetModule};
use finetune::quant::Quantization;
use finetune::train::run::{run, RunConfig};
use finetune::train::schedule::ScheduleKind;
use finetune::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Settings of a run; every field may come from the config file, and flags override it.
#[derive(Args, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainArgs {
    /// TOML or JSON file with any of these settings (flags win).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Model directory or GGUF file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Dataset (JSONL or JSON array: text, alpaca, messages, or ShareGPT records).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output directory (adapter/, checkpoints/, metrics.jsonl, loss.svg).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub epochs: Option<u64>,
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long)]
    pub learning_rate: Option<f32>,
    /// constant, linear or cosine.
    #[arg(long)]
    pub schedule: Option<String>,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    #[arg(long)]
    pub weight_decay: Option<f32>,
    #[arg(long)]
    pub max_grad_norm: Option<f32>,
    #[arg(long)]
    pub rank: Option<usize>,
    #[arg(long)]
    pub alpha: Option<f32>,
    #[arg(long)]
    pub dropout: Option<f32>,
    #[arg(long)]
    pub rslora: Option<bool>,
    /// Comma-separated subset of q,k,v,o,gate,up,down.
    #[arg(long)]
    pub targets: Option<String>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Pack several records per row (default true).
    #[arg(long)]
    pub packing: Option<bool>,
    /// Train on every token, not only the assistant's.
    #[arg(long)]
    pub loss_on_all: Option<bool>,
    #[arg(long)]
    pub eval_fraction: Option<f32>,
    #[arg(long)]
    pub eval_every: Option<u64>,
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Leave out (and count) records that cannot be read instead of stopping.
    #[arg(long)]
    pub skip_bad_records: Option<bool>,
    /// Continue from the newest checkpoint in the output directory.
    #[arg(long)]
    pub resume: Option<bool>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub checkpointing: Option<bool>,
    /// Keep the saved layer inputs in pinned host memory (GPU only).
    #[arg(long)]
    pub offload_activations: Option<bool>,
    /// With checkpointing: the last N layers keep their MLP's gate and up products instead of
    /// recomputing them (faster; 2 × tokens × intermediate values a layer of device memory).
    #[arg(long)]
    pub kept_mlp_layers: Option<usize>,
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub device: Option<String>,
    /// Storage of the frozen projection matrices: none, or nf4 (QLoRA).
    #[arg(long)]
    pub quantization: Option<String>,
    /// Cap on the device memory held, in MiB (GPU only).
    #[arg(long)]
    pub max_memory_mib: Option<usize>,
    /// Keep the LM head in pinned host memory, copied to the device chunk by chunk for each
    /// step's loss (GPU only).
    #[arg(long)]
    pub lm_head_in_host: Option<bool>,
    /// Decoder layers whose projection matrices (bf16, or NF4 codes) stay in pinned host
    /// memory, each copied to the device ahead of the layer (GPU only).
    #[arg(long)]
    pub layers_in_host: Option<usize>,
}

macro_rules! merge {
    ($dst:ident, $src:ident, $($f:ident),*) => { $( if $dst.$f.is_none() { $dst.$f = $src.$f; } )* };
}

impl TrainArgs {
    /// Fills the fields not given as flags from the config file.
    fn with_file(mut self) -> Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let file: TrainArgs = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text)
                .map_err(|e| Error::format(&path, format!("line {}: {e}", e.line())))?
        } else {
            toml::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?
        };
        merge!(
            self,
            file,
            model,
            data,
            out,
            epochs,
            max_steps,
            learning_rate,
            schedule,
            warmup_steps,
            weight_decay,
            max_grad_norm,
            rank,
            alpha,
            dropout,
            rslora,
            targets,
            batch_size,
            grad_accum,
            max_seq_len,
            packing,
            loss_on_all,
            eval_fraction,
            eval_every,
            save_every,
            skip_bad_records,
            resume,
            seed,
            checkpointing,
            offload_activations,
            kept_mlp_layers,
            threads,
            device,
            quantization,
            max_memory_mib,
            lm_head_in_host,
            layers_in_host
        );
        Ok(self)
    }

    fn run_config(&self, data: &Path) -> Result<RunConfig> {
        let d = RunConfig::default();
        let mut lora = LoraConfig::default();
        lora.rank = self.rank.unwrap_or(lora.rank);
        lora.alpha = self.alpha.unwrap_or(lora.rank as f32);
        lora.dropout = self.dropout.unwrap_or(lora.dropout);
        lora.use_rslora = self.rslora.unwrap_or(false);
        if let Some(t) = &self.targets {
            lora.targets = t
                .split(',')
                .map(TargetModule::parse)
                .collect::<Result<Vec<_>>>()?
                .iter()
                .map(|m| m.bit())
                .sum();
        }
        let mut train = d.train.clone();
        train.learning_rate = self.learning_rate.unwrap_or(train.learning_rate);
        train.warmup_steps = self.warmup_steps.unwrap_or(train.warmup_steps);
        train.weight_decay = self.weight_decay.unwrap_or(train.weight_decay);
        train.max_grad_norm = self.max_grad_norm.unwrap_or(train.max_grad_norm);
        train.checkpointing = self.checkpointing.unwrap_or(train.checkpointing);
        train.offload_activations = self
            .offload_activations
            .unwrap_or(train.offload_activations);
        train.kept_mlp_layers = self.kept_mlp_layers.unwrap_or(train.kept_mlp_layers);
        if let Some(s) = &self.schedule {
            train.schedule = ScheduleKind::parse(s)?;
        }
        Ok(RunConfig {
            dataset: data.to_path_buf(),
            output_dir: self.out.clone().unwrap_or(d.output_dir),
            max_seq_len: self.max_seq_len.unwrap_or(d.max_seq_len),
            packing: self.packing.unwrap_or(d.packing),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            grad_accum: self.grad_accum.unwrap_or(d.grad_accum),
            epochs: self.epochs.unwrap_or(d.epochs),
            max_steps: self.max_steps,
            eval_fraction: self.eval_fraction.unwrap_or(d.eval_fraction),
            eval_every: self.eval_every.unwrap_or(d.eval_every),
            save_every: self.save_every.unwrap_or(d.save_every),
            keep_checkpoints: d.keep_checkpoints,
            loss_on: if self.loss_on_all.unwrap_or(false) {
                LossOn::All
            } else {
                LossOn::Completions
            },
            skip_bad_records: self.skip_bad_records.unwrap_or(false),
            resume: self.resume.unwrap_or(false),
            seed: self.seed.unwrap_or(d.seed),
            lora,
            train,
        })
    }
}

pub fn execute(args: TrainArgs) -> Result<()> {
    let args = args.with_file()?;
    let missing = |what: &str| {
        Error::InvalidArgument(format!("--{what} is required (as a flag or in --config)"))
    };
    let model_path = args.model.clone().ok_or_else(|| missing("model"))?;
    let data = args.data.clone().ok_or_else(|| missing("data"))?;
    let cfg = args.run_config(&data)?;
    let params = ModelParams {
        device: Device::parse(args.device.as_deref().unwrap_or("auto"))?,
        threads: args.threads.unwrap_or(0),
        quantization: Quantization::parse(args.quantization.as_deref().unwrap_or("none"))?,
        max_device_memory_mib: args.max_memory_mib.unwrap_or(0),
        lm_head_in_host: args.lm_head_in_host.unwrap_or(false),
        layers_in_host: args.layers_in_host.unwrap_or(0),
        ..ModelParams::default()
    };
    let model = Model::load(&model_path, &params)?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {elapsed_precise} ETA {eta_precise}  {msg}",
        )
        .expect("valid template"),
    );
    let summary = run(&model, &cfg, &mut |p| {
        bar.set_length(p.total_steps);
        bar.set_position(p.stats.step);
        let eval = p
            .eval_loss
            .map(|e| format!("  eval {e:.4}"))
            .unwrap_or_default();
        bar.set_message(format!(
            "loss {:.4}{eval}  lr {:.2e}  {:.0} tok/s",
            p.stats.loss, p.stats.lr, p.tokens_per_second
        ));
        true
    })?;
    bar.finish();
    if let Some(s) = summary.resumed_from {
        println!("resumed from step {s}");
    }
    println!(
        "{} steps on {} records ({} held out, {} skipped); final loss {}; eval loss {}",
        summary.steps,
        summary.train_records,
        summary.eval_records,
        summary.skipped_records,
        summary.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.eval_loss.map_or("-".into(), |l| format!("{l:.4}")),
    );
    println!("adapter: {}", summary.adapter_dir.display());
    println!(
        "metrics: {}",
        cfg.output_dir.join("metrics.jsonl").display()
    );
    println!("loss curve: {}", cfg.output_dir.join("loss.svg").display());
    Ok(())
}
