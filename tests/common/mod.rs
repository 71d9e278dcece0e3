//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a subset

use finetune::api::{Model, ModelParams};
use finetune::io::safetensors::Dtype;
use finetune::model::presets::preset;
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
