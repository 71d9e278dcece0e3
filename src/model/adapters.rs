//! The trainable LoRA tensors of a decoder (and, with the same layout, their gradients and the
//! optimizer's moments).

use super::config::ModelConfig;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, TargetModule};
use crate::rng::{derive, Rng};

/// One adapter: `A: [r, in]`, `B: [out, r]`.
pub struct LoraPair<B: Backend> {
    pub a: B::Tensor,
    pub b: B::Tensor,
}

/// One [`LoraPair`] per adapted (layer, module), indexed by `layer · 7 + module`.
pub struct LoraTensors<B: Backend> {
    pub pairs: Vec<Option<LoraPair<B>>>,
}

/// Index of (layer, module) in [`LoraTensors::pairs`].
pub fn slot(layer: usize, module: TargetModule) -> usize {
    layer * TargetModule::ALL.len() + module as usize
}

impl<B: Backend> LoraTensors<B> {
    /// Builds every adapted pair with `make(layer, module, [r, in], [out, r])`.
    pub fn build(
        cfg: &ModelConfig,
        lora: &LoraConfig,
        mut make: impl FnMut(usize, TargetModule, (usize, usize), (usize, usize)) -> Result<LoraPair<B>>,
    ) -> Result<Self> {
        let mut pairs = Vec::with_capacity(cfg.num_layers * 7);
        for layer in 0..cfg.num_layers {
            for m in TargetModule::ALL {
                pairs.push(if lora.targets(m) {
                    let a_shape = (lora.rank, cfg.in_features(m));
                    let b_shape = (cfg.out_features(m), lora.rank);
                    Some(make(layer, m, a_shape, b_shape)?)
                } else {
                    None
                });
            }
        }
        Ok(LoraTensors { pairs })
    }

    /// PEFT's initialisation: A ~ U(−1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform with a = sqrt(5)),
    /// B = 0. Each (layer, module) draws from its own stream of `lora.seed`.
    pub fn init(cfg: &ModelConfig, lora: &LoraConfig, backend: &B) -> Result<Self> {
        Self::build(cfg, lora, |layer, m, (r, fan_in), (out, _)| {
            let mut rng = Rng::new(derive(lora.seed, &[layer as u64, m as u64]));
            let bound = 1.0 / (fan_in as f32).sqrt();
            let a: Vec<f32> = (0..r * fan_in)
                .map(|_| rng.uniform(-bound, bound))
                .collect();
            Ok(LoraPair {
                a: backend.upload(&a, r, fan_in)?,
                b: backend.zeros(out, r)?,
            })
        })
    }

    /// Zero tensors of the same layout (gradients, optimizer moments).
    pub fn zeros_like(&self, backend: &B) -> Result<Self> {
        let pairs = self
            .pairs
            .iter()
            .map(|p| {
                p.as_ref()
                    .map(|p| {
                        let (ar, ac) = backend.shape(&p.a);
                        let (br, bc) = backend.shape(&p.b);
                        Ok(LoraPair {
                            a: backend.zeros(ar, ac)?,
                            b: backend.zeros(br, bc)?,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(LoraTensors { pairs })
    }

    /// Every tensor rounded as [`Backend::rounded_product_input`] rounds a product's operand, or
    /// `None` where the backend's products read them as they are.
    pub fn rounded_for_products(&self, backend: &B) -> Result<Option<Self>> {
        let factors: Vec<&B::Tensor> = self.tensors().collect();
        let Some(rounded) = backend.rounded_product_inputs(&factors)? else {
            return Ok(None);
        };
        if rounded.len() != factors.len() {
            return Err(Error::Device(format!(
                "rounded adapter factors: {} came back for {} given",
                rounded.len(),
                factors.len()
            )));
        }
        // Back into the slots, A then B of each pair, in the order `tensors` gave them.
        let mut rounded = rounded.into_iter();
        let pairs = (self.pairs.iter())
            .map(|p| {
                // An empty slot stays empty and takes no factor.
                p.as_ref()?;
                Some(LoraPair {
                    a: rounded.next()?,
                    b: rounded.next()?,
                })
            })
            .collect();
        Ok(Some(LoraTensors { pairs }))
    }

    pub fn get(&self, layer: usize, m: TargetModule) -> Option<&LoraPair<B>> {
        self.pairs[slot(layer, m)].as_ref()
    }

    pub fn get_mut(&mut self, layer: usize, m: TargetModule) -> Option<&mut LoraPair<B>> {
        self.pairs[slot(layer, m)].as_mut()
    }

    /// Every tensor, A then B of each pair in slot order.
    pub fn tensors(&self) -> impl Iterator<Item = &B::Tensor> {
        self.pairs.iter().flatten().flat_map(|p| [&p.a, &p.b])
    }

    /// Every tensor, mutably, in the order of [`LoraTensors::tensors`].
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut B::Tensor> {
        self.pairs
            .iter_mut()
            .flatten()
            .flat_map(|p| [&mut p.a, &mut p.b])
    }

    /// The tensors of one decoder layer, mutably, in the order of [`LoraTensors::tensors`].
    pub fn layer_tensors_mut(&mut self, layer: usize) -> Vec<&mut B::Tensor> {
        let n = TargetModule::ALL.len();
        self.pairs[layer * n..(layer + 1) * n]
            .iter_mut()
            .flatten()
            .flat_map(|p| [&mut p.a, &mut p.b])
            .collect()
    }

    /// Total number of trainable values.
    pub fn num_values(&self, backend: &B) -> usize {
        self.tensors()
            .map(|t| {
                let (r, c) = backend.shape(t);
                r * c
            })
            .sum()
    }
}
