//! Turning encoded records into training rows: labels shifted by one and masked, several
//! records per row when packing (positions restart and segment ids keep attention inside each
//! record), and rows padded into batches.

use super::encode::Encoded;
use crate::backend::IGNORE_LABEL;
use crate::error::Result;
use crate::train::batch::Batch;

/// One row of tokens: `labels[t]` is the target after position t or [`IGNORE_LABEL`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Row {
    pub ids: Vec<i32>,
    pub labels: Vec<i32>,
    pub positions: Vec<i32>,
    pub segments: Vec<i32>,
}

impl Row {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn append(&mut self, ex: &Encoded, len: usize, segment: i32) {
        for t in 0..len {
            self.ids.push(ex.ids[t]);
            let next_is_target = t + 1 < len && ex.target[t + 1];
            self.labels.push(if next_is_target {
                ex.ids[t + 1]
            } else {
                IGNORE_LABEL
            });
            self.positions.push(t as i32);
            self.segments.push(segment);
        }
    }
}

/// What packing did.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PackStats {
    pub records: usize,
    /// Records cut to the maximum length.
    pub truncated: usize,
    /// Records left out because nothing in them (within the maximum length) is trained.
    pub without_targets: usize,
}

/// Rows of at most `max_len` tokens, in the order of `records`. With `packing`, consecutive
/// records share a row while they fit; otherwise each record has its own row.
pub fn pack(records: &[&Encoded], max_len: usize, packing: bool) -> (Vec<Row>, PackStats) {
    let mut stats = PackStats {
        records: records.len(),
        ..Default::default()
    };
    let mut rows = Vec::new();
    let mut current = Row::default();
    let mut segment = 0;
    for ex in records {
        let len = ex.ids.len().min(max_len);
        if len < ex.ids.len() {
            stats.truncated += 1;
        }
        if !ex.target[1..len.max(1)].iter().any(|&t| t) {
            stats.without_targets += 1;
            continue;
        }
        if !current.is_empty() && (!packing || current.len() + len > max_len) {
            rows.push(std::mem::take(&mut current));
            segment = 0;
        }
        current.append(ex, len, segment);
        segment += 1;
    }
    if !current.is_empty() {
        rows.push(current);
    }
    (rows, stats)
}

/// A batch of rows, each padded to the longest with `pad_id` (no loss, a segment of its own).
pub fn batch(rows: &[&Row], pad_id: i32) -> Result<Batch> {
    let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let n = rows.len() * seq;
    let (mut ids, mut labels, mut positions, mut segments) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for r in rows {
        let pad = seq - r.len();
        ids.extend(
            r.ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, pad)),
        );
        labels.extend(
            r.labels
                .iter()
                .copied()
                .chain(std::iter::repeat_n(IGNORE_LABEL, pad)),
        );
        positions.extend(r.positions.iter().copied().chain(0..pad as i32));
        segments.extend(
            r.segments
                .iter()
                .copied()
                .chain(std::iter::repeat_n(-1, pad)),
        );
    }
    let mut b = Batch::new(rows.len(), seq, ids, labels)?;
    b.positions = positions;
    b.segments = segments;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(ids: &[i32], target_from: usize) -> Encoded {
        Encoded {
            ids: ids.to_vec(),
            target: (0..ids.len()).map(|i| i >= target_from).collect(),
        }
    }

    #[test]
    fn packing_restarts_positions_and_separates_segments() {
        let (a, b, c) = (enc(&[1, 2, 3], 1), enc(&[4, 5], 1), enc(&[6, 7, 8, 9], 2));
        let (rows, stats) = pack(&[&a, &b, &c], 6, true);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].ids, [1, 2, 3, 4, 5]);
        assert_eq!(rows[0].positions, [0, 1, 2, 0, 1]);
        assert_eq!(rows[0].segments, [0, 0, 0, 1, 1]);
        // The last token of a record never predicts the first token of the next one.
        assert_eq!(rows[0].labels, [2, 3, IGNORE_LABEL, 5, IGNORE_LABEL]);
        assert_eq!(rows[1].labels, [IGNORE_LABEL, 8, 9, IGNORE_LABEL]);
        assert_eq!(
            stats,
            PackStats {
                records: 3,
                truncated: 0,
                without_targets: 0
            }
        );
    }

    #[test]
    fn without_packing_each_record_has_a_row_and_batches_pad() {
        let (a, b) = (enc(&[1, 2, 3], 1), enc(&[4, 5], 1));
        let (rows, _) = pack(&[&a, &b], 8, false);
        assert_eq!(rows.len(), 2);
        let bt = batch(&[&rows[0], &rows[1]], 0).unwrap();
        assert_eq!(bt.input_ids, [1, 2, 3, 4, 5, 0]);
        assert_eq!(
            bt.labels,
            [2, 3, IGNORE_LABEL, 5, IGNORE_LABEL, IGNORE_LABEL]
        );
        assert_eq!(bt.segments[5], -1);
    }

    #[test]
    fn long_records_are_cut_and_untrained_ones_dropped() {
        let (long, none) = (enc(&[1, 2, 3, 4, 5], 1), enc(&[6, 7, 8], 9));
        let (rows, stats) = pack(&[&long, &none], 3, true);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].ids, [1, 2, 3]);
        assert_eq!((stats.truncated, stats.without_targets), (1, 1));
    }
}
