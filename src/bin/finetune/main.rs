//! The `finetune` command-line tool.

use clap::{Parser, Subcommand};
use finetune::api::{Device, Model, ModelParams, Trainer};
use finetune::bench::{run, BenchConfig};
use finetune::io::safetensors::Dtype;
use finetune::model::presets::preset;
use finetune::train::trainer::TrainConfig;
use std::path::PathBuf;
use std::process::ExitCode;

mod demo;

#[derive(Parser)]
#[command(
    name = "finetune",
    version,
    about = "LoRA fine-tuning of Llama-family models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time training steps on random weights of a named shape; prints JSON.
    Bench {
        /// smollm2-135m, llama3.2-1b, llama3-8b, mistral-7b, qwen2.5-7b, gemma-7b or tiny.
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// Timed steps after one warm-up step.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// CPU threads (0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long, default_value = "auto")]
        device: String,
        /// Keep every layer's activations instead of recomputing them.
        #[arg(long)]
        no_checkpointing: bool,
    },
    /// Print a model directory's configuration.
    Info { model: PathBuf },
    /// Merge a PEFT adapter into its base model and write a Hugging Face directory.
    Export {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// f32, f16 or bf16.
        #[arg(long, default_value = "bf16")]
        dtype: String,
    },
    /// Write a model of a named shape with random weights as a Hugging Face directory.
    Create {
        /// tiny, smollm2-135m, llama3.2-1b, ...
        #[arg(long, default_value = "tiny")]
        shape: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
        /// f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Train a tiny generated model to say a sentence, showing its output before and after.
    Demo {
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        #[arg(long, default_value_t = 150)]
        steps: u64,
    },
}

fn main() -> ExitCode {
    match execute(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_dtype(name: &str) -> finetune::Result<Dtype> {
    match name {
        "f32" => Ok(Dtype::F32),
        "f16" => Ok(Dtype::F16),
        "bf16" => Ok(Dtype::BF16),
        other => Err(finetune::Error::InvalidArgument(format!(
            "unknown dtype {other:?} (expected f32, f16 or bf16)"
        ))),
    }
}

fn execute(command: Command) -> finetune::Result<()> {
    match command {
        Command::Bench {
            model,
            batch,
            seq,
            rank,
            steps,
            threads,
            device,
            no_checkpointing,
        } => {
            let params = ModelParams {
                device: Device::parse(&device)?,
                threads,
            };
            let cfg = BenchConfig {
                model,
                batch,
                seq,
                rank,
                steps,
                checkpointing: !no_checkpointing,
                params,
            };
            let result = run(&cfg)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&result).expect("serializable")
            );
        }
        Command::Info { model } => {
            let m = Model::load(&model, &ModelParams::default())?;
            println!("{:#?}", m.config());
        }
        Command::Export {
            model,
            adapter,
            out,
            dtype,
        } => {
            let m = Model::load(&model, &ModelParams::default())?;
            let t = Trainer::from_adapter(&m, &adapter, TrainConfig::default())?;
            t.export_merged(&out, parse_dtype(&dtype)?)?;
            println!("wrote {}", out.display());
        }
        Command::Create {
            shape,
            seed,
            out,
            dtype,
        } => {
            let m = Model::random(preset(&shape)?, seed, &ModelParams::default())?;
            m.save_pretrained(&out, parse_dtype(&dtype)?, None)?;
            println!("wrote {}", out.display());
        }
        Command::Demo { out, steps } => demo::run(&out, steps)?,
    }
    Ok(())
}
