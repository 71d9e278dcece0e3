//! Text generation for trying a model: greedy or temperature/top-p sampling, with a KV cache (the
//! prompt runs once, then each new token costs one row through the decoder).

use crate::api::{Model, Trainer};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Sample only from the smallest set of tokens whose probabilities add up to `top_p`.
    pub top_p: f32,
    pub seed: u64,
    /// Generation stops after any of these tokens.
    pub stop: Vec<i32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

/// The next token from one row of logits.
fn pick(logits: &[f32], opts: &GenerateOptions, rng: &mut Rng) -> i32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as i32)
    };
    if opts.temperature <= 0.0 {
        return argmax();
    }
    // p_i = softmax(z / T); keep the most likely tokens until their mass reaches top_p.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &z)| (i, (((z - max) / opts.temperature) as f64).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let cut = probs
        .iter()
        .position(|p| {
            kept += p.1 / total;
            kept >= opts.top_p as f64
        })
        .map_or(probs.len(), |i| i + 1);
    let mass: f64 = probs[..cut].iter().map(|p| p.1).sum();
    let mut u = rng.uniform(0.0, 1.0) as f64 * mass;
    for &(i, p) in &probs[..cut] {
        if u < p {
            return i as i32;
        }
        u -= p;
    }
    probs[cut - 1].0 as i32
}

/// Continues `prompt`, returning only the new tokens.
pub fn generate(
    model: &Model,
    adapter: Option<&Trainer>,
    prompt: &[i32],
    opts: &GenerateOptions,
) -> Result<Vec<i32>> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("the prompt is empty".into()));
    }
    if !(opts.top_p > 0.0 && opts.top_p <= 1.0 && opts.temperature.is_finite())
        || opts.temperature < 0.0
    {
        return Err(Error::InvalidArgument(format!(
            "temperature {} must be >= 0 and top_p {} in (0, 1]",
            opts.temperature, opts.top_p
        )));
    }
    let mut rng = Rng::new(opts.seed);
    let mut out = Vec::with_capacity(opts.max_new_tokens);
    let mut session = model.decode_session(adapter)?;
    let mut logits = session.feed(prompt)?;
    while out.len() < opts.max_new_tokens {
        let next = pick(&logits, opts, &mut rng);
        out.push(next);
        if opts.stop.contains(&next) || out.len() == opts.max_new_tokens {
            break;
        }
        logits = session.feed(&[next])?;
    }
    Ok(out)
}

/// Greedy decoding up to `max_new` tokens, stopping after `stop` if given.
pub fn greedy(
    model: &Model,
    adapter: Option<&Trainer>,
    prompt: &[i32],
    max_new: usize,
    stop: Option<i32>,
) -> Result<Vec<i32>> {
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        stop: stop.into_iter().collect(),
        ..Default::default()
    };
    generate(model, adapter, prompt, &opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_only_the_likely_tokens() {
        let logits = [5.0, 4.0, -10.0, -10.0];
        let opts = GenerateOptions {
            temperature: 1.0,
            top_p: 0.9,
            ..Default::default()
        };
        let mut rng = Rng::new(1);
        let picks: Vec<i32> = (0..200).map(|_| pick(&logits, &opts, &mut rng)).collect();
        assert!(picks.iter().all(|&p| p == 0 || p == 1));
        assert!(picks.contains(&0) && picks.contains(&1));
        let greedy = GenerateOptions::default();
        assert_eq!(pick(&logits, &greedy, &mut rng), 0);
    }
}
