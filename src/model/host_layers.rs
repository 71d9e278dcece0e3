//! Decoder layers whose projection matrices stay in host memory (bf16 base weights on a GPU):
//! which layers, and when a training pass brings their copies to the device.
//!
//! Each such layer costs no device memory between passes; a pass copies its seven matrices over
//! on a stream of their own ahead of the layer, one layer at a time, so the device holds at most
//! one of them and the copy overlaps the layers before it. They sit in the first three quarters
//! of the layers, at least one layer apart: the last quarter's forward overlaps the LM head's
//! copy when that is in host memory too, and the backward pass starts there, right after the
//! loss (a copy then would add to the loss's working set).

use super::weights::DecoderWeights;
use crate::backend::{Backend, DeviceCopy};
use crate::error::{Error, Result};

/// The layers of a `num_layers`-layer decoder kept in host memory when `count` of them are:
/// spread evenly over the first `q = num_layers − ⌈num_layers/4⌉` layers, at
/// `⌊(2i + 1)·q / (2·count)⌋` for `i < count`. At most `q / 2`, so that a resident layer runs
/// between two of them (3, 9, 15 and 21 of Llama 3 8B's 32 layers for 4).
pub fn host_layer_indices(num_layers: usize, count: usize) -> Result<Vec<usize>> {
    let q = num_layers - num_layers.div_ceil(4);
    if count > q / 2 {
        return Err(Error::InvalidArgument(format!(
            "layers_in_host: {count} of {num_layers} layers asked for; at most {} can stay in \
             host memory (half of the first three quarters)",
            q / 2
        )));
    }
    Ok((0..count).map(|i| (2 * i + 1) * q / (2 * count)).collect())
}

/// The device copy of at most one host layer during one pass over the layers.
pub(super) struct LayerCopies<'a, B: Backend> {
    be: &'a B,
    weights: &'a DecoderWeights<B>,
    /// The layer whose copy is on the device or on its way, and the copies of its matrices.
    held: Option<(usize, Vec<DeviceCopy<'a, B>>)>,
}

impl<'a, B: Backend> LayerCopies<'a, B> {
    pub(super) fn new(be: &'a B, weights: &'a DecoderWeights<B>) -> Self {
        LayerCopies {
            be,
            weights,
            held: None,
        }
    }

    /// Before a layer runs, `rest` being that layer and the ones after it in the pass's order:
    /// when no copy is held, starts bringing over the first host layer among them.
    pub(super) fn before(&mut self, rest: impl IntoIterator<Item = usize>) -> Result<()> {
        if self.held.is_some() {
            return Ok(());
        }
        let layers = &self.weights.layers;
        if let Some(l) = rest.into_iter().find(|&l| layers[l].in_host) {
            let copies = layers[l]
                .proj
                .iter()
                .map(|w| DeviceCopy::bring(self.be, w))
                .collect::<Result<Vec<_>>>()?;
            self.held = Some((l, copies));
        }
        Ok(())
    }

    /// After `layer` ran (its last product queued): releases its copy if it is held.
    pub(super) fn after(&mut self, layer: usize) {
        if self.held.as_ref().is_some_and(|(l, _)| *l == layer) {
            self.held = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_layers_spread_over_the_first_three_quarters() {
        assert_eq!(host_layer_indices(32, 4).unwrap(), [3, 9, 15, 21]);
        assert_eq!(host_layer_indices(32, 1).unwrap(), [12]);
        assert_eq!(host_layer_indices(32, 0).unwrap(), Vec::<usize>::new());
        let most = host_layer_indices(32, 12).unwrap();
        assert_eq!(most, (0..12).map(|i| 2 * i + 1).collect::<Vec<_>>());
        for n in 1..=80usize {
            let q = n - n.div_ceil(4);
            for count in 1..=q / 2 {
                let l = host_layer_indices(n, count).unwrap();
                assert_eq!(l.len(), count);
                assert!(l.windows(2).all(|w| w[1] >= w[0] + 2), "{n} {count}: {l:?}");
                assert!(*l.last().unwrap() < q, "{n} {count}: {l:?}");
            }
        }
    }

    #[test]
    fn too_many_host_layers_are_refused_with_the_limit() {
        let e = host_layer_indices(32, 13).unwrap_err().to_string();
        assert!(e.contains("at most 12"), "{e}");
        assert!(host_layer_indices(2, 1).is_err());
    }
}
