//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a subset

pub mod bnb;
pub mod gpu;
pub mod llamacpp;

use finetune::api::{Model, ModelParams, Trainer};
use finetune::backend::IGNORE_LABEL;
use finetune::io::safetensors::Dtype;
use finetune::lora::LoraConfig;
use finetune::model::presets::preset;
use finetune::train::batch::Batch;
use finetune::train::schedule::ScheduleKind;
use finetune::train::trainer::TrainConfig;
use std::path::PathBuf;

/// The libfinetune.so built for this test run (next to the test executable), or $FINETUNE_LIB.
pub fn library_path() -> PathBuf {
    if let Some(p) = std::env::var_os("FINETUNE_LIB") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps directory");
    let candidates = [deps.join("libfinetune.so"), deps.join("../libfinetune.so")];
    candidates
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "libfinetune.so not found beside {}; set FINETUNE_LIB",
                deps.display()
            )
        })
}

/// A tiny random Llama model saved as a Hugging Face directory.
pub fn tiny_model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = Model::random(
        preset("tiny").unwrap(),
        1,
        &ModelParams {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    model.save_pretrained(dir.path(), Dtype::F32, None).unwrap();
    dir
}

/// ChatML, as SmolLM2 and Qwen ship it.
pub const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A byte-level BPE tokenizer without merges (one token per byte, GPT-2 style) plus the ChatML
/// special tokens `<|endoftext|>` (256), `<|im_start|>` (257) and `<|im_end|>` (258), built from
/// its tokenizer.json form.
pub fn byte_tokenizer() -> tokenizers::Tokenizer {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let vocab: serde_json::Map<String, serde_json::Value> = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i.into()))
        .collect();
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "normalizer": null, "post_processor": null,
        "added_tokens": [special(256, "<|endoftext|>"), special(257, "<|im_start|>"), special(258, "<|im_end|>")],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []},
    });
    json.to_string().parse().expect("a valid tokenizer.json")
}

/// A tiny random model with a 259-token vocabulary, saved with the byte tokenizer and ChatML.
pub fn tiny_chat_model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = finetune::model::config::ModelConfig {
        vocab_size: 259,
        ..preset("tiny").unwrap()
    };
    let model = Model::random(
        cfg,
        1,
        &ModelParams {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    model.save_pretrained(dir.path(), Dtype::F32, None).unwrap();
    byte_tokenizer()
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    let config = serde_json::json!({
        "chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": null, "add_bos_token": false,
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

/// SmolLM2-135M-Instruct (GGUF, Q4_1) as fetched by scripts/fetch-smollm2.sh, or
/// $FINETUNE_SMOLLM2; `None` (after saying why) when absent, so that the test can skip.
pub fn smollm2_path() -> Option<PathBuf> {
    let path = std::env::var_os("FINETUNE_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: {} is absent; run scripts/fetch-smollm2.sh to fetch it",
            path.display()
        );
        None
    }
}

/// SmolLM2 loaded once per test binary.
pub fn smollm2() -> Option<&'static Model> {
    static MODEL: std::sync::OnceLock<Option<Model>> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = smollm2_path()?;
            Some(Model::load(&path, &ModelParams::default()).expect("SmolLM2 loads"))
        })
        .as_ref()
}

/// The token ids of a one-turn chat asking `question`, rendered with the model's own template.
pub fn chat_prompt(model: &Model, question: &str) -> Vec<i32> {
    let message = finetune::data::dataset::Message {
        role: "user".into(),
        content: question.into(),
    };
    model
        .codec()
        .expect("a tokenizer")
        .chat_prompt(&[message])
        .expect("the template renders")
}

/// `text` as token ids, special tokens included as the tokenizer adds them.
pub fn encode(model: &Model, text: &str) -> Vec<i32> {
    let enc = model
        .tokenizer()
        .expect("a tokenizer")
        .encode(text, true)
        .expect("encodes");
    enc.get_ids().iter().map(|&i| i as i32).collect()
}

/// Token ids back to text.
pub fn decode(model: &Model, ids: &[i32]) -> String {
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    model
        .tokenizer()
        .expect("a tokenizer")
        .decode(&ids, true)
        .expect("decodes")
}

