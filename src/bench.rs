//! Training-step benchmark on random weights of named real shapes, printed as JSON by
//! `finetune bench`.

use crate::api::{Model, ModelParams, Trainer};
use crate::error::{Error, Result};
use crate::lora::LoraConfig;
use crate::model::presets::preset;
use crate::quant::Quantization;
use crate::rng::Rng;
use crate::train::batch::Batch;
use crate::train::trainer::TrainConfig;
use std::time::Instant;

/// What kind of fine-tuning a benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchMode {
    /// LoRA over frozen weights in the device's own format.
    Lora,
    /// QLoRA: the frozen projection matrices quantized to NF4 at load.
    Qlora,
}

impl BenchMode {
    /// Parses "lora" or "qlora".
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "lora" => Ok(BenchMode::Lora),
            "qlora" => Ok(BenchMode::Qlora),
            other => Err(Error::InvalidArgument(format!(
                "unknown bench mode {other:?} (expected lora or qlora)"
            ))),
        }
    }

    /// The storage of the frozen projection matrices in this mode.
    pub fn quantization(self) -> Quantization {
        match self {
            BenchMode::Lora => Quantization::None,
            BenchMode::Qlora => Quantization::Nf4,
        }
    }

    fn of(q: Quantization) -> Self {
        match q {
            Quantization::None => BenchMode::Lora,
            Quantization::Nf4 => BenchMode::Qlora,
        }
    }

    /// "lora" or "qlora".
    pub fn name(self) -> &'static str {
        match self {
            BenchMode::Lora => "lora",
            BenchMode::Qlora => "qlora",
        }
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub model: String,
    pub batch: usize,
    pub seq: usize,
    pub rank: usize,
    /// Steps timed after the warm-up steps (one, or two where the second records the pass).
    pub steps: usize,
    pub checkpointing: bool,
    /// Keep the saved layer inputs in pinned host memory (GPU backends).
    pub offload_activations: bool,
    /// [`TrainConfig::kept_mlp_layers`].
    pub kept_mlp_layers: usize,
    /// Device, threads, quantization (which decides the mode) and device-memory cap.
    pub params: ModelParams,
}

impl Default for BenchConfig {
    /// The defaults of `finetune bench` and `ft_bench_default_params()`: smollm2-135m, batch 4,
    /// seq 256, rank 16, 3 timed steps, checkpointing on, LoRA on the default device.
    fn default() -> Self {
        BenchConfig {
            model: "smollm2-135m".into(),
            batch: 4,
            seq: 256,
            rank: 16,
            steps: 3,
            checkpointing: true,
            offload_activations: false,
            kept_mlp_layers: 0,
            params: ModelParams::default(),
        }
    }
}

/// The measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub model: String,
    pub device: String,
    /// "lora", or "qlora" (NF4 projection matrices).
    pub mode: &'static str,
    /// Data-parallel ranks (GPUs) the step ran on; each took `batch` rows.
    pub ranks: usize,
    /// Rows per rank.
    pub batch: usize,
    pub seq: usize,
    pub rank: usize,
    pub checkpointing: bool,
    pub offload_activations: bool,
    /// [`TrainConfig::kept_mlp_layers`].
    pub kept_mlp_layers: usize,
    /// The LM head kept in host memory ([`ModelParams::lm_head_in_host`]).
    pub lm_head_in_host: bool,
    /// Decoder layers kept in host memory ([`ModelParams::layers_in_host`]).
    pub layers_in_host: usize,
    pub steps: usize,
    /// Whether the timed steps replayed a recorded pass (false: queued op by op, as on the CPU,
    /// with data-parallel ranks, past 2,048 tokens a rank, or where the recording's memory
    /// would pass the device-memory cap). The step that records it is a second, untimed
    /// warm-up step.
    pub replayed: bool,
    /// Median seconds per optimizer step over the timed steps.
    pub step_seconds_median: f64,
    /// Median CPU seconds (all threads) per timed step: unlike wall time, it barely moves when
    /// other processes share the cores. `null` where the OS does not report it.
    pub cpu_seconds_median: Option<f64>,
    pub tokens_per_second: f64,
    pub first_loss: f32,
    pub last_loss: f32,
    /// Peak resident memory of the process (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// Peak device memory held by the library's tensors (weights included), MiB; `null` on the
    /// CPU.
    pub peak_device_mib: Option<f64>,
    /// What the allocation that reached that peak was for; `null` on the CPU.
    pub peak_device_set_by: Option<String>,
    /// What the peak was made of: MiB held per purpose (as out-of-memory errors name them),
    /// largest first, those under 1 MiB summed into one "smaller purposes" entry; `null` on
    /// the CPU.
    pub peak_device_purposes_mib: Option<Vec<(String, f64)>>,
    /// Device memory held between steps (weights, adapters, optimizer state), MiB; `null` on
    /// the CPU.
    pub held_device_mib: Option<f64>,
    pub load_seconds: f64,
}

