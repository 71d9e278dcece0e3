//! Decoder layers whose projection matrices stay in host memory (bf16 base weights on a GPU):
//! which layers, and when a training pass brings their copies to the device.
//!
//! Each such layer costs no device memory between passes; a pass copies its seven matrices over
//! on a stream of their own ahead of the layer, one layer at a time, so the device holds at most
//! one of them and the copy overlaps the layers before it: the forward pass's copy of a host
//! layer starts once the previous one has run, the backward pass's first right after the loss.
//! A copy is given the resident layers before it (in the pass's order) to arrive, so they are
//! spread to give every forward copy the same number, the backward's first half as many (a
//! layer's backward takes about twice its forward).

use super::weights::DecoderWeights;
use crate::backend::{Backend, DeviceCopy};
use crate::error::{Error, Result};

/// The layers of a `num_layers`-layer decoder (n) kept in host memory when `count` (c) of them
/// are: `⌊k·(2n + 1)/(2c + 1)⌋ − 1` for `k = 1..=c`, i.e. c equal runs of resident layers, each
/// ending at a host layer, and half a run after the last (the backward's first copy comes over
/// while those run). At most `(n − 2)/2`: a resident layer before each host layer and one after
/// the last (6, 13, 20 and 27 of Llama 3 8B's 32 layers for 4; 4, 9, 14, 19 and 24 of Gemma
/// 7B's 28 for 5).
pub fn host_layer_indices(num_layers: usize, count: usize) -> Result<Vec<usize>> {
    let most = num_layers.saturating_sub(2) / 2;
    if count > most {
        return Err(Error::InvalidArgument(format!(
            "layers_in_host: {count} of {num_layers} layers asked for; at most {most} can stay \
             in host memory (a resident layer before each and after the last)"
        )));
    }
    let (n, c) = (2 * num_layers + 1, 2 * count + 1);
    Ok((1..=count).map(|k| k * n / c - 1).collect())
}

/// The device copy of at most one host layer during one pass over the layers.
pub(super) struct LayerCopies<'a, B: Backend> {
    be: &'a B,
    weights: &'a DecoderWeights<B>,
    /// Whether a copy is started in shares over the layers before its own (`paced`).
    paced: bool,
    /// The layer whose copy is on the device or on its way, and the copies of its matrices.
    held: Option<Held<'a, B>>,
}

/// A host layer being brought over: the copies of its first `copies.len()` matrices started.
struct Held<'a, B: Backend> {
    layer: usize,
    copies: Vec<DeviceCopy<'a, B>>,
}

impl<'a, B: Backend> LayerCopies<'a, B> {
    /// Each host layer's copy started whole as soon as the previous one is released.
    pub(super) fn new(be: &'a B, weights: &'a DecoderWeights<B>) -> Self {
        LayerCopies {
            be,
            weights,
            paced: false,
            held: None,
        }
    }

    /// Each host layer's copy started in equal shares (whole matrices) over the layers before
    /// its own, the last share one layer ahead of it: for a pass whose other copies to the
    /// device (the backward's offloaded activations, on another stream) queue behind whatever
    /// the copy engine was given first, so each waits behind one share at most, not a layer.
    pub(super) fn paced(be: &'a B, weights: &'a DecoderWeights<B>) -> Self {
        LayerCopies {
            paced: true,
            ..Self::new(be, weights)
        }
    }

    /// Before a layer runs, `rest` being that layer and the ones after it in the pass's order:
    /// when no copy is held, starts bringing over the first host layer among them; then starts
    /// the copies of the held layer's matrices due by now.
    pub(super) fn before(&mut self, rest: impl IntoIterator<Item = usize>) -> Result<()> {
        let layers = &self.weights.layers;
        let held = self.held.as_ref().map(|h| h.layer);
        // `ahead`: the layers that run before the held (or next host) layer, this one included.
        let Some((ahead, l)) = rest
            .into_iter()
            .enumerate()
            .find(|&(_, l)| held.map_or(layers[l].in_host, |h| h == l))
        else {
            return Ok(());
        };
        let held = self.held.get_or_insert_with(|| Held {
            layer: l,
            copies: Vec::new(),
        });
        let waiting = &layers[l].proj[held.copies.len()..];
        if waiting.is_empty() {
            return Ok(());
        }
        let sizes: Vec<usize> = waiting
            .iter()
            .map(|w| {
                let (rows, cols) = self.be.shape(w);
                rows * cols
            })
            .collect();
        for w in &waiting[..due_now(&sizes, self.paced.then_some(ahead))] {
            held.copies.push(DeviceCopy::bring(self.be, w)?);
        }
        Ok(())
    }

