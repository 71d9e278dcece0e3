//! The C examples, compiled against include/finetune.h and linked to the freshly built
//! libfinetune.so: train.c trains a tiny model and must exit 0 (loss fell, every call
//! succeeded); data_parallel.c must compile.

mod common;

use std::process::Command;

/// Compiles examples/c/`name`.c with warnings as errors into `dir`; returns the executable.
fn compile(name: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = common::library_path();
    let lib_dir = lib.parent().unwrap();
    let exe = dir.join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("include"))
        .arg(root.join(format!("examples/c/{name}.c")))
        .arg("-L")
        .arg(lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .args(["-lfinetune", "-o"])
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(
        out.status.success(),
        "compiling {name}.c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// The multi-process example needs one GPU per rank and NCCL, so here it is only compiled; the
/// GPU runs (scripts/test_gpu.sh) execute it.
#[test]
fn data_parallel_example_compiles() {
    let work = tempfile::tempdir().unwrap();
    assert!(compile("data_parallel", work.path()).is_file());
}

#[test]
fn c_example_trains_saves_and_generates() {
    let work = tempfile::tempdir().unwrap();
    let exe = compile("train", work.path());

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
