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
