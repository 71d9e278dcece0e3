//! Crash-safe checkpoints: a run stopped (cancelled, or killed with SIGKILL at an arbitrary
//! moment) and resumed reproduces the loss trajectory of an uninterrupted run exactly.

mod common;

use finetune::api::{Model, ModelParams};
use finetune::train::checkpoint;
use finetune::train::run::{run, RunConfig};
use finetune::train::trainer::TrainConfig;
use finetune::Error;
use std::path::Path;
use std::process::Command;

fn config(data: &Path, out: &Path) -> RunConfig {
    RunConfig {
        dataset: data.to_path_buf(),
        output_dir: out.to_path_buf(),
        max_seq_len: 256,
        packing: false,
        batch_size: 2,
        grad_accum: 2,
        epochs: 4,
        eval_fraction: 0.2,
        eval_every: 3,
        save_every: 2,
        seed: 5,
        train: TrainConfig {
            learning_rate: 5e-3,
            warmup_steps: 2,
            ..TrainConfig::default()
        },
        lora: finetune::lora::LoraConfig {
            dropout: 0.1,
            ..Default::default()
        },
        ..RunConfig::default()
    }
}

/// `(step, loss or eval_loss)` of every line of metrics.jsonl.
fn trajectory(out: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let loss = v.get("loss").or(v.get("eval_loss")).unwrap().to_string();
            (v["step"].as_u64().unwrap(), loss)
        })
        .collect()
}

fn setup() -> (tempfile::TempDir, Model, std::path::PathBuf) {
    let dir = common::tiny_chat_model_dir();
    let model = Model::load(
        dir.path(),
        &ModelParams {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let data = dir.path().join("data.jsonl");
    std::fs::write(&data, common::CHAT_DATA).unwrap();
    (dir, model, data)
}

#[test]
fn cancelled_and_resumed_run_matches_an_uninterrupted_one() {
    let (_dir, model, data) = setup();
    let whole = tempfile::tempdir().unwrap();
    let summary = run(&model, &config(&data, whole.path()), &mut |_| true).unwrap();
    assert!(summary.steps >= 6, "{summary:?}");
    assert!(whole
        .path()
        .join("adapter/adapter_model.safetensors")
        .is_file());
    assert!(std::fs::read_to_string(whole.path().join("loss.svg"))
        .unwrap()
        .contains("<polyline"));

    let parts = tempfile::tempdir().unwrap();
    let err = run(&model, &config(&data, parts.path()), &mut |p| {
        p.stats.step < 5
    })
    .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    let resumed = RunConfig {
        resume: true,
        ..config(&data, parts.path())
    };
    let summary2 = run(&model, &resumed, &mut |_| true).unwrap();
    assert_eq!(summary2.resumed_from, Some(5));
    assert_eq!(trajectory(parts.path()), trajectory(whole.path()));
}

#[test]
fn resuming_with_other_settings_is_refused() {
    let (_dir, model, data) = setup();
    let out = tempfile::tempdir().unwrap();
    let _ = run(&model, &config(&data, out.path()), &mut |p| {
        p.stats.step < 2
    });
    let other = RunConfig {
        resume: true,
        batch_size: 1,
        ..config(&data, out.path())
    };
    let e = run(&model, &other, &mut |_| true).unwrap_err().to_string();
    assert!(e.contains("other settings"), "{e}");
}

#[test]
fn torn_checkpoints_are_never_read() {
    let (_dir, model, data) = setup();
    let out = tempfile::tempdir().unwrap();
    let _ = run(&model, &config(&data, out.path()), &mut |p| {
        p.stats.step < 4
    });
    let root = out.path().join("checkpoints");
    let good = checkpoint::latest(&root).unwrap().unwrap();
    assert!(good.ends_with("step-00000004"));
    // A save that died half-way: a partial directory with a truncated file, and a later
    // directory without its state file; `latest` is written last and still names the good one.
    std::fs::create_dir_all(root.join("step-00000006.partial")).unwrap();
    std::fs::write(
        root.join("step-00000006.partial/adapter_model.safetensors"),
        b"\x10\x00",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("step-00000008")).unwrap();
    assert_eq!(checkpoint::latest(&root).unwrap().unwrap(), good);
    std::fs::remove_file(root.join("latest")).unwrap();
    assert_eq!(
        checkpoint::latest(&root).unwrap().unwrap(),
        good,
        "without `latest`, the newest complete one"
    );
    let resumed = RunConfig {
        resume: true,
        ..config(&data, out.path())
    };
    assert_eq!(
        run(&model, &resumed, &mut |_| true).unwrap().resumed_from,
        Some(4)
    );
}

#[test]
fn run_killed_at_a_random_moment_resumes_to_the_same_trajectory() {
    let (dir, _model, data) = setup();
    let exe = env!("CARGO_BIN_EXE_finetune");
    let train = |out: &Path, resume: bool| {
        let mut c = Command::new(exe);
        c.args([
            "train",
            "--threads",
            "1",
            "--max-seq-len",
            "256",
            "--batch-size",
            "2",
            "--epochs",
            "30",
        ]);
        c.args([
            "--save-every",
            "1",
            "--seed",
            "3",
            "--learning-rate",
            "0.005",
            "--resume",
            &resume.to_string(),
        ]);
        c.arg("--model")
            .arg(dir.path())
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(out);
        c
    };
    let whole = tempfile::tempdir().unwrap();
    assert!(train(whole.path(), false)
        .output()
        .unwrap()
        .status
        .success());
    let expected = trajectory(whole.path());

    let killed = tempfile::tempdir().unwrap();
    let mut child = train(killed.path(), false).spawn().unwrap();
    let metrics = killed.path().join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |s| s.lines().count()) < expected.len() / 3 {
        assert!(t0.elapsed().as_secs() < 120, "training did not progress");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    assert!(
        trajectory(killed.path()).len() < expected.len(),
        "killed before the end"
    );
    let out = train(killed.path(), true).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(trajectory(killed.path()), expected);
}
