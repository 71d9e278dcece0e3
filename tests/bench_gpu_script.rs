//! scripts/bench_gpu.sh run against stand-in binaries (shell scripts printing a bench result):
//! the order of the runs over rounds, each binary's environment, the ratios it prints, the JSON
//! file it keeps, and a failing configuration reported while the others still run.

use std::fs;
use std::path::Path;
use std::process::Command;

/// A stand-in for `finetune bench`: logs `NAME GRAPHS ARGS` to `runs.log` beside it and prints
/// `tokens` tokens/s (+100 with `FINETUNE_CUDA_GRAPHS=0`); fails on `--fail`.
fn stand_in(dir: &Path, name: &str, tokens: u32) {
    let path = dir.join(".gpu").join(name);
    let script = format!(
        r#"#!/usr/bin/env bash
echo "{name} ${{FINETUNE_CUDA_GRAPHS:-unset}} $*" >> "$(dirname "$0")/runs.log"
case " $* " in *" --fail "*) exit 3;; esac
t={tokens}
[ "${{FINETUNE_CUDA_GRAPHS:-}}" = 0 ] && t=$((t + 100))
printf '{{"tokens_per_second": %s, "peak_device_mib": 700, "first_loss": 2.0, "last_loss": 1.5}}\n' $t
"#
    );
    fs::write(&path, script).unwrap();
    Command::new("chmod").arg("+x").arg(&path).status().unwrap();
}

#[test]
fn rounds_alternate_order_and_env_reaches_each_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("bench-gpu-script-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    for sub in ["scripts", ".gpu", "out"] {
        fs::create_dir_all(dir.join(sub)).unwrap();
    }
    fs::copy(
        root.join("scripts/bench_gpu.sh"),
        dir.join("scripts/bench_gpu.sh"),
    )
    .unwrap();
    stand_in(&dir, "finetune", 1000);
    stand_in(&dir, "finetune_base", 1000);
    let out = Command::new("bash")
        .arg(dir.join("scripts/bench_gpu.sh"))
        .args(["--seq 8", "--fail", "--seq 16"])
        .env("OUT", dir.join("out"))
        .env("ROUNDS", "3")
        .env("NEW_ENV", "FINETUNE_CUDA_GRAPHS=0")
        .env("BASE_ENV", "FINETUNE_CUDA_GRAPHS=1")
        .env_remove("KERNEL_VARIANTS")
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed configuration fails the script"
    );
    assert!(stdout.contains("--fail new: finetune bench failed (exit status 3)"));

    let log = fs::read_to_string(dir.join(".gpu/runs.log")).unwrap();
    let runs: Vec<&str> = log.lines().collect();
    let expected = |seq: &str| {
        [
            "finetune",
            "finetune_base",
            "finetune_base",
            "finetune",
            "finetune",
            "finetune_base",
        ]
        .map(|name| {
            let graphs = if name == "finetune" { 0 } else { 1 };
            format!("{name} {graphs} bench --device cuda:0 --seq {seq}")
        })
    };
    let mut want: Vec<String> = expected("8").into();
    want.push("finetune 0 bench --device cuda:0 --fail".into());
    want.extend(expected("16"));
    assert_eq!(
        runs, want,
        "runs in alternating order, each with its environment"
    );

    for seq in ["8", "16"] {
        let ratio = format!("--seq {seq}");
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&ratio) && l.contains("new/base"))
            .expect("a ratio line per configuration");
        assert!(
            line.contains("tokens/s 1.100 (rounds: 1.100, 1.100, 1.100), peak +0 MiB"),
            "{line}"
        );
    }
    let kept = fs::read_to_string(dir.join("out/bench-3.json")).unwrap();
    assert_eq!(kept.matches("\"name\": \"base\"").count(), 3, "{kept}");
    assert!(kept.contains("\"args\": \"--seq 16\""), "{kept}");
    assert!(
        !dir.join("out/bench-2.json").exists(),
        "no file for the failed one"
    );
    fs::remove_dir_all(&dir).unwrap();
}