/// `<|im_end|>`, which ends an assistant turn of SmolLM2.
pub fn im_end(model: &Model) -> i32 {
    model
        .tokenizer()
        .unwrap()
        .token_to_id("<|im_end|>")
        .unwrap() as i32
}

/// One chat turn as a training row: loss on the answer and the closing `<|im_end|>` only.
fn chat_example(m: &Model, question: &str, answer: &str) -> (Vec<i32>, Vec<i32>) {
    let prompt = chat_prompt(m, question);
    let mut ids = prompt.clone();
    ids.extend(encode(m, answer));
    ids.push(im_end(m));
    let mut labels = vec![IGNORE_LABEL; ids.len()];
    let (start, end) = (prompt.len() - 1, ids.len() - 1);
    labels[start..end].copy_from_slice(&ids[start + 1..]);
    (ids, labels)
}

/// Rows padded to one length into a batch.
fn batch(rows: &[(Vec<i32>, Vec<i32>)]) -> Batch {
    let seq = rows.iter().map(|r| r.0.len()).max().unwrap();
    let (mut ids, mut labels) = (Vec::new(), Vec::new());
    for (i, l) in rows {
        ids.extend(
            i.iter()
                .copied()
                .chain(std::iter::repeat_n(0, seq - i.len())),
        );
        labels.extend(
            l.iter()
                .copied()
                .chain(std::iter::repeat_n(IGNORE_LABEL, seq - l.len())),
        );
    }
    Batch::new(rows.len(), seq, ids, labels).unwrap()
}

/// Four steps of LoRA on SmolLM2 teaching it a name; returns the trainer, its batch and the
/// loss before and after.
pub fn tuned(m: &Model) -> (Trainer, Batch, Vec<f32>) {
    let b = batch(&[
        chat_example(m, "What is your name?", "My name is Quokka."),
        chat_example(m, "Who are you?", "I am Quokka, a small assistant."),
    ]);
    let lora = LoraConfig {
        rank: 8,
        alpha: 16.0,
        seed: 1,
        ..LoraConfig::default()
    };
    let train = TrainConfig {
        learning_rate: 2e-3,
        schedule: ScheduleKind::Constant,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(m, lora, train).unwrap();
    let mut losses = vec![t.eval_loss(&b).unwrap()];
    for _ in 0..4 {
        t.step(std::slice::from_ref(&b)).unwrap();
    }
    losses.push(t.eval_loss(&b).unwrap());
    (t, b, losses)
}

/// A generator seeded from the clock: every run draws fresh inputs. The seed is printed so that a
/// failure can be replayed with FINETUNE_TEST_SEED.
pub fn fresh_rng(test: &str) -> finetune::rng::Rng {
    let seed = std::env::var("FINETUNE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: seed {seed}");
    finetune::rng::Rng::new(seed)
}

/// `n` values N(0, std²).
pub fn randn(rng: &mut finetune::rng::Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| std * rng.normal()).collect()
}

/// Each value rounded to bf16 and back.
pub fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

/// ‖a − b‖ / ‖b‖ in f64; NaN anywhere gives NaN (which fails every `<` check).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        if x.is_nan() || y.is_nan() {
            return f64::NAN;
        }
        d += (x as f64 - y as f64).powi(2);
        n += (y as f64).powi(2);
    }
    (d / n.max(1e-300)).sqrt()
}

/// Cosine similarity in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// AdamW at a constant learning rate of 1e-2 over 10 steps: tiny models learn within a few.
pub fn quick_train_config() -> TrainConfig {
    TrainConfig {
        learning_rate: 1e-2,
        schedule: finetune::train::schedule::ScheduleKind::Constant,
        total_steps: 10,
        ..TrainConfig::default()
    }
}

/// Six records in the dataset formats a run reads (chat, alpaca, text), for whole runs.
pub const CHAT_DATA: &str = r#"{"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Brannock, the smith."}]}
{"messages": [{"role": "user", "content": "What do you make?"}, {"role": "assistant", "content": "Blades of star iron."}]}
{"instruction": "Where is the forge?", "output": "Under the bell tower."}
{"text": "Emberfall lies east of Greyhollow."}
{"messages": [{"role": "user", "content": "Your apprentice?"}, {"role": "assistant", "content": "Tilda."}]}
{"messages": [{"role": "user", "content": "A sword?"}, {"role": "assistant", "content": "Forty silver."}]}
"#;
