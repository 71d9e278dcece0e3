//! Data-parallel training over NCCL on GPUs. Each test skips (saying so) where it lacks the GPUs
//! it needs, unless FINETUNE_REQUIRE_GPU=1 makes a missing first GPU a failure (tests that need
//! two GPUs still skip on a machine with one, saying so).
//!
//! - A group of one rank (a process group of world size 1) runs every piece of the machinery
//!   (NCCL communicator, per-layer sums on their own stream, host sums, waits) on one GPU and must
//!   train exactly like a lone GPU: a sum over one rank changes no value, so the losses agree to
//!   1e-6 relative.
//! - A rank whose peers never join fails with `Error::Collective` within its timeout.
//! - Two GPUs of one process ("cuda:0,cuda:1") against one GPU on the whole batch: each GPU
//!   computes its rows exactly as the lone GPU does; only the order of f32 sums over rows
//!   differs (the gradient products and the cross-entropy total), so the losses agree within
//!   1e-3 relative over several steps.

mod common;

use common::gpu::{next_token_batch, tensor_core_shape};
use common::quick_train_config;

use finetune::api::{nccl_unique_id, Device, Model, ModelParams, ProcessGroup, Trainer};
use finetune::backend::cuda::CudaBackend;
use finetune::lora::LoraConfig;
use finetune::model::config::{Family, ModelConfig};
use finetune::train::batch::Batch;
use finetune::train::run::{run, RunConfig};
use finetune::Error;
use std::path::Path;
use std::time::{Duration, Instant};

/// The number of usable GPUs, or `None` (saying so) where there is none.
fn gpus(needed: usize, test: &str) -> Option<usize> {
    let count = match CudaBackend::device_count() {
        Ok(n) if n > 0 => n,
        other => {
            if std::env::var("FINETUNE_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("FINETUNE_REQUIRE_GPU=1 but no GPU is usable: {other:?}");
            }
            eprintln!("skipping {test}: no CUDA GPU ({other:?})");
            return None;
        }
    };
    if count < needed {
        eprintln!("skipping {test}: it needs {needed} GPUs, this machine has {count}");
        return None;
    }
    Some(count)
}

/// A tiny model whose attention takes the tensor-core path (head_dim 64).
fn shape() -> ModelConfig {
    tensor_core_shape(Family::Llama)
}

fn batch(seed: u64, rows: usize, seq: usize) -> Batch {
    next_token_batch(rows, seq, 64, seed).1
}

/// Losses of `steps` steps on `b` and the final evaluation loss.
fn trajectory(params: &ModelParams, b: &Batch, steps: usize) -> (Vec<f32>, f32) {
    let model = Model::random(shape(), 11, params).unwrap();
    let mut t = Trainer::new(&model, LoraConfig::default(), quick_train_config()).unwrap();
    let losses = (0..steps)
        .map(|_| t.step(std::slice::from_ref(b)).unwrap().loss)
        .collect();
    (losses, t.eval_loss(b).unwrap())
}

fn on(device: Device) -> ModelParams {
    ModelParams {
        device,
        ..ModelParams::default()
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let rel = ((g - w) / w).abs();
        assert!(
            rel <= tol,
            "{what}: step {i}: {g} vs {w} (rel {rel:.2e} > {tol:.0e})"
        );
    }
}

#[test]
fn a_group_of_one_rank_trains_like_a_lone_gpu() {
    if gpus(1, "a_group_of_one_rank_trains_like_a_lone_gpu").is_none() {
        return;
    }
    let b = batch(1, 3, 48);
    let group = ModelParams {
        process_group: Some(ProcessGroup {
            rank: 0,
            world_size: 1,
            unique_id: nccl_unique_id().unwrap(),
        }),
        ..on(Device::Cuda(0))
    };
    let (alone, alone_eval) = trajectory(&on(Device::Cuda(0)), &b, 4);
    let (grouped, grouped_eval) = trajectory(&group, &b, 4);
    eprintln!("alone {alone:?} -> {alone_eval}; group of one {grouped:?} -> {grouped_eval}");
    assert_close("group of one", &grouped, &alone, 1e-6);
    assert_close("eval", &[grouped_eval], &[alone_eval], 1e-6);
    assert!(alone[3] < alone[0], "the loss did not fall: {alone:?}");
}

