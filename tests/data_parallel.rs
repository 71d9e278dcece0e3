//! Data-parallel training logic on the CPU: the trainer's side of the group (the labelled-token
//! total, per-layer gradient buckets, ranks with no share, the figures it reports) checked
//! against one trainer taking the whole batch. The sums run through `HostSum`, a test
//! implementation of `Collective` for CPU replicas in threads; the real one (NCCL) is checked on
//! GPUs by tests/cuda_data_parallel.rs. Also: batch shares, device lists and the checks on
//! group parameters, which need no GPU.

mod common;

use common::quick_train_config;
use finetune::api::{Device, Model, ModelParams, ProcessGroup};
use finetune::backend::collective::Collective;
use finetune::backend::cpu::CpuBackend;
use finetune::backend::Backend;
use finetune::lora::LoraConfig;
use finetune::model::config::Family;
use finetune::model::decoder::Decoder;
use finetune::model::presets::tiny;
use finetune::model::weights::DecoderWeights;
use finetune::rng::Rng;
use finetune::train::batch::Batch;
use finetune::train::trainer::{StepStats, Trainer};
use finetune::Error;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// A barrier that fails the test instead of hanging when a rank never arrives (ranks that
/// issue different sums).
struct Rendezvous {
    /// (ranks arrived, generation)
    state: Mutex<(usize, u64)>,
    turned: Condvar,
    n: usize,
}

impl Rendezvous {
    fn wait(&self) {
        let mut s = self.state.lock().unwrap();
        let generation = s.1;
        s.0 += 1;
        if s.0 == self.n {
            *s = (0, generation + 1);
            self.turned.notify_all();
            return;
        }
        let (_s, waited) = self
            .turned
            .wait_timeout_while(s, Duration::from_secs(20), |s| s.1 == generation)
            .unwrap();
        assert!(
            !waited.timed_out(),
            "a rank waited 20 s for the others: the ranks issued different sums"
        );
    }
}

/// Sums over CPU replicas running in threads of this test: every call is a rendezvous of all
/// ranks, which adds up what each deposited. Records the order of the calls.
struct HostSum {
    world: usize,
    barrier: Rendezvous,
    /// Per rank: the values deposited for the current call.
    deposits: Mutex<Vec<Vec<f64>>>,
    /// Per rank: (kind, values summed) of each call, in order.
    log: Mutex<Vec<Vec<(&'static str, usize)>>>,
}

/// One rank's handle on a [`HostSum`].
struct HostRank {
    rank: usize,
    group: Arc<HostSum>,
}

impl HostSum {
    fn new(world: usize) -> Arc<Self> {
        Arc::new(HostSum {
            world,
            barrier: Rendezvous {
                state: Mutex::new((0, 0)),
                turned: Condvar::new(),
                n: world,
            },
            deposits: Mutex::new(vec![Vec::new(); world]),
            log: Mutex::new(vec![Vec::new(); world]),
        })
    }
}

impl HostRank {
    /// Every rank deposits `values`; all get back the element-wise sum.
    fn all_sum(&self, kind: &'static str, values: &mut [f64]) {
        let g = &self.group;
        g.log.lock().unwrap()[self.rank].push((kind, values.len()));
        g.deposits.lock().unwrap()[self.rank] = values.to_vec();
        g.barrier.wait();
        {
            let d = g.deposits.lock().unwrap();
            assert!(
                d.iter().all(|v| v.len() == values.len()),
                "ranks issued sums of different sizes: {:?}",
                d.iter().map(Vec::len).collect::<Vec<_>>()
            );
            for (i, v) in values.iter_mut().enumerate() {
                *v = d.iter().map(|r| r[i]).sum();
            }
        }
        g.barrier.wait();
    }
}

impl Collective<CpuBackend> for HostRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.group.world
    }
    fn start_sum(
        &self,
        be: &CpuBackend,
        tensors: &mut [&mut <CpuBackend as Backend>::Tensor],
    ) -> finetune::Result<()> {
        let mut flat: Vec<f64> = Vec::new();
        for t in tensors.iter() {
            flat.extend(be.download(t)?.iter().map(|&x| x as f64));
        }
        self.all_sum("gradients", &mut flat);
        let mut at = 0;
        for t in tensors.iter_mut() {
            let (r, c) = be.shape(t);
            let vals: Vec<f32> = flat[at..at + r * c].iter().map(|&x| x as f32).collect();
            **t = be.upload(&vals, r, c)?;
            at += r * c;
        }
        Ok(())
    }
    fn wait(&self, _be: &CpuBackend) -> finetune::Result<()> {
        Ok(())
    }
    fn sum_host(&self, _be: &CpuBackend, values: &mut [f64]) -> finetune::Result<()> {
        self.all_sum("host", values);
        Ok(())
    }
}

