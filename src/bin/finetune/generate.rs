//! `finetune generate`: text from a prompt, with or without an adapter, plain or chat.

use clap::Args;
use finetune::api::{Model, ModelParams, Trainer};
use finetune::data::dataset::Message;
use finetune::generate::{generate, GenerateOptions};
use finetune::train::trainer::TrainConfig;
use finetune::{Error, Result};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model directory or GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    /// Send the prompt as a user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 for greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

pub fn execute(a: GenerateArgs) -> Result<()> {
    let model = Model::load(
        &a.model,
        &ModelParams {
            threads: a.threads,
            ..Default::default()
        },
    )?;
    let codec = model
        .codec()
        .ok_or_else(|| Error::InvalidArgument(format!("{} has no tokenizer", a.model.display())))?;
    let adapter = a
        .adapter
        .as_ref()
        .map(|d| Trainer::from_adapter(&model, d, TrainConfig::default()))
        .transpose()?;
    let prompt = if a.chat {
        codec.chat_prompt(&[Message {
            role: "user".into(),
            content: a.prompt.clone(),
        }])?
    } else {
        codec.encode_text(&a.prompt)?
    };
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        stop: codec.eos.iter().map(|t| t.id as i32).collect(),
    };
    let out = generate(&model, adapter.as_ref(), &prompt, &opts)?;
    println!("{}", codec.decode(&out)?);
    Ok(())
}
