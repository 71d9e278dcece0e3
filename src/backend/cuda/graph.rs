//! Recorded work (CUDA graphs): the operations a piece of work queues, captured once from the
//! stream and launched again as one unit. A replay skips every host-side cost of the capture
//! (argument checks, cuBLASLt's launch path, the launches themselves), which in a training step
//! is tens of microseconds an operation while the GPU waits.
//!
//! The allocations made while recording are placed in one block of device memory the recording
//! owns (arena.rs) and must all be freed within the recording; so are the pinned host buffers
//! offloaded activations are copied to (offload.rs);
//! buffers made before it (weights, adapters, gradients, a batch's inputs) are read and written
//! in place, so new values written into them between replays are what a replay computes with.

use super::arena::Arena;
use super::device::{driver_error, DeviceBuffer};
use super::offload::HostBuffer;
use super::CudaBackend;
use crate::backend::{Backend, Recorded};
use crate::error::{Error, Result};
use cudarc::driver::{sys, CudaContext, CudaGraph, CudaStream};
use std::sync::Arc;

/// Set (to anything), each recording prints the size of its memory block beside the most bytes
/// its allocations had alive at once.
const ARENA_REPORT: &str = "FINETUNE_ARENA_REPORT";

/// A recorded piece of work, ready to replay.
pub struct Recording {
    /// Always `Some` until dropped.
    graph: Option<CudaGraph>,
    ctx: Arc<CudaContext>,
    /// The memory the work's allocations are placed in (arena.rs); freed after the graph, in
    /// order on the main stream behind the last replay.
    _block: DeviceBuffer<u8>,
    /// The pinned host buffers of the work's offloaded activations; freed once the main stream
    /// has finished the last replay.
    host: Vec<HostBuffer>,
    main: Arc<CudaStream>,
}

// SAFETY: a graph is only ever used through `&Recording` by the one thread driving the backend
// at a time (a trainer's step takes `&mut self`); moving it between threads is allowed by CUDA.
unsafe impl Send for Recording {}

impl Drop for Recording {
    fn drop(&mut self) {
        drop(self.graph.take());
        release_graph_memory(&self.ctx);
        if !self.host.is_empty() {
            // A failure leaves nothing better to do than to free them anyway.
            let _ = self.main.synchronize();
        }
    }
}

/// Gives the graph memory pool's unused memory (that of destroyed graphs, once no launch uses
/// it any more) back to the system.
fn release_graph_memory(ctx: &CudaContext) {
    // SAFETY: a driver call on a live device. A failure only leaves memory cached.
    let _ = unsafe { sys::cuDeviceGraphMemTrim(ctx.cu_device()) };
}

