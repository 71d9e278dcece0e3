//! GGUF tensor names of the decoder's weights and the q/k row permutation of llama GGUFs.
//!
//! llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows of the
//! llama q_proj and k_proj weights within each head so that rotary pairs are adjacent (llama.cpp's
//! "normal" RoPE rotates (x[2i], x[2i+1]); Hugging Face's rotates (x[i], x[i + d/2])). For a head
//! of d rows, GGUF row `2j + s` is Hugging Face row `s·d/2 + j` (j < d/2, s ∈ {0, 1}). Reading
//! undoes it, writing redoes it. qwen2/qwen3 GGUFs use NeoX RoPE and are not permuted.

use crate::lora::TargetModule;
use crate::model::config::{Family, ModelConfig};
use crate::model::weights::{Slot, TensorSpec};

/// The GGUF name of the tensor in `slot` ("blk.3.attn_q.weight").
pub fn tensor_name(slot: Slot) -> String {
    match slot {
        Slot::Embedding => "token_embd.weight".into(),
        Slot::FinalNorm => "output_norm.weight".into(),
        Slot::LmHead => "output.weight".into(),
        Slot::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
        Slot::MlpNorm(l) => format!("blk.{l}.ffn_norm.weight"),
        Slot::QNorm(l) => format!("blk.{l}.attn_q_norm.weight"),
        Slot::KNorm(l) => format!("blk.{l}.attn_k_norm.weight"),
        Slot::Proj(l, m) => format!("blk.{l}.{}.weight", module_name(m)),
        Slot::Bias(l, m) => format!("blk.{l}.{}.bias", module_name(m)),
    }
}

/// The GGUF name of a projection inside a block.
pub fn module_name(m: TargetModule) -> &'static str {
    match m {
        TargetModule::Q => "attn_q",
        TargetModule::K => "attn_k",
        TargetModule::V => "attn_v",
        TargetModule::O => "attn_output",
        TargetModule::Gate => "ffn_gate",
        TargetModule::Up => "ffn_up",
        TargetModule::Down => "ffn_down",
    }
}

/// The number of heads whose rows are permuted in the output of `module`, or `None` when its
/// GGUF rows are in Hugging Face order.
pub fn permuted_heads(cfg: &ModelConfig, module: TargetModule) -> Option<usize> {
    if !matches!(cfg.family, Family::Llama | Family::Mistral) {
        return None;
    }
    match module {
        TargetModule::Q => Some(cfg.num_heads),
        TargetModule::K => Some(cfg.num_kv_heads),
        _ => None,
    }
}

/// For a weight of the decoder: `(heads, row length)` when its GGUF rows are permuted.
pub fn spec_permutation(cfg: &ModelConfig, spec: &TensorSpec) -> Option<(usize, usize)> {
    match spec.slot {
        Slot::Proj(_, m) => permuted_heads(cfg, m).map(|h| (h, spec.cols)),
        Slot::Bias(_, m) => permuted_heads(cfg, m).map(|h| (h, 1)),
        _ => None,
    }
}

/// Which way [`permute_rows`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    HfToGguf,
    GgufToHf,
}

/// Reorders the rows of `values` (`heads · d` rows of `cols` values) between Hugging Face and
/// GGUF order: GGUF row `h·d + 2j + s` ↔ Hugging Face row `h·d + s·d/2 + j`.
pub fn permute_rows(values: &[f32], heads: usize, cols: usize, direction: Direction) -> Vec<f32> {
    let d = values.len() / cols / heads;
    let half = d / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for j in 0..half {
            for s in 0..2 {
                let gguf = h * d + 2 * j + s;
                let hf = h * d + s * half + j;
                let (from, to) = match direction {
                    Direction::HfToGguf => (hf, gguf),
                    Direction::GgufToHf => (gguf, hf),
                };
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_interleaves_halves_and_inverts() {
        // One head of 4 rows, 1 column: HF [a0 a1 b0 b1] -> GGUF [a0 b0 a1 b1].
        let hf = [0.0, 1.0, 10.0, 11.0];
        let gguf = permute_rows(&hf, 1, 1, Direction::HfToGguf);
        assert_eq!(gguf, [0.0, 10.0, 1.0, 11.0]);
        assert_eq!(permute_rows(&gguf, 1, 1, Direction::GgufToHf), hf);
        // Two heads of 4 rows of 2 columns: each head permuted on its own.
        let hf: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let gguf = permute_rows(&hf, 2, 2, Direction::HfToGguf);
        assert_eq!(&gguf[..4], &[0.0, 1.0, 4.0, 5.0]);
        assert_eq!(&gguf[8..12], &[8.0, 9.0, 12.0, 13.0]);
        assert_eq!(permute_rows(&gguf, 2, 2, Direction::GgufToHf), hf);
    }

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(tensor_name(Slot::Embedding), "token_embd.weight");
        assert_eq!(
            tensor_name(Slot::Proj(3, TargetModule::O)),
            "blk.3.attn_output.weight"
        );
        assert_eq!(
            tensor_name(Slot::Bias(0, TargetModule::K)),
            "blk.0.attn_k.bias"
        );
    }
}
