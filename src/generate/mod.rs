//! Greedy decoding for trying a model (each new token recomputes the whole prefix; a KV cache
//! belongs with the sampling work of the data pipeline).

use crate::api::{Model, Trainer};
use crate::error::Result;
use crate::train::batch::Batch;

/// Appends up to `max_new` tokens to `prompt`, each the arg-max of the next-token logits; stops
/// early at `stop` if given. Returns only the new tokens.
pub fn greedy(
    model: &Model,
    adapter: Option<&Trainer>,
    prompt: &[i32],
    max_new: usize,
    stop: Option<i32>,
) -> Result<Vec<i32>> {
    let vocab = model.config().vocab_size;
    let mut tokens = prompt.to_vec();
    let mut out = Vec::with_capacity(max_new);
    for _ in 0..max_new {
        let n = tokens.len();
        let batch = Batch::new(1, n, tokens.clone(), vec![crate::backend::IGNORE_LABEL; n])?;
        let logits = model.logits(&batch, adapter)?;
        let last = &logits[(n - 1) * vocab..n * vocab];
        let next = last
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as i32)
            .expect("vocabulary is not empty");
        tokens.push(next);
        out.push(next);
        if Some(next) == stop {
            break;
        }
    }
    Ok(out)
}
