//! Optional per-operation GPU timing: with `FINETUNE_CUDA_PROFILE=1`, every kernel launch and
//! matrix product is bracketed by CUDA events, and the backend prints, when dropped, the GPU time
//! of each operation name (calls, total, share) beside the host time spent queueing it. Off by
//! default: events cost a little per launch.
//!
//! Reading it: a span runs from its start event to its end event on the GPU, so when the GPU
//! waits for the host, the span also holds the host's time to queue the operation. Host time
//! near the step time means the step is bound by queueing, not by the GPU. And when the queue of
//! launches is full, the host time of a call holds its wait for a free slot, i.e. for whatever
//! earlier operation the GPU is running.
//!
//! `FINETUNE_CUDA_PROFILE=isolated` separates the two: the host waits for the GPU to be idle
//! before each operation, so its queueing time is its own work alone, and the GPU time of the
//! operation itself is the span less that host time (the GPU idles while the host queues).
//! Much slower; for reading what each operation costs, not for step times.

use super::device::{driver_error, Gpu};
use super::lock;
use crate::error::Result;
use cudarc::driver::{sys, CudaEvent};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One timed operation: its name, the events around it, the host time its queueing took.
struct Span {
    name: Cow<'static, str>,
    start: CudaEvent,
    end: CudaEvent,
    host: Duration,
}

/// Events recorded around each timed operation, in order.
pub struct Profiler {
    spans: Mutex<Vec<Span>>,
    /// Wait for the GPU to be idle before each operation.
    isolated: bool,
}

impl Profiler {
    /// A profiler when `FINETUNE_CUDA_PROFILE` is `1` or `isolated`.
    pub fn from_env() -> Option<Self> {
        let isolated = match std::env::var("FINETUNE_CUDA_PROFILE").as_deref() {
            Ok("1") => false,
            Ok("isolated") => true,
            _ => return None,
        };
        Some(Profiler {
            spans: Mutex::new(Vec::new()),
            isolated,
        })
    }

    /// Runs `f` (which queues GPU work) between two events named `name`.
    pub fn time<T>(
        &self,
        gpu: &Gpu,
        name: Cow<'static, str>,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let event = || {
            gpu.ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(driver_error("creating a timing event"))
        };
        let (start, end) = (event()?, event()?);
        if self.isolated {
            gpu.synchronize()?;
        }
        start.record(gpu.stream()).map_err(driver_error(&name))?;
        let queued = Instant::now();
        let out = f()?;
        let host = queued.elapsed();
        end.record(gpu.stream()).map_err(driver_error(&name))?;
        lock(&self.spans).push(Span {
            name,
            start,
            end,
            host,
        });
        Ok(out)
    }

    /// GPU and host milliseconds per operation name, largest GPU time first, as a printable
    /// table.
    pub fn report(&self) -> String {
        let spans = lock(&self.spans);
        // name -> (calls, GPU ms, host ms)
        let mut by_name: BTreeMap<&str, (usize, f64, f64)> = BTreeMap::new();
        for s in spans.iter() {
            let ms = s
                .end
                .synchronize()
                .and_then(|_| s.start.elapsed_ms(&s.end))
                .map_or(f64::NAN, f64::from);
            let e = by_name.entry(&s.name).or_default();
            *e = (e.0 + 1, e.1 + ms, e.2 + s.host.as_secs_f64() * 1e3);
        }
        let gpu: f64 = by_name.values().map(|v| v.1).sum();
        let host: f64 = by_name.values().map(|v| v.2).sum();
        let mut rows: Vec<_> = by_name.into_iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let mut out = format!(
            "GPU time by operation ({gpu:.1} ms in all; {host:.1} ms of host time queueing{}):\n",
            if self.isolated {
                "; isolated: the operation's own GPU time is GPU less host"
            } else {
                ""
            }
        );
        for (name, (calls, ms, host_ms)) in rows {
            out += &format!(
                "{name:>36} {calls:>7} calls {ms:>10.2} ms {:>5.1} % host {host_ms:>9.2} ms \
                 ({:>7.1} µs a call, host {:>6.1})\n",
                100.0 * ms / gpu,
                1e3 * ms / calls as f64,
                1e3 * host_ms / calls as f64,
            );
        }
        out
    }
}
