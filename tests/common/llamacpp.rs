//! llama.cpp as the reference consumer of GGUF files: the prebuilt binaries of node-llama-cpp
//! 3.21.1 (installed by tests/llamacpp/setup.sh), driven by tests/llamacpp/interop.mjs.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// tests/llamacpp when node and node-llama-cpp are installed; `None` (after saying so) when not,
/// so that the test can skip.
pub fn interop_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/llamacpp");
    let installed = dir
        .join("node_modules/node-llama-cpp/package.json")
        .is_file();
    let node = Command::new("node").arg("--version").output().is_ok();
    if installed && node {
        Some(dir)
    } else {
        eprintln!("SKIPPED: node or node-llama-cpp is missing; run tests/llamacpp/setup.sh");
        None
    }
}

/// Runs llama.cpp on `jobs` (see interop.mjs for their fields) and returns one result per job.
pub fn llama_cpp(dir: &Path, jobs: &Value) -> Vec<Value> {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("jobs.json");
    std::fs::write(&file, jobs.to_string()).unwrap();
    let out = Command::new("node")
        .arg(dir.join("interop.mjs"))
        .arg(&file)
        .current_dir(dir)
        .output()
        .expect("node runs");
    assert!(
        out.status.success(),
        "interop.mjs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("JSON results")
}
