//! Recorded work (CUDA graphs): the operations a piece of work queues, captured once from the
//! stream and launched again as one unit. A replay skips every host-side cost of the capture
//! (argument checks, cuBLASLt's launch path, the launches themselves), which in a training step
//! is tens of microseconds an operation while the GPU waits.
//!
//! The allocations made while recording become the graph's own memory (allocation and free
//! nodes, from the driver's graph memory pool) and must all be freed within the recording;
//! buffers made before it (weights, adapters, gradients, a batch's inputs) are read and written
//! in place, so new values written into them between replays are what a replay computes with.

use super::device::driver_error;
use super::CudaBackend;
use crate::error::{Error, Result};
use cudarc::driver::{sys, CudaContext, CudaGraph};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A recorded piece of work, ready to replay.
pub struct Recording {
    /// Always `Some` until dropped.
    graph: Option<CudaGraph>,
    ctx: Arc<CudaContext>,
}

// SAFETY: a graph is only ever used through `&Recording` by the one thread driving the backend
// at a time (a trainer's step takes `&mut self`); moving it between threads is allowed by CUDA.
unsafe impl Send for Recording {}

impl Drop for Recording {
    fn drop(&mut self) {
        drop(self.graph.take());
        // The graph's memory goes back to the system once no launch uses it any more.
        // SAFETY: a driver call on a live device.
        let _ = unsafe { sys::cuDeviceGraphMemTrim(self.ctx.cu_device()) };
    }
}

impl CudaBackend {
    /// See [`crate::backend::Backend::record`]. Profiling times operations one by one, so a
    /// profiling backend does not record.
    pub(super) fn record_work(
        &self,
        work: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<Recording>> {
        if self.profiler.is_some() {
            return Ok(None);
        }
        let stream = &self.gpu.stream;
        // Which matrices the NF4 scratch holds is host-side knowledge the recording would bake
        // in: recorded work dequantizes whatever it reads, and afterwards nothing is assumed.
        self.forget_dequantized();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver_error("starting a recording"))?;
        self.recording.store(true, Ordering::Relaxed);
        let queued = work();
        self.recording.store(false, Ordering::Relaxed);
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        self.forget_dequantized();
        queued?;
        let graph = graph
            .map_err(driver_error("finishing a recording"))?
            .ok_or_else(|| Error::Device("a recording captured no work".into()))?;
        // Blocks the pool kept from earlier, unrecorded steps would sit beside the graph's own.
        self.gpu.release_pooled_memory()?;
        Ok(Some(Recording {
            graph: Some(graph),
            ctx: self.gpu.ctx.clone(),
        }))
    }

    /// See [`crate::backend::Backend::replay`]; the graph's memory counts toward the peak.
    pub(super) fn replay_work(&self, r: &Recording) -> Result<()> {
        r.graph
            .as_ref()
            .expect("Some until dropped")
            .launch()
            .map_err(driver_error("replaying recorded work"))?;
        let graph_bytes = self.gpu.graph_memory_peak()?;
        self.gpu
            .memory
            .note_held_beside(graph_bytes, "recorded work's own allocations");
        Ok(())
    }
}