    /// After `layer` ran (its last product queued): releases its copy if it is held.
    pub(super) fn after(&mut self, layer: usize) {
        if self.held.as_ref().is_some_and(|h| h.layer == layer) {
            self.held = None;
        }
    }
}

/// How many of the matrices not yet started (`sizes`, in values) to start now: all of them, or
/// when paced with `ahead` layers to run before theirs (this one included), whole matrices up
/// to an equal share of their values (at least one), all of them one layer ahead.
fn due_now(sizes: &[usize], paced: Option<usize>) -> usize {
    let share = match paced {
        Some(ahead) if ahead > 1 => sizes.iter().sum::<usize>().div_ceil(ahead),
        _ => return sizes.len(),
    };
    let mut started = 0;
    let within = sizes
        .iter()
        .take_while(|&&size| {
            started += size;
            started <= share
        })
        .count();
    within.max(1).min(sizes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_layers_spread_in_equal_runs_with_half_a_run_after_the_last() {
        assert_eq!(host_layer_indices(32, 4).unwrap(), [6, 13, 20, 27]);
        assert_eq!(host_layer_indices(28, 5).unwrap(), [4, 9, 14, 19, 24]);
        assert_eq!(host_layer_indices(32, 1).unwrap(), [20]);
        assert_eq!(host_layer_indices(32, 0).unwrap(), Vec::<usize>::new());
        assert_eq!(host_layer_indices(32, 15).unwrap().len(), 15);
        for n in 1..=80usize {
            for count in 1..=n.saturating_sub(2) / 2 {
                let l = host_layer_indices(n, count).unwrap();
                assert_eq!(l.len(), count);
                assert!(l[0] >= 1, "{n} {count}: {l:?}");
                assert!(l.windows(2).all(|w| w[1] >= w[0] + 2), "{n} {count}: {l:?}");
                assert!(*l.last().unwrap() <= n - 2, "{n} {count}: {l:?}");
                // Runs before the host layers differ by at most one layer.
                let runs: Vec<usize> = std::iter::once(l[0])
                    .chain(l.windows(2).map(|w| w[1] - w[0] - 1))
                    .collect();
                let (lo, hi) = (runs.iter().min().unwrap(), runs.iter().max().unwrap());
                assert!(hi - lo <= 1, "{n} {count}: {l:?}");
            }
        }
    }

    #[test]
    fn paced_copies_start_in_equal_shares_and_end_one_layer_ahead() {
        let sizes = [4, 1, 1, 4, 12, 12, 12];
        assert_eq!(due_now(&sizes, None), 7);
        assert_eq!(due_now(&sizes, Some(1)), 7);
        assert_eq!(due_now(&sizes, Some(0)), 7);
        // 46 values over 4 layers: shares of 12 (whole matrices, the first one over it).
        assert_eq!(due_now(&sizes, Some(4)), 4);
        assert_eq!(due_now(&sizes[4..], Some(3)), 1);
        assert_eq!(due_now(&sizes[5..], Some(2)), 1);
        assert_eq!(due_now(&sizes[6..], Some(1)), 1);
        assert_eq!(due_now(&[], Some(3)), 0);
        // One huge matrix first: still one at a time.
        assert_eq!(due_now(&[100, 1, 1], Some(3)), 1);
    }

    #[test]
    fn too_many_host_layers_are_refused_with_the_limit() {
        let e = host_layer_indices(32, 16).unwrap_err().to_string();
        assert!(e.contains("at most 15"), "{e}");
        assert!(host_layer_indices(2, 1).is_err());
    }
}