impl CudaBackend {
    /// See [`crate::backend::Backend::record`]. The work is captured from a stream of its own
    /// (`Gpu::stream` while this thread records), so work other threads queue meanwhile is not
    /// part of it. Profiling times operations one by one, so a profiling backend does not record.
    pub(super) fn record_work(
        &self,
        work: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Recorded<Recording>> {
        if !self.records_work() {
            return Ok(Recorded::Never);
        }
        // Adapter gradients still in flight belong to the work before the recording.
        self.join_aside()?;
        let recorded = self.gpu.recording_here(|| {
            self.offload.finish_copies()?;
            // First capture: ordinary allocations, their sizes and lifetimes traced.
            let traced = Arena::tracing();
            let planned = self.capture_placed(traced.clone(), work);
            if let (_, true) = self.offload.end_recording(false) {
                return Ok(Recorded::NotNow);
            }
            drop(planned?);
            release_graph_memory(&self.gpu.ctx);
            let plan = traced.plan();
            let bytes = plan.size();
            if std::env::var_os(ARENA_REPORT).is_some() {
                const MIB: f64 = (1 << 20) as f64;
                eprintln!(
                    "recorded work's memory: {:.1} MiB planned for {} allocations, at most \
                     {:.1} MiB of them alive at once",
                    bytes as f64 / MIB,
                    plan.allocations(),
                    plan.live_peak() as f64 / MIB
                );
            }
            // The plan's block can exceed the most the work holds at once (long traces are
            // placed first fit): past the device-memory cap the work runs unrecorded instead.
            if !self.gpu.memory.fits(bytes.max(1)) {
                return Ok(Recorded::Never);
            }
            let block = self.gpu.alloc_on::<u8>(
                self.gpu.main_stream(),
                bytes.max(1),
                "recorded work's memory",
            )?;
            // The kept capture: the same allocations, in the block.
            let graph = self.capture_placed(Arena::in_block(self.buffer_ptr(&block), plan), work);
            match self.offload.end_recording(graph.is_ok()) {
                (_, true) => Ok(Recorded::NotNow),
                (host, false) => Ok::<_, Error>(Recorded::Kept((graph?, block, host))),
            }
        })?;
        // Another pass held the offload buffers this one needs (it runs unrecorded this time),
        // or the block did not fit.
        let (graph, block, host) = match recorded {
            Recorded::Kept(parts) => parts,
            Recorded::NotNow => return Ok(Recorded::NotNow),
            Recorded::Never => return Ok(Recorded::Never),
        };
        // Blocks the pool kept from earlier, unrecorded steps would sit beside the block.
        self.gpu.release_pooled_memory()?;
        Ok(Recorded::Kept(Recording {
            graph: Some(graph),
            ctx: self.gpu.ctx.clone(),
            _block: block,
            host,
            main: self.gpu.main_stream().clone(),
        }))
    }

    /// Captures `work` with its allocations placed by `arena`.
    fn capture_placed(
        &self,
        arena: Arc<Arena>,
        work: &mut dyn FnMut() -> Result<()>,
    ) -> Result<CudaGraph> {
        self.start_recording_dequantized();
        self.gpu.set_arena(Some(arena.clone()));
        let graph = capture(self.gpu.stream(), &mut || {
            let queued = work();
            queued.and(self.offload.release_copied(&self.gpu))
        });
        self.gpu.set_arena(None);
        if !arena.follows_plan() {
            return Err(Error::Device(
                "recorded work allocated or freed memory otherwise than its first capture; \
                 the places planned for it could overlap"
                    .into(),
            ));
        }
        // A buffer made while recording and kept after it would share its memory with the
        // replays' own allocations.
        match arena.live() {
            0 => graph,
            kept => Err(Error::Device(format!(
                "recorded work kept {kept} of the buffers it allocated past the recording; a \
                 recorded pass must free everything it allocates"
            ))),
        }
    }

    /// See [`crate::backend::Backend::replay`]: launched on the main stream, behind the work
    /// queued there so far. The graph's memory counts toward the peak.
    pub(super) fn replay_work(&self, r: &Recording) -> Result<()> {
        let exec = r
            .graph
            .as_ref()
            .expect("Some until dropped")
            .cu_graph_exec();
        // The replay rewrites the NF4 scratch: launched under its lock, after which the slots
        // are taken to hold nothing known.
        self.replacing_dequantized(|| {
            // SAFETY: a live executable graph of this context, launched on a live stream.
            unsafe { sys::cuGraphLaunch(exec, self.gpu.main_stream().cu_stream()) }
                .result()
                .map_err(driver_error("replaying recorded work"))
        })?;
        let peak = self.gpu.graph_memory_peak()?;
        let mib = |b: usize| b >> 20;
        self.gpu.memory.note_held_beside(
            peak.reserved,
            &format!(
                "recorded work's own allocations ({} MiB in use, {} MiB reserved at most)",
                mib(peak.used),
                mib(peak.reserved)
            ),
        );
        Ok(())
    }
}

/// Captures what `work` queues on `stream` (thread-local mode: other threads may go on
/// queueing elsewhere) into an executable graph.
fn capture(stream: &Arc<CudaStream>, work: &mut dyn FnMut() -> Result<()>) -> Result<CudaGraph> {
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(driver_error("starting a recording"))?;
    let queued = work();
    // The capture ends whatever happened, so that the stream is usable again.
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    queued?;
    graph
        .map_err(driver_error("finishing a recording"))?
        .ok_or_else(|| Error::Device("a recording captured no work".into()))
}
