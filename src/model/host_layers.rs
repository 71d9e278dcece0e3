//! Decoder layers whose projection matrices stay in host memory (bf16 base weights, or the
//! codes of NF4 ones, on a GPU): which layers, and when a training pass brings their copies to
//! the device.
//!
//! Each such layer costs no device memory between passes; a pass copies its seven matrices over
//! on a stream of their own ahead of the layer, so the copy overlaps the layers before it: the
//! forward pass's copy of a host layer starts once the previous host layer has run (or, when
//! that is the layer right before it, as that one starts), the backward pass's first right
//! after the loss. The device holds one host layer's copy at a time, two where host layers are
//! adjacent (the next one comes over while this one runs). A copy is given the resident layers
//! before it (in the pass's order) to arrive, so they are spread to give every forward copy the
//! same number, the backward's first half as many (a layer's backward takes about twice its
//! forward). A bf16 layer's copy (~420 MiB on Llama 3 8B) takes about as long as its forward,
//! so adjacent bf16 host layers make the pass wait on the bus; an NF4 layer's codes (~105 MiB)
//! come over in a quarter of it.

use super::weights::DecoderWeights;
use crate::backend::{Backend, DeviceCopy};
use crate::error::{Error, Result};

/// The layers of a `num_layers`-layer decoder (n) kept in host memory when `count` (c ≤ n) of
/// them are: `⌊k·(2n + 1)/(2c + 1)⌋ − 1` for `k = 1..=c`, i.e. c equal runs of resident layers,
/// each ending at a host layer, and half a run after the last (the backward's first copy comes
/// over while those run); runs are empty (adjacent host layers) when c > (n − 2)/2. (6, 13, 20
/// and 27 of Llama 3 8B's 32 layers for 4; 4, 9, 14, 19 and 24 of Gemma 7B's 28 for 5; all of
/// them for 32.)
pub fn host_layer_indices(num_layers: usize, count: usize) -> Result<Vec<usize>> {
    if count > num_layers {
        return Err(Error::InvalidArgument(format!(
            "layers_in_host: {count} layers asked for; the model has {num_layers}"
        )));
    }
    let (n, c) = (2 * num_layers + 1, 2 * count + 1);
    Ok((1..=count).map(|k| k * n / c - 1).collect())
}

/// The device copies of the host layers during one pass over the layers (two at most).
pub(super) struct LayerCopies<'a, B: Backend> {
    be: &'a B,
    weights: &'a DecoderWeights<B>,
    /// Whether a copy is started in shares over the layers before its own (`paced`).
    paced: bool,
    /// The layers whose copies are on the device or on their way, and the copies of their
    /// matrices.
    held: Vec<Held<'a, B>>,
}

/// A host layer being brought over: the copies of its first `copies.len()` matrices started.
struct Held<'a, B: Backend> {
    layer: usize,
    copies: Vec<DeviceCopy<'a, B>>,
}

impl<'a, B: Backend> LayerCopies<'a, B> {
    /// Each host layer's copy started whole as soon as it is due ([`copies_due`]).
    pub(super) fn new(be: &'a B, weights: &'a DecoderWeights<B>) -> Self {
        LayerCopies {
            be,
            weights,
            paced: false,
            held: Vec::new(),
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
    /// starts the copies of the host layers' matrices due by now ([`copies_due`]).
    pub(super) fn before(&mut self, rest: impl IntoIterator<Item = usize>) -> Result<()> {
        let layers = &self.weights.layers;
        let rest: Vec<usize> = rest.into_iter().collect();
        for (ahead, l) in copies_due(&rest, |l| layers[l].in_host) {
            let i = match self.held.iter().position(|h| h.layer == l) {
                Some(i) => i,
                None => {
                    self.held.push(Held {
                        layer: l,
                        copies: Vec::new(),
                    });
                    self.held.len() - 1
                }
            };
            let held = &mut self.held[i];
            let waiting = &layers[l].proj[held.copies.len()..];
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
        }
        Ok(())
    }

    /// After `layer` ran (its last product queued): releases its copy if it is held.
    pub(super) fn after(&mut self, layer: usize) {
        self.held.retain(|h| h.layer != layer);
    }
}

/// The host layers whose copies come over before layer `rest[0]` runs (`rest`: it and the layers
/// after it in the pass's order), each with how many layers run before it (this one included):
/// the first host layer among them and, when that is this layer, the next one too if it is a
/// host layer (its copy then overlaps this layer).
fn copies_due(rest: &[usize], in_host: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
    let Some(first) = rest.iter().position(|&l| in_host(l)) else {
        return Vec::new();
    };
    let mut due = vec![(first, rest[first])];
    if first == 0 && rest.get(1).is_some_and(|&l| in_host(l)) {
        due.push((1, rest[1]));
    }
    due
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
        assert_eq!(host_layer_indices(4, 4).unwrap(), [0, 1, 2, 3]);
        assert_eq!(host_layer_indices(5, 3).unwrap(), [0, 2, 3]);
        for n in 1..=80usize {
            for count in 1..=n {
                let l = host_layer_indices(n, count).unwrap();
                assert_eq!(l.len(), count);
                assert!(l.windows(2).all(|w| w[1] > w[0]), "{n} {count}: {l:?}");
                assert!(*l.last().unwrap() < n, "{n} {count}: {l:?}");
                if count <= n.saturating_sub(2) / 2 {
                    // A resident layer before each host layer and after the last.
                    assert!(l[0] >= 1, "{n} {count}: {l:?}");
                    assert!(l.windows(2).all(|w| w[1] >= w[0] + 2), "{n} {count}: {l:?}");
                    assert!(*l.last().unwrap() <= n - 2, "{n} {count}: {l:?}");
                }
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
    fn copies_come_over_one_host_layer_ahead_and_two_where_adjacent() {
        let host = |set: &'static [usize]| move |l: usize| set.contains(&l);
        // The next host layer, however far ahead.
        assert_eq!(copies_due(&[3, 4, 5, 6], host(&[6])), [(3, 6)]);
        // This one only: the next host layer is not the next layer.
        assert_eq!(copies_due(&[3, 4, 5], host(&[3, 5])), [(0, 3)]);
        // This one and the next.
        assert_eq!(copies_due(&[3, 4, 5], host(&[3, 4, 5])), [(0, 3), (1, 4)]);
        // The backward's order.
        assert_eq!(copies_due(&[5, 4, 3], host(&[5, 4])), [(0, 5), (1, 4)]);
        assert_eq!(copies_due(&[2, 1, 0], host(&[1, 0])), [(1, 1)]);
        assert_eq!(copies_due(&[7], host(&[7])), [(0, 7)]);
        assert_eq!(copies_due(&[3, 4], host(&[])), []);
        assert_eq!(copies_due(&[], host(&[1])), []);
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
    fn more_host_layers_than_layers_are_refused() {
        let e = host_layer_indices(32, 33).unwrap_err().to_string();
        assert!(e.contains("33 layers asked for; the model has 32"), "{e}");
        assert!(host_layer_indices(2, 2).is_ok());
    }
}
