//! The `finetune` command-line tool.

use clap::{Parser, Subcommand};
use finetune::api::{Device, Model, ModelParams, Trainer};
use finetune::bench::{run, BenchConfig};
use finetune::io::gguf::quant::can_encode;
use finetune::io::gguf::GgmlType;
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
    /// Print the configuration of a model directory or GGUF file.
    Info { model: PathBuf },
    /// Merge an adapter (PEFT directory or GGUF LoRA file) into its base model (a Hugging Face
    /// directory or a GGUF file) and write a Hugging Face directory or a GGUF file; or write the
    /// adapter alone as a GGUF LoRA adapter for llama.cpp.
    Export {
        #[arg(long)]
        model: PathBuf,
        /// Without it the base model is converted as is.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// hf (a directory) or gguf (one file); by default gguf when --out ends in .gguf.
        #[arg(long)]
        format: Option<String>,
        /// Safetensors element type for --format hf: f32, f16 or bf16.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// GGUF tensor type for --format gguf: f32, f16, bf16 or q8_0.
        #[arg(long = "type", default_value = "f16")]
        gguf_type: String,
        /// Write only the adapter, as a GGUF LoRA adapter file (llama.cpp `--lora`).
        #[arg(long)]
        adapter_only: bool,
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

fn parse_gguf_type(name: &str) -> finetune::Result<GgmlType> {
    GgmlType::parse(name)
        .filter(|t| can_encode(*t))
        .ok_or_else(|| {
            finetune::Error::InvalidArgument(format!(
                "unknown GGUF type {name:?} (expected f32, f16, bf16 or q8_0)"
            ))
        })
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
            format,
            dtype,
            gguf_type,
            adapter_only,
        } => {
            let gguf = match format.as_deref() {
                None => out.extension().is_some_and(|e| e == "gguf"),
                Some("gguf") => true,
                Some("hf") => false,
                Some(other) => {
                    return Err(finetune::Error::InvalidArgument(format!(
                        "unknown format {other:?} (expected hf or gguf)"
                    )))
                }
            };
            let m = Model::load(&model, &ModelParams::default())?;
            let t = adapter
                .map(|a| Trainer::from_adapter(&m, &a, TrainConfig::default()))
                .transpose()?;
            match (&t, adapter_only, gguf) {
                (None, true, _) => {
                    return Err(finetune::Error::InvalidArgument(
                        "--adapter-only needs --adapter".into(),
                    ))
                }
                (Some(t), true, _) => t.save_adapter_gguf(&out)?,
                (_, false, true) => m.save_gguf(&out, parse_gguf_type(&gguf_type)?, t.as_ref())?,
                (_, false, false) => m.save_pretrained(&out, parse_dtype(&dtype)?, t.as_ref())?,
            }
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
