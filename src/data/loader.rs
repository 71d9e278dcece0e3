//! The order in which rows are seen: a held-out eval split, a shuffle per epoch from the seed,
//! and batches addressed by (epoch, index) so that a resumed run sees exactly the same data.

use super::encode::Encoded;
use super::pack::{batch, pack, PackStats, Row};
use crate::error::{Error, Result};
use crate::rng::{derive, Rng};
use crate::train::batch::Batch;

/// How records become batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoaderConfig {
    pub max_len: usize,
    pub packing: bool,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Share of records held out for evaluation, in [0, 1).
    pub eval_fraction: f32,
    pub seed: u64,
    pub pad_id: i32,
}

/// Training and evaluation records, and the rows of each epoch.
pub struct DataLoader {
    cfg: LoaderConfig,
    train: Vec<Encoded>,
    eval: Vec<Encoded>,
}

/// Fisher–Yates shuffle of 0..n.
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    p
}

impl DataLoader {
    /// Splits `records` into training and evaluation sets (by a shuffle of the seed).
    pub fn new(records: Vec<Encoded>, cfg: LoaderConfig) -> Result<Self> {
        if cfg.batch_size == 0 || cfg.max_len < 2 {
            return Err(Error::InvalidArgument(
                "batch_size must be at least 1 and max_seq_len at least 2".into(),
            ));
        }
        if !(0.0..1.0).contains(&cfg.eval_fraction) {
            return Err(Error::InvalidArgument(format!(
                "eval_fraction {} must be in [0, 1)",
                cfg.eval_fraction
            )));
        }
        let n_eval = (records.len() as f64 * cfg.eval_fraction as f64).round() as usize;
        let order = permutation(records.len(), derive(cfg.seed, &[0xe7a1]));
        let mut slots: Vec<Option<Encoded>> = records.into_iter().map(Some).collect();
        let mut take = |idx: &[usize]| {
            idx.iter()
                .map(|&i| slots[i].take().expect("each index once"))
                .collect()
        };
        let eval = take(&order[..n_eval]);
        let train: Vec<Encoded> = take(&order[n_eval..]);
        if train.is_empty() {
            return Err(Error::InvalidArgument(
                "no training record left after the eval split".into(),
            ));
        }
        Ok(DataLoader { cfg, train, eval })
    }

    /// The rows of `epoch` in training order (records shuffled by `seed` and `epoch`, then packed).
    pub fn epoch_rows(&self, epoch: u64) -> (Vec<Row>, PackStats) {
        let order = permutation(self.train.len(), derive(self.cfg.seed, &[epoch]));
        let records: Vec<&Encoded> = order.iter().map(|&i| &self.train[i]).collect();
        pack(&records, self.cfg.max_len, self.cfg.packing)
    }

    /// Micro-batches in `epoch`.
    pub fn batches_in_epoch(&self, epoch: u64) -> usize {
        self.epoch_rows(epoch).0.len().div_ceil(self.cfg.batch_size)
    }

    /// Micro-batch `index` of a given epoch's rows.
    pub fn batch(&self, rows: &[Row], index: usize) -> Result<Batch> {
        let start = index * self.cfg.batch_size;
        let chunk: Vec<&Row> = rows[start..(start + self.cfg.batch_size).min(rows.len())]
            .iter()
            .collect();
        batch(&chunk, self.cfg.pad_id)
    }

    /// The evaluation rows as batches (empty without an eval split).
    pub fn eval_batches(&self) -> Result<Vec<Batch>> {
        let records: Vec<&Encoded> = self.eval.iter().collect();
        let (rows, _) = pack(&records, self.cfg.max_len, self.cfg.packing);
        rows.chunks(self.cfg.batch_size)
            .map(|c| batch(&c.iter().collect::<Vec<_>>(), self.cfg.pad_id))
            .collect()
    }

    pub fn train_records(&self) -> usize {
        self.train.len()
    }

    pub fn eval_records(&self) -> usize {
        self.eval.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: usize) -> Vec<Encoded> {
        (0..n)
            .map(|i| Encoded {
                ids: vec![i as i32, 1, 2],
                target: vec![false, true, true],
            })
            .collect()
    }

    fn cfg() -> LoaderConfig {
        LoaderConfig {
            max_len: 8,
            packing: false,
            batch_size: 2,
            eval_fraction: 0.2,
            seed: 4,
            pad_id: 0,
        }
    }

    #[test]
    fn split_and_shuffle_are_deterministic_and_disjoint() {
        let a = DataLoader::new(records(10), cfg()).unwrap();
        let b = DataLoader::new(records(10), cfg()).unwrap();
        assert_eq!((a.train_records(), a.eval_records()), (8, 2));
        assert_eq!(a.epoch_rows(0), b.epoch_rows(0));
        assert_ne!(
            a.epoch_rows(0).0,
            a.epoch_rows(1).0,
            "epochs are shuffled differently"
        );
        let firsts = |rows: &[Row]| rows.iter().map(|r| r.ids[0]).collect::<Vec<_>>();
        let mut seen = firsts(&a.epoch_rows(0).0);
        seen.extend(a.eval.iter().map(|e| e.ids[0]));
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(a.batches_in_epoch(0), 4);
    }
}