#[test]
fn a_rank_whose_peers_never_join_fails_within_its_timeout() {
    if gpus(1, "a_rank_whose_peers_never_join_fails_within_its_timeout").is_none() {
        return;
    }
    let params = ModelParams {
        process_group: Some(ProcessGroup {
            rank: 0,
            world_size: 2,
            unique_id: nccl_unique_id().unwrap(),
        }),
        collective_timeout: Duration::from_secs(3),
        ..on(Device::Cuda(0))
    };
    let t0 = Instant::now();
    let result = Model::random(shape(), 11, &params);
    let took = t0.elapsed();
    eprintln!("joining alone took {took:?}");
    match result {
        Err(Error::Collective(m)) => assert!(m.contains("rank 0 of 2"), "{m}"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a group of two formed with one rank"),
    }
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn two_gpus_train_like_one_on_the_whole_batch() {
    if gpus(2, "two_gpus_train_like_one_on_the_whole_batch").is_none() {
        return;
    }
    // 5 rows: shares of 2 and 3 rows, so the ranks' labelled counts differ.
    let b = batch(2, 5, 64);
    let (alone, alone_eval) = trajectory(&on(Device::Cuda(0)), &b, 4);
    let (pair, pair_eval) = trajectory(&on(Device::CudaSet(vec![0, 1])), &b, 4);
    eprintln!("one GPU {alone:?} -> {alone_eval}; two GPUs {pair:?} -> {pair_eval}");
    assert_close("two GPUs", &pair, &alone, 1e-3);
    assert_close("eval", &[pair_eval], &[alone_eval], 1e-3);
}

fn run_config(data: &Path, out: &Path) -> RunConfig {
    RunConfig {
        dataset: data.to_path_buf(),
        output_dir: out.to_path_buf(),
        max_seq_len: 128,
        packing: false,
        batch_size: 3,
        epochs: 3,
        save_every: 2,
        seed: 5,
        train: quick_train_config(),
        ..RunConfig::default()
    }
}

/// A model that is rank `rank` of a two-rank process group on GPU `rank`.
fn rank_of_two(dir: &Path, rank: usize, id: [u8; 128]) -> Model {
    let params = ModelParams {
        process_group: Some(ProcessGroup {
            rank,
            world_size: 2,
            unique_id: id,
        }),
        collective_timeout: Duration::from_secs(60),
        ..on(Device::Cuda(rank))
    };
    Model::load(dir, &params).unwrap()
}

/// A whole run (`train::run`) by a group of two processes, here two threads each holding a
/// model that is one rank of a process group on its own GPU, each with its own output
/// directory: only rank 0 writes metrics, checkpoints and the adapter; both ranks end with the
/// same loss (the group's), which equals one GPU running the whole batches within bf16 drift.
#[test]
fn a_run_of_two_ranks_writes_from_rank_zero_only() {
    if gpus(2, "a_run_of_two_ranks_writes_from_rank_zero_only").is_none() {
        return;
    }
    let dir = common::tiny_chat_model_dir();
    let data = dir.path().join("data.jsonl");
    std::fs::write(&data, common::CHAT_DATA).unwrap();
    let config = |out: &Path| run_config(&data, out);
    let alone_out = tempfile::tempdir().unwrap();
    let alone_model = Model::load(dir.path(), &on(Device::Cuda(0))).unwrap();
    let alone = run(&alone_model, &config(alone_out.path()), &mut |_| true).unwrap();
    drop(alone_model);

    let id = nccl_unique_id().unwrap();
    let outs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let summaries: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let (out, config, dir) = (outs[rank].path(), &config, dir.path());
                s.spawn(move || {
                    let model = rank_of_two(dir, rank, id);
                    run(&model, &config(out), &mut |_| true).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!(
        "alone: {:?} in {} steps; ranks: {:?} / {:?}",
        alone.final_loss, alone.steps, summaries[0].final_loss, summaries[1].final_loss
    );
    let written = |rank: usize| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(outs[rank].path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let zero = written(0);
    for name in ["adapter", "checkpoints", "metrics.jsonl", "loss.svg"] {
        assert!(zero.contains(&name.to_string()), "rank 0 wrote {zero:?}");
    }
    assert!(outs[0]
        .path()
        .join("adapter/adapter_model.safetensors")
        .is_file());
    let one = written(1);
    assert!(
        one.iter().all(|n| n == "checkpoints"),
        "rank 1 wrote {one:?}"
    );
    assert!(
        std::fs::read_dir(outs[1].path().join("checkpoints"))
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "rank 1 wrote a checkpoint"
    );
    assert_eq!(summaries[0].final_loss, summaries[1].final_loss);
    assert_eq!(summaries[0].steps, alone.steps);
    let (a, g) = (alone.final_loss.unwrap(), summaries[0].final_loss.unwrap());
    assert!(((a - g) / a).abs() < 1e-2, "alone {a}, group {g}");
}

/// A two-rank run in one shared output directory, stopped by both ranks after step 3 and run
/// again, resumes on both ranks from rank 0's checkpoint and writes the same metrics as an
/// uninterrupted two-rank run.
#[test]
fn a_run_of_two_ranks_stopped_and_resumed_matches_an_uninterrupted_one() {
    if gpus(
        2,
        "a_run_of_two_ranks_stopped_and_resumed_matches_an_uninterrupted_one",
    )
    .is_none()
    {
        return;
    }
    let dir = common::tiny_chat_model_dir();
    let data = dir.path().join("data.jsonl");
    std::fs::write(&data, common::CHAT_DATA).unwrap();
    let (stopped, whole) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let id = nccl_unique_id().unwrap();
    let resumed_from: Vec<Option<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let (dir, data) = (dir.path(), &data);
                let (stopped, whole) = (stopped.path(), whole.path());
                s.spawn(move || {
                    let model = rank_of_two(dir, rank, id);
                    let first = run(&model, &run_config(data, stopped), &mut |p| {
                        p.stats.step < 3
                    });
                    assert!(
                        matches!(first, Err(Error::Cancelled)),
                        "rank {rank}: {:?}",
                        first.map(|s| s.steps)
                    );
                    let resume = RunConfig {
                        resume: true,
                        ..run_config(data, stopped)
                    };
                    let again = run(&model, &resume, &mut |_| true).unwrap();
                    run(&model, &run_config(data, whole), &mut |_| true).unwrap();
                    again.resumed_from
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(resumed_from, vec![Some(3), Some(3)]);
    let metrics = |out: &Path| std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let losses = |text: &str| -> Vec<(u64, String)> {
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let loss = v.get("loss").or(v.get("eval_loss")).unwrap().to_string();
                (v["step"].as_u64().unwrap(), loss)
            })
            .collect()
    };
    let (a, b) = (
        losses(&metrics(stopped.path())),
        losses(&metrics(whole.path())),
    );
    eprintln!("stopped and resumed {a:?}\nuninterrupted {b:?}");
    assert_eq!(a, b);
}
