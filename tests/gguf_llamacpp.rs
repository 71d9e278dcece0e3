//! The real consumer: llama.cpp (prebuilt, driven through node-llama-cpp 3.21.1 by
//! tests/llamacpp/interop.mjs) loads SmolLM2's GGUF, the merged model this library exports, and
//! the base model with the exported LoRA adapter; its tokenization and greedy continuations must
//! agree with this library's next-token predictions. Skips, saying why, without the model or without node-llama-cpp
//! (tests/llamacpp/setup.sh installs it).

mod common;

use common::llamacpp::{interop_dir, llama_cpp};
use common::{chat_prompt, encode, smollm2, tuned};
use finetune::api::{Model, Trainer};
use finetune::backend::IGNORE_LABEL;
use finetune::io::gguf::GgmlType;
use finetune::train::batch::Batch;
use serde_json::{json, Value};

/// Tokens generated per prompt.
const N_PREDICT: usize = 10;

fn ids(v: &Value) -> Vec<Vec<i32>> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Checks llama.cpp's greedy `continuations` of `prompts` against this library's model
/// (`adapter` applied if given) by teacher forcing: one forward pass over prompt + continuation,
/// then at each generated position our arg-max must be llama.cpp's token, or else a near-tie
/// (llama.cpp multiplies quantized weights by 8-bit-quantized activations, so logits within a
/// fraction of a unit may swap). Prints the agreement.
fn compare(
    what: &str,
    m: &Model,
    adapter: Option<&Trainer>,
    prompts: &[Vec<i32>],
    continuations: &[Vec<i32>],
) {
    let vocab = m.config().vocab_size;
    let (mut agree, mut total, mut worst_margin) = (0, 0, 0.0f32);
    let mut full = 0;
    for (p, c) in prompts.iter().zip(continuations) {
        assert!(!c.is_empty(), "{what}: llama.cpp generated nothing");
        let seq: Vec<i32> = p.iter().chain(c).copied().collect();
        let n = seq.len();
        let b = Batch::new(1, n, seq, vec![IGNORE_LABEL; n]).unwrap();
        let logits = m.logits(&b, adapter).unwrap();
        let mut all = true;
        for (i, &theirs) in c.iter().enumerate() {
            let row = &logits[(p.len() - 1 + i) * vocab..(p.len() + i) * vocab];
            let ours = (0..vocab)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap();
            total += 1;
            if ours == theirs as usize {
                agree += 1;
            } else {
                all = false;
                worst_margin = worst_margin.max(row[ours] - row[theirs as usize]);
            }
        }
        full += all as usize;
    }
    eprintln!(
        "{what}: {agree}/{total} generated tokens agree, {full}/{} prompts entirely; \
         largest logit margin where they differ {worst_margin:.3}",
        prompts.len()
    );
    assert!(agree * 10 >= total * 9, "{what}: {agree}/{total}");
    assert!(
        worst_margin < 1.0,
        "{what}: a disagreement {worst_margin} is not a near-tie"
    );
}

#[test]
fn llama_cpp_agrees_with_this_library() {
    let Some(m) = smollm2() else { return };
    let Some(dir) = interop_dir() else { return };
    let base = common::smollm2_path().unwrap();
    let (t, _, _) = tuned(m);
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("merged-f16.gguf");
    let adapter = tmp.path().join("adapter.gguf");
    t.export_gguf(&merged, GgmlType::F16).unwrap();
    t.save_adapter_gguf(&adapter).unwrap();

    let texts = [
        "Hello, world! What is 2+2?",
        "The quick brown fox jumps over the lazy dog.",
        "  indented\n\tcode() { return 42; }\n",
        "Ünïcödé — 日本語 🙂 1234567",
    ];
    let prompts: Vec<Vec<i32>> = vec![
        chat_prompt(m, "What is the capital of France?"),
        chat_prompt(m, "What is your name?"),
        chat_prompt(m, "Name three colors."),
        encode(m, "Once upon a time, there was"),
    ];
    let jobs = json!([
        {"model": base, "tokenize": texts, "prompts": prompts, "n_predict": N_PREDICT},
        {"model": merged, "prompts": prompts, "n_predict": N_PREDICT},
        {"model": base, "lora": adapter, "prompts": prompts, "n_predict": N_PREDICT},
    ]);
    let results = llama_cpp(&dir, &jobs);

    let theirs_tokens = ids(&results[0]["tokens"]);
    for (text, theirs) in texts.iter().zip(&theirs_tokens) {
        assert_eq!(&encode(m, text), theirs, "tokenization of {text:?}");
    }
    eprintln!(
        "tokenizer: {} of {} texts tokenized identically",
        texts.len(),
        texts.len()
    );

    compare(
        "base Q4_1 GGUF",
        m,
        None,
        &prompts,
        &ids(&results[0]["continuations"]),
    );
    compare(
        "merged F16 export",
        m,
        Some(&t),
        &prompts,
        &ids(&results[1]["continuations"]),
    );
    compare(
        "base + GGUF LoRA adapter",
        m,
        Some(&t),
        &prompts,
        &ids(&results[2]["continuations"]),
    );
}