impl BenchResult {
    /// The JSON that `finetune bench` prints and `ft_bench` returns (pretty-printed).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a bench result serializes")
    }
}

/// Peak resident set size of this process in MiB, from /proc (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// CPU time used so far by the live threads of this process in seconds, from /proc (Linux).
pub fn cpu_seconds() -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 * 1e-9)
}

/// `bytes` in MiB.
fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// `purposes` (bytes, largest first) in MiB, those under 1 MiB summed into one last entry.
fn purposes_mib(purposes: &[(String, usize)]) -> Vec<(String, f64)> {
    let (large, small): (Vec<_>, Vec<_>) = purposes.iter().partition(|(_, b)| *b >= 1 << 20);
    let mut out: Vec<(String, f64)> = large.iter().map(|(w, b)| (w.clone(), mib(*b))).collect();
    if !small.is_empty() {
        let rest = small.iter().map(|(_, b)| b).sum();
        out.push(("smaller purposes".to_string(), mib(rest)));
    }
    out
}

/// The median of `xs` (sorted in place); `xs` is not empty.
fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The trainer of both measurements: rank `cfg.rank` (alpha equal to it) on all seven
/// projections, AdamW with the default settings over `total_steps`.
fn trainer_for(cfg: &BenchConfig, model: &Model, total_steps: u64) -> Result<Trainer> {
    let lora = LoraConfig {
        rank: cfg.rank,
        alpha: cfg.rank as f32,
        ..LoraConfig::default()
    };
    let train = TrainConfig {
        checkpointing: cfg.checkpointing,
        offload_activations: cfg.offload_activations,
        kept_mlp_layers: cfg.kept_mlp_layers,
        total_steps,
        ..TrainConfig::default()
    };
    Trainer::new(model, lora, train)
}