fn decoder() -> Arc<Decoder<CpuBackend>> {
    let cfg = tiny(Family::Llama);
    let be = CpuBackend::new(1).unwrap();
    let weights = DecoderWeights::random(&cfg, &be, 5).unwrap();
    Arc::new(Decoder::new(cfg, be, weights))
}

/// `rows` rows of 9 tokens; some labels masked so the ranks' labelled counts differ.
fn batch(seed: u64, rows: usize) -> Batch {
    let mut rng = Rng::new(seed);
    let n = rows * 9;
    let ids: Vec<i32> = (0..n + 1).map(|_| (rng.next_u64() % 64) as i32).collect();
    let mut labels = ids[1..].to_vec();
    for (i, l) in labels.iter_mut().enumerate() {
        if i % 9 < (i / 9) % 4 {
            *l = finetune::backend::IGNORE_LABEL;
        }
    }
    Batch::new(rows, 9, ids[..n].to_vec(), labels).unwrap()
}

fn all_grads(t: &Trainer<CpuBackend>) -> Vec<f32> {
    let be = &t.decoder().backend;
    t.grads()
        .tensors()
        .flat_map(|g| be.download(g).unwrap())
        .collect()
}

/// Steps `world` ranks on their shares of `steps` (micro-batch lists); returns each step's
/// statistics and gradients from every rank, and the calls rank 0 made.
#[allow(clippy::type_complexity)]
fn group_steps(
    world: usize,
    steps: &[Vec<Batch>],
) -> (Vec<Vec<(StepStats, Vec<f32>)>>, Vec<(&'static str, usize)>) {
    let dec = decoder();
    let group = HostSum::new(world);
    let per_rank = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (dec, group) = (dec.clone(), group.clone());
                s.spawn(move || {
                    let mut t =
                        Trainer::new(dec, LoraConfig::default(), quick_train_config()).unwrap();
                    t.join_group(Arc::new(HostRank { rank, group }));
                    steps
                        .iter()
                        .map(|micro| {
                            let mine: Vec<Batch> =
                                micro.iter().filter_map(|b| b.share(rank, world)).collect();
                            let stats = t.step(&mine).unwrap();
                            (stats, all_grads(&t))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let log = group.log.lock().unwrap()[0].clone();
    (per_rank, log)
}

fn alone_steps(steps: &[Vec<Batch>]) -> Vec<(StepStats, Vec<f32>)> {
    let mut t = Trainer::new(decoder(), LoraConfig::default(), quick_train_config()).unwrap();
    steps
        .iter()
        .map(|micro| (t.step(micro).unwrap(), all_grads(&t)))
        .collect()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / scale)
        .fold(0f32, f32::max)
}

/// Two and three ranks (one of them with no rows in a step) against one trainer on the whole
/// batch, over three steps with gradient accumulation: same losses, token counts, gradients
/// and hence the same adapters. Tolerance 1e-5 of the largest gradient: only the order of f32
/// sums differs.
#[test]
fn a_group_steps_like_one_trainer_on_the_union_of_its_shares() {
    let steps = vec![
        vec![batch(1, 4)],
        vec![batch(2, 3), batch(3, 2)],
        vec![batch(4, 1)],
    ];
    let alone = alone_steps(&steps);
    for world in [2, 3] {
        let (ranks, _) = group_steps(world, &steps);
        for (rank, got) in ranks.iter().enumerate() {
            for (step, ((s, g), (sa, ga))) in got.iter().zip(&alone).enumerate() {
                let what = format!("{world} ranks, rank {rank}, step {step}");
                assert!(
                    ((s.loss - sa.loss) / sa.loss).abs() < 1e-5,
                    "{what}: loss {} vs {}",
                    s.loss,
                    sa.loss
                );
                assert_eq!(
                    (s.tokens, s.labelled_tokens),
                    (sa.tokens, sa.labelled_tokens),
                    "{what}"
                );
                let err = max_rel(g, ga);
                assert!(err < 1e-5, "{what}: gradients differ by {err:.2e}");
                assert!(g.iter().all(|x| x.is_finite()), "{what}");
            }
        }
    }
}

/// Each rank issues the same sums in the same order (NCCL's rule): the labelled count, one
/// bucket per layer from the last, then the loss and tokens.
#[test]
fn ranks_sum_the_count_then_one_bucket_per_layer_from_the_last_then_the_totals() {
    let layers = tiny(Family::Llama).num_layers;
    let (_, log) = group_steps(2, &[vec![batch(7, 1)]]);
    let kinds: Vec<&str> = log.iter().map(|(k, _)| *k).collect();
    let mut want = vec!["host"];
    want.extend(std::iter::repeat_n("gradients", layers));
    want.push("host");
    assert_eq!(kinds, want);
    assert_eq!((log[0].1, log.last().unwrap().1), (1, 2));
}

#[test]
fn shares_cover_every_row_once_and_differ_by_at_most_one() {
    let b = batch(9, 7);
    for world in 1..=9 {
        let shares: Vec<Option<Batch>> = (0..world).map(|r| b.share(r, world)).collect();
        let rows: Vec<usize> = shares
            .iter()
            .map(|s| s.as_ref().map_or(0, |s| s.batch_size))
            .collect();
        assert_eq!(rows.iter().sum::<usize>(), 7, "{world} ranks: {rows:?}");
        let (lo, hi) = (rows.iter().min().unwrap(), rows.iter().max().unwrap());
        assert!(hi - lo <= 1, "{world} ranks: {rows:?}");
        let ids: Vec<i32> = shares
            .iter()
            .flatten()
            .flat_map(|s| s.input_ids.clone())
            .collect();
        assert_eq!(ids, b.input_ids, "{world} ranks: rows out of order");
        let labels: Vec<i32> = shares
            .iter()
            .flatten()
            .flat_map(|s| s.labels.clone())
            .collect();
        assert_eq!(labels, b.labels);
    }
}

#[test]
fn device_lists_parse_and_repeats_are_refused() {
    assert_eq!(
        Device::parse("cuda:0,cuda:1").unwrap(),
        Device::CudaSet(vec![0, 1])
    );
    assert_eq!(
        Device::parse(" cuda:1 , cuda:3 ").unwrap(),
        Device::CudaSet(vec![1, 3])
    );
    assert_eq!(Device::parse("cuda:all").unwrap(), Device::CudaAll);
    assert_eq!(Device::parse("cuda:2").unwrap(), Device::Cuda(2));
    let err = Device::parse("cuda:0,cuda:0").unwrap_err().to_string();
    assert!(err.contains("twice"), "{err}");
    let err = Device::parse("cuda:0,cpu").unwrap_err().to_string();
    assert!(err.contains("\"cpu\""), "{err}");
}

#[test]
fn a_process_group_needs_one_gpu_named() {
    let params = ModelParams {
        device: Device::Cpu,
        process_group: Some(ProcessGroup {
            rank: 0,
            world_size: 2,
            unique_id: [0; 128],
        }),
        ..ModelParams::default()
    };
    match Model::random(tiny(Family::Llama), 1, &params) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("cuda:N"), "{m}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a CPU model joined a process group"),
    }
}
