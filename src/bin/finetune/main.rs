//! The `finetune` command-line tool.

use clap::{Parser, Subcommand};
use finetune::api::{Device, Model, ModelParams, Trainer};
use finetune::bench::{longest_sequence, run, BenchConfig, BenchMode};
use finetune::io::gguf::quant::can_encode;
use finetune::io::gguf::GgmlType;
use finetune::io::safetensors::Dtype;
use finetune::lora::LoraConfig;
use finetune::model::presets::preset;
use finetune::model::weights::tensor_specs;
use finetune::train::memory::estimate;
use finetune::train::trainer::TrainConfig;
use std::path::PathBuf;
use std::process::ExitCode;

mod demo;
mod generate;
mod train;

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
        #[arg(long, default_value_t = BenchConfig::default().model)]
        model: String,
        #[arg(long, default_value_t = BenchConfig::default().batch)]
        batch: usize,
        #[arg(long, default_value_t = BenchConfig::default().seq)]
        seq: usize,
        #[arg(long, default_value_t = BenchConfig::default().rank)]
        rank: usize,
        /// Timed steps after one warm-up step.
        #[arg(long, default_value_t = BenchConfig::default().steps)]
        steps: usize,
        /// CPU threads (0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// auto, cpu, cuda:N, or several GPUs as one data-parallel group (cuda:0,cuda:1 or
        /// cuda:all), each taking --batch rows.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Keep every layer's activations instead of recomputing them.
        #[arg(long)]
        no_checkpointing: bool,
        /// Keep the saved layer inputs in pinned host memory (GPU only).
        #[arg(long)]
        offload: bool,
        /// With checkpointing: the last N layers keep their MLP's gate and up products instead
        /// of recomputing them (faster; 2 × seq × intermediate values a layer of device memory).
        #[arg(long, default_value_t = 0)]
        kept_mlp_layers: usize,
        /// Keep the LM head in pinned host memory, copied to the device chunk by chunk for each
        /// step's loss (GPU only).
        #[arg(long)]
        lm_head_in_host: bool,
        /// Decoder layers whose projection matrices stay in pinned host memory, each copied to
        /// the device ahead of the layer (GPU only; NF4 ones their codes).
        #[arg(long, default_value_t = 0)]
        layers_in_host: usize,
        /// lora (frozen weights in the device's own format) or qlora (frozen projection
        /// matrices quantized to NF4 at load).
        #[arg(long, default_value = "lora")]
        mode: String,
        /// Cap on the device memory held, in MiB (0: none; GPU only). Going past it fails with
        /// an out-of-memory error.
        #[arg(long, default_value_t = 0)]
        max_memory_mib: usize,
        /// Instead of timing steps: the longest single-row sequence whose step fits in
        /// --max-memory-mib, below this (assumed not to fit), bisected up from --seq (halved
        /// first while it does not fit); one JSON line per probe, then the result.
        #[arg(long)]
        longest_seq_below: Option<usize>,
        /// Tokens the longest-sequence search stops at.
        #[arg(long, default_value_t = 1024)]
        resolution: usize,
    },
    /// Fine-tune LoRA adapters on a dataset (JSONL/JSON) from flags or a config file.
    Train(Box<train::TrainArgs>),
    /// Print the configuration of a model directory or GGUF file and the memory a training
    /// configuration would need.
    Info {
        model: PathBuf,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 512)]
        seq: usize,
        #[arg(long)]
        no_checkpointing: bool,
    },
    /// Generate text, optionally with an adapter and through the chat template.
    Generate(generate::GenerateArgs),
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
    /// Compile the CUDA kernels for a GPU architecture into the kernel cache ahead of first use
    /// (needs only the NVRTC library, no GPU). The cache is $FINETUNE_KERNEL_CACHE, else
    /// ~/.cache/finetune/kernels.
    Kernels {
        /// sm_80 (A100), sm_89 (L4, RTX 40), sm_90a (H100, H200), ...
        #[arg(long, default_value = "sm_90a")]
        arch: String,
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
    /// The main job: fine-tune SmolLM2-135M-Instruct on the persona dataset and compare its
    /// answers to held-out questions before and after.
    Demo {
        #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
        model: PathBuf,
        #[arg(long, default_value = "data/persona/brannock.jsonl")]
        data: PathBuf,
        #[arg(long, default_value = "data/persona/heldout.json")]
        heldout: PathBuf,
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        #[arg(long, default_value_t = 3)]
        epochs: u64,
        #[arg(long, default_value_t = 0)]
        threads: usize,
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
            offload,
            kept_mlp_layers,
            lm_head_in_host,
            layers_in_host,
            mode,
            max_memory_mib,
            longest_seq_below,
            resolution,
        } => {
            let params = ModelParams {
                device: Device::parse(&device)?,
                threads,
                quantization: BenchMode::parse(&mode)?.quantization(),
                max_device_memory_mib: max_memory_mib,
                lm_head_in_host,
                layers_in_host,
                ..ModelParams::default()
            };
            let cfg = BenchConfig {
                model,
                batch,
                seq,
                rank,
                steps,
                checkpointing: !no_checkpointing,
                offload_activations: offload,
                kept_mlp_layers,
                params,
            };
            match longest_seq_below {
                None => println!("{}", run(&cfg)?.to_json()),
                Some(upper) => {
                    let longest = longest_sequence(&cfg, upper, resolution, &mut |p| {
                        println!("{}", serde_json::to_string(p).expect("a probe serializes"));
                    })?;
                    println!(
                        "{}",
                        serde_json::json!({
                            "model": cfg.model, "mode": mode,
                            "max_memory_mib": max_memory_mib, "offload_activations": offload,
                            "lm_head_in_host": lm_head_in_host,
                            "layers_in_host": layers_in_host,
                            "longest_seq": longest, "resolution": resolution,
                        })
                    );
                }
            }
        }
        Command::Kernels { arch } => {
            let dir = finetune::backend::cuda::kernels::precompile(&arch)?;
            println!("kernels for {arch} cached in {}", dir.display());
        }
        Command::Info {
            model,
            rank,
            batch,
            seq,
            no_checkpointing,
        } => {
            let m = Model::load(&model, &ModelParams::default())?;
            let c = m.config();
            let params: usize = tensor_specs(c).iter().map(|s| s.rows * s.cols).sum();
            println!("{:#?}", c);
            println!("parameters: {:.1} M", params as f64 / 1e6);
            println!(
                "tokenizer: {}",
                if m.codec().is_some() { "yes" } else { "no" }
            );
            let lora = LoraConfig {
                rank,
                ..LoraConfig::default()
            };
            let est = estimate(c, &lora, batch, seq, !no_checkpointing);
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            println!(
                "memory for LoRA r={rank}, batch {batch} x {seq}, checkpointing {}: weights {:.0} MiB, adapters+optimizer {:.1} MiB, activations {:.0} MiB, total {:.0} MiB",
                !no_checkpointing, mib(est.weights), mib(est.adapters), mib(est.activations), mib(est.total)
            );
        }
        Command::Generate(args) => generate::execute(args)?,
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
        Command::Demo {
            model,
            data,
            heldout,
            out,
            epochs,
            threads,
        } => demo::run(&demo::DemoArgs {
            model,
            data,
            heldout,
            out,
            epochs,
            threads,
        })?,
        Command::Train(args) => train::execute(*args)?,
    }
    Ok(())
}
