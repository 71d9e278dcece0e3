//! The adapters' gradient products on a second stream, beside the compute stream's products
//! ([`Backend::add_adapter_gradients`](crate::backend::Backend::add_adapter_gradients)):
//!
//! ```text
//!   dB += s·dyᵀ·xa     dA += dxaᵀ·x          (dy: [rows, out], x: [rows, in], xa, dxa: [rows, r])
//! ```
//!
//! Each product reads an activation-sized bf16 matrix for a rank-wide result: memory-bound,
//! while the input-gradient products queued after it are compute-bound, and nothing of the pass
//! reads the gradients until its end. So each pair waits for the compute stream's work queued
//! before it (its inputs are ready), runs on the side stream, and the compute stream waits for it
//! when the next pair is queued or at a join ([`CudaBackend::join_aside`]): at most one pair is
//! in flight, and what was handed over for it (rounded copies of an f32 `xa` or `dxa`, the
//! inputs its caller was done with) is dropped at that wait, so that their memory is reused
//! only behind it, in the compute stream's order.
//!
//! A pair that fails part way is waited for all the same. A pass that fails between a pair and
//! its join may free inputs the pair reads (the decoder's locals, dropped as the error returns)
//! before the pass's last join (`Decoder::forward_backward`): the pair may then read memory the
//! pool hands to another thread's allocation, so only that failed pass's gradients hold
//! garbage, and the next step zeroes them behind the join.
//!
//! Each thread has its own pair in flight (threads training one shared model queue on the same
//! streams, and a thread waits only for its own pairs).
//!
//! The pair runs on the compute stream instead, in order: in recorded passes (where they measured
//! slower beside it: bench/NOTES.md), with f32 activations (products not rounded to bf16, which
//! would need copies made beside the compute stream's allocations), under profiling (which times
//! operations one by one), and where the side stream's cuBLASLt workspace does not fit in
//! device memory.

use super::blas::{Addend, Lane};
use super::device::driver_error;
use super::tensor::Dtype;
use super::{lock, CudaBackend, CudaTensor};
use crate::backend::adapter_gradients_in_order;
use crate::error::{Error, Result};
use cudarc::driver::{sys, CudaEvent};
use std::collections::HashMap;
use std::thread::{self, ThreadId};

/// Each thread's pair in flight.
pub(super) type InFlight = HashMap<ThreadId, AsideWork>;

/// A pair of gradient products queued on the side stream, and what it reads that the compute
/// stream must not free before it is done.
pub(super) struct AsideWork {
    done: CudaEvent,
    held: Vec<CudaTensor>,
}

impl CudaBackend {
    /// See [`Backend::add_adapter_gradients`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn adapter_gradients_aside(
        &self,
        dy: &CudaTensor,
        xa: &CudaTensor,
        dxa: &CudaTensor,
        x: &CudaTensor,
        s: f32,
        da: &mut CudaTensor,
        db: &mut CudaTensor,
    ) -> Result<()> {
        // The previous pair first: it may add into the same gradients.
        self.join_aside()?;
        let beside = self.profiler.is_none()
            && !self.gpu.records_here()
            && self.rounds_product_inputs()
            && [dy, x].iter().all(|t| t.dtype() == Dtype::Bf16)
            && [xa, dxa]
                .iter()
                .all(|t| matches!(t.dtype(), Dtype::Bf16 | Dtype::F32))
            && [&*da, &*db].iter().all(|t| t.dtype() == Dtype::F32)
            && self.blas.side_workspace_fits(&self.gpu)?;
        if !beside {
            return adapter_gradients_in_order(self, dy, xa, dxa, x, s, da, db);
        }
        // f32 ones rounded on the compute stream, as the products would round them
        // (`adapter_product` stores them in bf16 already).
        let rounded = |t: &CudaTensor, what| match t.dtype() {
            Dtype::F32 => self.rounded_copy(t, 0, what).map(Some),
            _ => Ok(None),
        };
        let xa_copy = rounded(xa, "an adapter input")?;
        let dxa_copy = rounded(dxa, "an adapter input's gradient")?;
        let (xa, dxa) = (
            xa_copy.as_ref().unwrap_or(xa),
            dxa_copy.as_ref().unwrap_or(dxa),
        );
        // Device bf16 and f32 tensors are their own operands: nothing staged (an NF4 scratch,
        // a host table's copy) would be freed on the compute stream while the side reads it.
        let operand = |t: &CudaTensor, bf16| {
            let (o, staged) = self.operand(t, bf16)?;
            debug_assert!(staged.is_empty(), "an adapter gradient operand was staged");
            Ok::<_, Error>(o)
        };
        let (dy_o, xa_o) = (operand(dy, true)?, operand(xa, true)?);
        let (dxa_o, x_o) = (operand(dxa, true)?, operand(x, true)?);
        let (db_o, da_o) = (operand(db, false)?, operand(da, false)?);
        let no_timing = Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
        let (compute, side) = (self.gpu.stream(), self.gpu.side_stream());
        let ready = compute
            .record_event(no_timing)
            .map_err(driver_error("marking adapter gradients' inputs ready"))?;
        side.wait(&ready).map_err(driver_error(
            "starting adapter gradients beside the compute stream",
        ))?;
        let gemm = |a, b, alpha, c| {
            let add = Addend::Output;
            self.blas.gemm(
                &self.gpu,
                Lane::Side,
                a,
                true,
                b,
                false,
                alpha,
                add,
                c,
                false,
            )
        };
        let queued = gemm(dy_o, xa_o, s, db_o).and_then(|()| gemm(dxa_o, x_o, 1.0, da_o));
        // Whatever was queued beside, the compute stream waits for it at the join, a failed
        // pair too (its first product may be running).
        let done = match side.record_event(no_timing) {
            Ok(done) => done,
            Err(e) => {
                // Nothing to wait on later: wait here, before the copies are freed.
                let _ = side.synchronize();
                return Err(driver_error("marking the end of adapter gradients")(e));
            }
        };
        let work = AsideWork {
            done,
            held: [xa_copy, dxa_copy].into_iter().flatten().collect(),
        };
        lock(&self.aside).insert(thread::current().id(), work);
        queued
    }

    /// See [`Backend::drop_after_adapter_gradients`].
    pub(super) fn drop_after_aside(&self, t: CudaTensor) {
        match lock(&self.aside).get_mut(&thread::current().id()) {
            Some(work) => work.held.push(t),
            None => drop(t),
        }
    }

    /// See [`Backend::join_adapter_gradients`]: the compute stream waits for this thread's pair
    /// in flight, then what it held is dropped (freed behind that wait).
    pub(super) fn join_aside(&self) -> Result<()> {
        let Some(work) = lock(&self.aside).remove(&thread::current().id()) else {
            return Ok(());
        };
        self.gpu
            .stream()
            .wait(&work.done)
            .map_err(driver_error("waiting for adapter gradients"))?;
        drop(work.held);
        Ok(())
    }
}