/// Builds the model, runs one warm-up step (two where the second records the pass) and `steps`
/// timed steps on random tokens.
pub fn run(cfg: &BenchConfig) -> Result<BenchResult> {
    for (name, value) in [
        ("steps", cfg.steps),
        ("batch", cfg.batch),
        ("seq", cfg.seq),
        ("rank", cfg.rank),
    ] {
        if value == 0 {
            return Err(Error::InvalidArgument(format!(
                "bench {name} is 0 (must be at least 1)"
            )));
        }
    }
    let shape = preset(&cfg.model)?;
    let t0 = Instant::now();
    let model = Model::random(shape.clone(), 1, &cfg.params)?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let mut trainer = trainer_for(cfg, &model, cfg.steps as u64 + 1)?;
    let mut rng = Rng::new(2);
    // Every rank takes `batch` rows of the step's batch.
    let ranks = model.world_size();
    let rows = cfg.batch * ranks;
    let n = rows.checked_mul(cfg.seq).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "bench batch {} x {ranks} ranks x seq {} is too large",
            cfg.batch, cfg.seq
        ))
    })?;
    let ids: Vec<i32> = (0..n + 1)
        .map(|_| (rng.next_u64() % shape.vocab_size as u64) as i32)
        .collect();
    let batch = Batch::new(rows, cfg.seq, ids[..n].to_vec(), ids[1..].to_vec())?;
    let first_loss = trainer.step(std::slice::from_ref(&batch))?.loss;
    // The step that records the pass is not a steady one: untimed too.
    if trainer.records_next_step() {
        trainer.step(std::slice::from_ref(&batch))?;
    }
    let mut times = Vec::with_capacity(cfg.steps);
    let mut cpu_times = Vec::with_capacity(cfg.steps);
    let mut last_loss = first_loss;
    for _ in 0..cfg.steps {
        let (t, cpu) = (Instant::now(), cpu_seconds());
        last_loss = trainer.step(std::slice::from_ref(&batch))?.loss;
        times.push(t.elapsed().as_secs_f64());
        cpu_times.extend(cpu.zip(cpu_seconds()).map(|(a, b)| b - a));
    }
    let median_wall = median(&mut times);
    let cpu_seconds_median = (cpu_times.len() == cfg.steps).then(|| median(&mut cpu_times));
    let memory = model.device_memory();
    Ok(BenchResult {
        model: cfg.model.clone(),
        device: model.device(),
        mode: BenchMode::of(cfg.params.quantization).name(),
        ranks,
        batch: cfg.batch,
        seq: cfg.seq,
        rank: cfg.rank,
        checkpointing: cfg.checkpointing,
        offload_activations: cfg.offload_activations,
        kept_mlp_layers: cfg.kept_mlp_layers,
        lm_head_in_host: cfg.params.lm_head_in_host,
        layers_in_host: cfg.params.layers_in_host,
        steps: cfg.steps,
        replayed: trainer.holds_recording(),
        step_seconds_median: median_wall,
        cpu_seconds_median,
        tokens_per_second: n as f64 / median_wall,
        first_loss,
        last_loss,
        peak_rss_mib: peak_rss_mib().unwrap_or(f64::NAN),
        peak_device_mib: memory.as_ref().map(|m| mib(m.peak_bytes)),
        held_device_mib: memory.as_ref().map(|m| mib(m.live_bytes)),
        peak_device_purposes_mib: memory.as_ref().map(|m| purposes_mib(&m.peak_purposes)),
        peak_device_set_by: memory.map(|m| m.peak_set_by),
        load_seconds,
    })
}

/// One training step of the longest-sequence search.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SeqProbe {
    pub seq: usize,
    pub fits: bool,
    /// Peak device memory of the step (MiB), when it fitted.
    pub peak_device_mib: Option<f64>,
    /// What held the device memory at that peak (MiB by purpose, largest first), when it fitted.
    pub peak_device_purposes_mib: Option<Vec<(String, f64)>>,
    /// What the allocation that reached the peak was, when it fitted.
    pub peak_device_set_by: Option<String>,
    /// The out-of-memory error, when it did not fit (the size asked for and what for).
    pub failure: Option<String>,
    pub seconds: f64,
}

/// The longest single-row sequence whose training step fits in `cfg`'s device-memory cap
/// (`cfg.params.max_device_memory_mib`, counted over every byte the library holds on the GPU:
/// weights, adapters, optimizer state, activations; not the CUDA context or cuBLAS workspace),
/// by `longest_fitting` from `cfg.seq` below `upper` (assumed not to fit) down to
/// `resolution` tokens. One model load; each probe is one step on fresh random tokens, handed
/// to `report` as it ends. Returns the longest sequence that fitted.
pub fn longest_sequence(
    cfg: &BenchConfig,
    upper: usize,
    resolution: usize,
    report: &mut dyn FnMut(&SeqProbe),
) -> Result<usize> {
    if cfg.seq == 0 || upper <= cfg.seq || resolution == 0 {
        return Err(Error::InvalidArgument(format!(
            "the search needs 0 < seq ({}) < upper ({upper}) and a resolution above 0",
            cfg.seq
        )));
    }
    let shape = preset(&cfg.model)?;
    let model = Model::random(shape.clone(), 1, &cfg.params)?;
    let mut trainer = trainer_for(cfg, &model, TrainConfig::default().total_steps)?;
    let mut rng = Rng::new(3);
    let mut probe = |seq: usize| -> Result<bool> {
        let ids: Vec<i32> = (0..seq + 1)
            .map(|_| (rng.next_u64() % shape.vocab_size as u64) as i32)
            .collect();
        let batch = Batch::new(1, seq, ids[..seq].to_vec(), ids[1..].to_vec())?;
        model.reset_peak_memory();
        let t = Instant::now();
        let failure = match trainer.step(std::slice::from_ref(&batch)) {
            Ok(_) => None,
            Err(e @ Error::OutOfMemory { .. }) => Some(e.to_string()),
            Err(e) => return Err(e),
        };
        let fits = failure.is_none();
        let memory = model.device_memory().filter(|_| fits);
        report(&SeqProbe {
            seq,
            fits,
            peak_device_mib: memory.as_ref().map(|m| mib(m.peak_bytes)),
            peak_device_purposes_mib: memory.as_ref().map(|m| purposes_mib(&m.peak_purposes)),
            peak_device_set_by: memory.map(|m| m.peak_set_by),
            failure,
            seconds: t.elapsed().as_secs_f64(),
        });
        Ok(fits)
    };
    longest_fitting(cfg.seq, upper, resolution, &mut probe)?.ok_or_else(|| {
        Error::InvalidArgument(format!(
            "no sequence of {resolution} tokens or more up to seq {} fits in the memory cap",
            cfg.seq
        ))
    })
}

