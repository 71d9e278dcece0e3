//! A real pretrained model from its GGUF file alone: SmolLM2-135M-Instruct (Q4_1) loads with its
//! tokenizer and chat template, answers a simple question, fine-tunes with falling loss, and its
//! GGUF exports (merged model, LoRA adapter) load back with the same behaviour. Skips, saying so,
//! when scripts/fetch-smollm2.sh has not fetched the model.

mod common;

use common::{chat_prompt, decode, encode, im_end, smollm2, tuned};
use finetune::api::{Model, ModelParams, Trainer};
use finetune::backend::IGNORE_LABEL;
use finetune::generate::greedy;
use finetune::io::gguf::GgmlType;
use finetune::train::batch::Batch;
use finetune::train::trainer::TrainConfig;

#[test]
fn configuration_and_tokenizer_come_from_the_file() {
    let Some(m) = smollm2() else { return };
    let c = m.config();
    assert_eq!(
        (
            c.num_layers,
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.vocab_size
        ),
        (30, 576, 9, 3, 49152)
    );
    assert!(c.tie_word_embeddings);
    assert!(m.chat_template().unwrap().contains("<|im_start|>"));
    for text in [
        "Hello, world! What is 2+2?",
        "  leading spaces, tabs\tand\nnew lines\n\n",
        "Ünïcödé — 日本語 🙂 12345",
    ] {
        let ids = encode(m, text);
        assert_eq!(decode(m, &ids), text, "{ids:?}");
    }
    // The ids llama.cpp gives (node-llama-cpp 3.21.1, model.tokenize).
    assert_eq!(
        encode(m, "Hello, world! What is 2+2?"),
        [19556, 28, 905, 17, 1812, 314, 216, 34, 27, 34, 47]
    );
    assert_eq!(encode(m, "<|im_start|>user"), [1, 4093]);
}

#[test]
fn answers_a_simple_question() {
    let Some(m) = smollm2() else { return };
    let prompt = chat_prompt(m, "What is the capital of France?");
    let answer = greedy(m, None, &prompt, 16, Some(im_end(m))).unwrap();
    let text = decode(m, &answer);
    eprintln!("SmolLM2: What is the capital of France? -> {text:?}");
    assert!(text.contains("Paris"), "{text:?}");
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The arg-max token of each labelled row of `logits`.
fn predictions(logits: &[f32], b: &Batch, vocab: usize) -> Vec<usize> {
    b.labels
        .iter()
        .zip(logits.chunks(vocab))
        .filter(|(&l, _)| l != IGNORE_LABEL)
        .map(|(_, row)| {
            (0..vocab)
                .max_by(|&i, &j| row[i].total_cmp(&row[j]))
                .unwrap()
        })
        .collect()
}

#[test]
fn fine_tunes_exports_and_reloads() {
    let Some(m) = smollm2() else { return };
    let (t, b, losses) = tuned(m);
    eprintln!(
        "SmolLM2 loss before {:.3}, after 4 steps {:.3}",
        losses[0], losses[1]
    );
    assert!(losses[1] < 0.7 * losses[0], "{losses:?}");
    let dir = tempfile::tempdir().unwrap();
    let want = m.logits(&b, Some(&t)).unwrap();

    // The adapter alone, as a GGUF LoRA file, reproduces the trainer exactly.
    let adapter = dir.path().join("adapter.gguf");
    t.save_adapter_gguf(&adapter).unwrap();
    let back = Trainer::from_adapter(m, &adapter, TrainConfig::default()).unwrap();
    assert!(max_abs_diff(&m.logits(&b, Some(&back)).unwrap(), &want) < 1e-3);

    // The merged model in F16 and Q8_0 loads back as a model of its own, tokenizer included,
    // and predicts the trained answers as the trainer does.
    let vocab = m.config().vocab_size;
    for (ty, tolerance) in [(GgmlType::F16, 0.2), (GgmlType::Q8_0, 4.0)] {
        let path = dir.path().join(format!("merged-{ty}.gguf"));
        t.export_gguf(&path, ty).unwrap();
        let merged = Model::load(&path, &ModelParams::default()).unwrap();
        assert_eq!(merged.config(), m.config());
        assert_eq!(merged.chat_template(), m.chat_template());
        assert_eq!(encode(&merged, "Who are you?"), encode(m, "Who are you?"));
        let got = merged.logits(&b, None).unwrap();
        let diff = max_abs_diff(&got, &want);
        eprintln!("merged {ty}: max logit difference {diff:.4}");
        assert!(diff < tolerance, "{ty}: {diff}");
        assert_eq!(
            predictions(&got, &b, vocab),
            predictions(&want, &b, vocab),
            "{ty}"
        );
        if ty == GgmlType::Q8_0 {
            let prompt = chat_prompt(&merged, "What is your name?");
            let answer = decode(
                &merged,
                &greedy(&merged, None, &prompt, 12, Some(im_end(m))).unwrap(),
            );
            eprintln!("merged Q8_0: What is your name? -> {answer:?}");
        }
    }
}
