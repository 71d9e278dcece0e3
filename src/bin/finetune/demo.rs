//! `finetune demo`: the main job. A small pretrained chat model (SmolLM2-135M-Instruct) learns
//! an in-game character from the persona dataset in data/persona, and answers held-out questions
//! before and after.

use finetune::api::{Model, ModelParams, Trainer};
use finetune::data::dataset::Message;
use finetune::generate::{generate, GenerateOptions};
use finetune::lora::LoraConfig;
use finetune::train::run::{run as train_run, RunConfig};
use finetune::train::schedule::ScheduleKind;
use finetune::train::trainer::TrainConfig;
use finetune::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the demo's inputs live.
pub struct DemoArgs {
    pub model: PathBuf,
    pub data: PathBuf,
    pub heldout: PathBuf,
    pub out: PathBuf,
    pub epochs: u64,
    pub threads: usize,
}

#[derive(serde::Deserialize)]
struct Heldout {
    question: String,
    expected: String,
}

fn answer(model: &Model, adapter: Option<&Trainer>, question: &str) -> Result<String> {
    let codec = model.codec().expect("checked by run");
    let prompt = codec.chat_prompt(&[Message {
        role: "user".into(),
        content: question.into(),
    }])?;
    let opts = GenerateOptions {
        max_new_tokens: 40,
        stop: codec.eos.iter().map(|t| t.id as i32).collect(),
        ..Default::default()
    };
    let out = generate(model, adapter, &prompt, &opts)?;
    Ok(codec.decode(&out)?.trim().replace('\n', " "))
}

fn answers(model: &Model, adapter: Option<&Trainer>, questions: &[Heldout]) -> Result<Vec<String>> {
    questions
        .iter()
        .map(|q| answer(model, adapter, &q.question))
        .collect()
}

pub fn run(a: &DemoArgs) -> Result<()> {
    if !a.model.exists() {
        return Err(Error::InvalidArgument(format!(
            "{} not found: fetch it with scripts/fetch-smollm2.sh (or pass --model)",
            a.model.display()
        )));
    }
    let t0 = Instant::now();
    let model = Model::load(
        &a.model,
        &ModelParams {
            threads: a.threads,
            ..Default::default()
        },
    )?;
    if model.codec().and_then(|c| c.template.as_ref()).is_none() {
        return Err(Error::InvalidArgument(format!(
            "{} has no tokenizer with a chat template",
            a.model.display()
        )));
    }
    let c = model.config();
    println!(
        "model: {} ({} layers, hidden {}, vocab {}) on {}, loaded in {:.1} s",
        a.model.display(),
        c.num_layers,
        c.hidden_size,
        c.vocab_size,
        model.device(),
        t0.elapsed().as_secs_f64()
    );
    let heldout: Vec<Heldout> = serde_json::from_value(finetune::io::json::read_json(&a.heldout)?)
        .map_err(|e| Error::format(&a.heldout, e.to_string()))?;
    let before = answers(&model, None, &heldout)?;

    let cfg = RunConfig {
        dataset: a.data.clone(),
        output_dir: a.out.clone(),
        max_seq_len: 256,
        packing: false,
        batch_size: 8,
        epochs: a.epochs,
        eval_fraction: 0.0,
        lora: LoraConfig {
            rank: 16,
            alpha: 32.0,
            ..LoraConfig::default()
        },
        train: TrainConfig {
            learning_rate: 1e-3,
            warmup_steps: 4,
            schedule: ScheduleKind::Cosine,
            checkpointing: false,
            ..TrainConfig::default()
        },
        ..RunConfig::default()
    };
    let t1 = Instant::now();
    let summary = train_run(&model, &cfg, &mut |p| {
        if p.stats.step == 1 || p.stats.step % 5 == 0 || p.stats.step == p.total_steps {
            println!(
                "step {:>3}/{}  loss {:.4}  lr {:.2e}  {:.0} tokens/s",
                p.stats.step, p.total_steps, p.stats.loss, p.stats.lr, p.tokens_per_second
            );
        }
        true
    })?;
    println!(
        "trained {} steps on {} records in {:.0} s",
        summary.steps,
        summary.train_records,
        t1.elapsed().as_secs_f64()
    );
    let tuned = Trainer::from_adapter(&model, &summary.adapter_dir, TrainConfig::default())?;
    let after = answers(&model, Some(&tuned), &heldout)?;
    for ((q, b), af) in heldout.iter().zip(&before).zip(&after) {
        println!(
            "\nQ: {}\n  expected: {}\n  before:   {b}\n  after:    {af}",
            q.question, q.expected
        );
    }
    println!("\nadapter (PEFT format): {}", summary.adapter_dir.display());
    println!(
        "loss curve: {}",
        Path::new(&a.out).join("loss.svg").display()
    );
    Ok(())
}