/// The longest length `fits` accepts, below `upper` (assumed not to fit): from `lower`, halved
/// while it does not fit (each failure becoming the upper end), then bisected between the
/// longest fit and the shortest failure until they are at most `resolution` apart. `None` when
/// no length of at least `resolution` fits.
fn longest_fitting(
    lower: usize,
    upper: usize,
    resolution: usize,
    fits: &mut dyn FnMut(usize) -> Result<bool>,
) -> Result<Option<usize>> {
    let (mut fit, mut fails) = (lower, upper);
    while !fits(fit)? {
        fails = fit;
        fit /= 2;
        if fit < resolution.max(1) {
            return Ok(None);
        }
    }
    while fails - fit > resolution {
        let mid = fit + (fails - fit) / 2;
        if fits(mid)? {
            fit = mid;
        } else {
            fails = mid;
        }
    }
    Ok(Some(fit))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the search against a cap of `limit`, returning its answer and the lengths probed.
    fn search(
        lower: usize,
        upper: usize,
        resolution: usize,
        limit: usize,
    ) -> (Option<usize>, Vec<usize>) {
        let mut probed = Vec::new();
        let found = longest_fitting(lower, upper, resolution, &mut |n| {
            probed.push(n);
            Ok(n <= limit)
        })
        .unwrap();
        (found, probed)
    }

    #[test]
    fn the_search_bisects_up_from_a_lower_end_that_fits() {
        let (found, probed) = search(1_000, 100_000, 1_000, 43_210);
        let found = found.unwrap();
        assert!(
            found <= 43_210 && 43_210 - found < 1_000,
            "{found} {probed:?}"
        );
        assert_eq!(probed[0], 1_000);
        assert!(probed.len() <= 9, "{probed:?}");
    }

    #[test]
    fn a_lower_end_that_does_not_fit_is_halved_first() {
        let (found, probed) = search(160_000, 170_000, 2_048, 148_000);
        let found = found.unwrap();
        assert!(
            found <= 148_000 && 148_000 - found < 2_048,
            "{found} {probed:?}"
        );
        assert_eq!(&probed[..2], &[160_000, 80_000]);
        // Nothing at or above the first failure is probed again.
        assert!(probed[1..].iter().all(|&n| n < 160_000), "{probed:?}");
    }

    #[test]
    fn nothing_fitting_is_none() {
        assert_eq!(search(4_096, 8_192, 1_024, 900).0, None);
        assert_eq!(search(3, 8, 1, 0), (None, vec![3, 1]));
    }

    #[test]
    fn purposes_under_a_mib_are_summed_last() {
        let m = 1usize << 20;
        let purposes = [
            ("weights".to_string(), 3 * m),
            ("logits".to_string(), m),
            ("flag".to_string(), 4),
            ("sum".to_string(), m / 2),
        ];
        let out = purposes_mib(&purposes);
        let expected = [("weights", 3.0), ("logits", 1.0)];
        assert_eq!(out.len(), 3);
        for ((w, mib), (ew, emib)) in out.iter().zip(expected) {
            assert_eq!((w.as_str(), *mib), (ew, emib));
        }
        assert_eq!(out[2].0, "smaller purposes");
        assert!((out[2].1 - (m / 2 + 4) as f64 / m as f64).abs() < 1e-12);
        assert!(purposes_mib(&purposes[..2])
            .iter()
            .all(|(w, _)| w != "smaller purposes"));
    }
}
