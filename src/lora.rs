//! LoRA configuration and the names of the projections it can adapt.
//!
//! A LoRA module adds `scale · B·A·x` to a frozen projection `W·x`, with `A: [r, in]`, `B: [out, r]`,
//! `scale = alpha / r` (or `alpha / sqrt(r)` with rsLoRA). A starts Kaiming-uniform and B zero, as in
//! PEFT, so an untrained adapter leaves the model unchanged.

use crate::error::{Error, Result};

/// One of the seven projections of a decoder layer that LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetModule {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl TargetModule {
    /// All seven, in the order a decoder layer applies them.
    pub const ALL: [TargetModule; 7] = [
        TargetModule::Q,
        TargetModule::K,
        TargetModule::V,
        TargetModule::O,
        TargetModule::Gate,
        TargetModule::Up,
        TargetModule::Down,
    ];

    /// The short name PEFT's `target_modules` uses ("q_proj", ...).
    pub fn peft_name(self) -> &'static str {
        match self {
            TargetModule::Q => "q_proj",
            TargetModule::K => "k_proj",
            TargetModule::V => "v_proj",
            TargetModule::O => "o_proj",
            TargetModule::Gate => "gate_proj",
            TargetModule::Up => "up_proj",
            TargetModule::Down => "down_proj",
        }
    }

    /// The module's path inside a Hugging Face decoder layer ("self_attn.q_proj", "mlp.up_proj").
    pub fn hf_path(self) -> &'static str {
        match self {
            TargetModule::Q => "self_attn.q_proj",
            TargetModule::K => "self_attn.k_proj",
            TargetModule::V => "self_attn.v_proj",
            TargetModule::O => "self_attn.o_proj",
            TargetModule::Gate => "mlp.gate_proj",
            TargetModule::Up => "mlp.up_proj",
            TargetModule::Down => "mlp.down_proj",
        }
    }

    /// Parses "q", "q_proj", "gate", "gate_proj", ... (case-insensitive).
    pub fn parse(name: &str) -> Result<Self> {
        let lower = name.trim().to_ascii_lowercase();
        let short = lower.strip_suffix("_proj").unwrap_or(&lower);
        Ok(match short {
            "q" => TargetModule::Q,
            "k" => TargetModule::K,
            "v" => TargetModule::V,
            "o" => TargetModule::O,
            "gate" => TargetModule::Gate,
            "up" => TargetModule::Up,
            "down" => TargetModule::Down,
            _ => {
                return Err(Error::InvalidArgument(format!(
                "unknown LoRA target module {name:?} (expected one of q, k, v, o, gate, up, down)"
            )))
            }
        })
    }

    /// Bit of this module in a [`LoraConfig::targets`] mask.
    pub fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// How the adapters are shaped and initialised.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank r of every adapter.
    pub rank: usize,
    /// Scaling numerator alpha.
    pub alpha: f32,
    /// rsLoRA: scale = alpha / sqrt(r) instead of alpha / r.
    pub use_rslora: bool,
    /// Dropout probability applied to the adapter's input during training.
    pub dropout: f32,
    /// Bit mask of adapted modules ([`TargetModule::bit`]).
    pub targets: u32,
    /// Seed of the A initialisation.
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 16,
            alpha: 16.0,
            use_rslora: false,
            dropout: 0.0,
            targets: TargetModule::ALL.iter().map(|t| t.bit()).sum(),
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// The factor multiplying `B·A·x`.
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }

    /// Whether `module` carries an adapter.
    pub fn targets(&self, module: TargetModule) -> bool {
        self.targets & module.bit() != 0
    }

    /// The adapted modules in layer order.
    pub fn target_list(&self) -> Vec<TargetModule> {
        TargetModule::ALL
            .into_iter()
            .filter(|t| self.targets(*t))
            .collect()
    }

    /// Checks ranges; called before any allocation.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::InvalidArgument(
                "LoRA rank must be at least 1".into(),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "LoRA alpha must be positive and finite, got {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::InvalidArgument(format!(
                "LoRA dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.targets == 0 || self.targets >> 7 != 0 {
            return Err(Error::InvalidArgument(format!(
                "LoRA target mask {:#x} must name at least one of the seven projections and nothing else",
                self.targets
            )));
        }
        Ok(())
    }
}
