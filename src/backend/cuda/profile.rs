//! Optional per-operation GPU timing: with `FINETUNE_CUDA_PROFILE=1`, every kernel launch and
//! matrix product is bracketed by CUDA events, and the backend prints, when dropped, the GPU time
//! of each operation name (calls, total, share). Off by default: events cost a little per launch.

use super::device::{driver_error, Gpu};
use crate::error::Result;
use cudarc::driver::{sys, CudaEvent};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Events recorded around each timed operation, in order.
pub struct Profiler {
    spans: Mutex<Vec<(&'static str, CudaEvent, CudaEvent)>>,
}

impl Profiler {
    /// A profiler when `FINETUNE_CUDA_PROFILE=1`.
    pub fn from_env() -> Option<Self> {
        (std::env::var("FINETUNE_CUDA_PROFILE").as_deref() == Ok("1")).then(|| Profiler {
            spans: Mutex::new(Vec::new()),
        })
    }

    /// Runs `f` (which queues GPU work) between two events named `name`.
    pub fn time<T>(
        &self,
        gpu: &Gpu,
        name: &'static str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let event = || {
            gpu.ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(driver_error("creating a timing event"))
        };
        let (start, end) = (event()?, event()?);
        start.record(&gpu.stream).map_err(driver_error(name))?;
        let out = f()?;
        end.record(&gpu.stream).map_err(driver_error(name))?;
        self.spans
            .lock()
            .expect("no panic holds it")
            .push((name, start, end));
        Ok(out)
    }

    /// GPU milliseconds per operation name, largest first, as a printable table.
    pub fn report(&self) -> String {
        let spans = self.spans.lock().expect("no panic holds it");
        let mut by_name: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
        for (name, start, end) in spans.iter() {
            let ms = end
                .synchronize()
                .and_then(|_| start.elapsed_ms(end))
                .map_or(f64::NAN, f64::from);
            let e = by_name.entry(name).or_default();
            *e = (e.0 + 1, e.1 + ms);
        }
        let total: f64 = by_name.values().map(|v| v.1).sum();
        let mut rows: Vec<_> = by_name.into_iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let mut out = format!("GPU time by operation ({total:.1} ms in all):\n");
        for (name, (calls, ms)) in rows {
            out += &format!(
                "{name:>24} {calls:>7} calls {ms:>10.2} ms {:>5.1} %\n",
                100.0 * ms / total
            );
        }
        out
    }
}
