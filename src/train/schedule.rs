//! Learning-rate schedules with linear warmup, as in Hugging Face `transformers`.

use crate::error::{Error, Result};

/// The shape of the learning rate after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    /// Linear decay to 0 at `total_steps`.
    Linear,
    /// Half-cosine decay to 0 at `total_steps`.
    Cosine,
}

impl ScheduleKind {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => Err(Error::InvalidArgument(format!(
                "unknown schedule {name:?} (expected constant, linear or cosine)"
            ))),
        }
    }
}

/// The learning rate as a function of the (0-based) optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak_lr: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// `lr(step) = peak · f(step)` with `f = step / warmup` during warmup, then with
    /// progress `p = (step − warmup) / (total − warmup)`: 1 (constant), `1 − p` (linear) or
    /// `0.5·(1 + cos(π·p))` (cosine), clamped at 0 past the end.
    pub fn lr(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            return self.peak_lr * step as f32 / self.warmup_steps as f32;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let p = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let f = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => 1.0 - p,
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        };
        self.peak_lr * f as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind) -> Schedule {
        Schedule {
            kind,
            peak_lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
        }
    }

    #[test]
    fn warmup_is_linear_from_zero() {
        let s = sched(ScheduleKind::Cosine);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-7);
        assert_eq!(s.lr(10), 1.0);
    }

    #[test]
    fn decays_reach_zero_at_total() {
        assert!((sched(ScheduleKind::Linear).lr(60) - 0.5).abs() < 1e-6);
        assert!((sched(ScheduleKind::Cosine).lr(60) - 0.5).abs() < 1e-6);
        assert!(sched(ScheduleKind::Cosine).lr(110).abs() < 1e-7);
        assert_eq!(sched(ScheduleKind::Linear).lr(500), 0.0);
        assert_eq!(sched(ScheduleKind::Constant).lr(500), 1.0);
    }
}
