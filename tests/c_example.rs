//! examples/c/train.c, compiled against include/finetune.h and linked to the freshly built
//! libfinetune.so, trains a tiny model and must exit 0 (loss fell, every call succeeded).

mod common;

use std::process::Command;

#[test]
fn c_example_trains_saves_and_generates() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = common::library_path();
    let lib_dir = lib.parent().unwrap();
    let work = tempfile::tempdir().unwrap();
    let exe = work.path().join("train");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("include"))
        .arg(root.join("examples/c/train.c"))
        .arg("-L")
        .arg(lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .args(["-lfinetune", "-o"])
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(
        out.status.success(),
        "compiling train.c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let model = common::tiny_model_dir();
    let adapter = work.path().join("adapter");
    let run = Command::new(&exe)
        .arg(model.path())
        .arg(&adapter)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "train failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("saved adapter") && stdout.contains("generated:"),
        "{stdout}"
    );
    assert!(adapter.join("adapter_model.safetensors").is_file());
    assert!(adapter.join("adapter_config.json").is_file());
}
