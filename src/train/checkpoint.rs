//! Crash-safe checkpoints: adapter, optimizer moments, step and data position.
//!
//! A checkpoint is written into `checkpoints/step-NNNNNNNN.partial/` (every file fsynced), then
//! renamed to `checkpoints/step-NNNNNNNN/`, and only then named in `checkpoints/latest` (itself
//! replaced atomically). A crash at any point leaves the last complete checkpoint in place: a
//! `.partial` directory is never read and is cleared by the next save.

use crate::api::{Model, Trainer};
use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::io::safetensors::{write_safetensors, Dtype, SafetensorsFile};
use crate::train::trainer::TrainConfig;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where training stands, besides the tensors.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps taken.
    pub step: u64,
    /// The data position of the next step: epoch and step within it.
    pub epoch: u64,
    pub step_in_epoch: u64,
    /// Seed of data order and dropout (the whole random state: both are derived from it).
    pub seed: u64,
    /// Identifies the run's settings; resuming with other settings is refused.
    pub fingerprint: String,
}

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const LATEST_FILE: &str = "latest";

fn dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| Error::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    io(dir, std::fs::File::open(dir).and_then(|d| d.sync_all()))
}

/// Writes a checkpoint under `root` and keeps the newest `keep` (at least one).
pub fn save(
    root: &Path,
    trainer: &Trainer,
    state: &CheckpointState,
    keep: usize,
) -> Result<PathBuf> {
    io(root, std::fs::create_dir_all(root))?;
    let name = dir_name(state.step);
    let partial = root.join(format!("{name}.partial"));
    if partial.exists() {
        io(&partial, std::fs::remove_dir_all(&partial))?;
    }
    trainer.save_adapter(&partial)?;
    let [m, v] = trainer.moments_host()?;
    let mut host = Vec::new();
    for (kind, set) in [("exp_avg", m), ("exp_avg_sq", v)] {
        for (i, (r, c, values)) in set.into_iter().enumerate() {
            host.push((format!("{kind}.{i:05}"), vec![r, c], values));
        }
    }
    let views: Vec<_> = host
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice()))
        .collect();
    write_safetensors(
        &partial.join(OPTIMIZER_FILE),
        &views,
        Dtype::F32,
        &BTreeMap::new(),
    )?;
    let json = serde_json::to_string_pretty(state).expect("state serializes");
    write_atomic(&partial.join(STATE_FILE), |f| {
        std::io::Write::write_all(f, json.as_bytes())
    })?;
    let done = root.join(&name);
    if done.exists() {
        io(&done, std::fs::remove_dir_all(&done))?;
    }
    io(&done, std::fs::rename(&partial, &done))?;
    sync_dir(root)?;
    write_atomic(&root.join(LATEST_FILE), |f| {
        std::io::Write::write_all(f, name.as_bytes())
    })?;
    prune(root, keep.max(1))?;
    Ok(done)
}

/// Complete checkpoints under `root`, oldest first.
fn complete(root: &Path) -> Result<Vec<PathBuf>> {
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut dirs: Vec<PathBuf> = io(root, std::fs::read_dir(root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("step-") && !name.ends_with(".partial") && p.join(STATE_FILE).is_file()
        })
        .collect();
    dirs.sort();
    Ok(dirs)
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let dirs = complete(root)?;
    for old in &dirs[..dirs.len().saturating_sub(keep)] {
        io(old, std::fs::remove_dir_all(old))?;
    }
    Ok(())
}

/// The newest complete checkpoint: the one `latest` names, else the highest complete step.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    if let Ok(name) = std::fs::read_to_string(root.join(LATEST_FILE)) {
        let dir = root.join(name.trim());
        if dir.join(STATE_FILE).is_file() {
            return Ok(Some(dir));
        }
    }
    Ok(complete(root)?.pop())
}

/// Rebuilds the trainer of a checkpoint on `model`.
pub fn load(dir: &Path, model: &Model, train: TrainConfig) -> Result<(Trainer, CheckpointState)> {
    let state_path = dir.join(STATE_FILE);
    let state: CheckpointState = serde_json::from_value(crate::io::json::read_json(&state_path)?)
        .map_err(|e| Error::format(&state_path, e.to_string()))?;
    let mut trainer = Trainer::from_adapter(model, dir, train)?;
    let file = SafetensorsFile::open(&dir.join(OPTIMIZER_FILE))?;
    let shapes = trainer.param_shapes();
    let mut moments = [Vec::new(), Vec::new()];
    for (kind, set) in ["exp_avg", "exp_avg_sq"].iter().zip(moments.iter_mut()) {
        for (i, &(r, c)) in shapes.iter().enumerate() {
            let name = format!("{kind}.{i:05}");
            let info = file.info(&name).ok_or_else(|| {
                Error::format(file.path(), format!("missing optimizer tensor {name:?}"))
            })?;
            if info.shape != [r, c] {
                return Err(Error::format(
                    file.path(),
                    format!(
                        "optimizer tensor {name:?} has shape {:?}, the adapter needs [{r}, {c}]",
                        info.shape
                    ),
                ));
            }
            set.push(file.read_f32(&name)?);
        }
    }
    let [m, v] = moments;
    trainer.restore_optimizer(&m, &v, state.step)?;
    Ok((trainer, state))
}
