//! Sums across the ranks of a data-parallel group: the one place where LoRA gradients of
//! replicas meet. GPU backends implement it over NCCL (`cuda::nccl`); a group of one needs none.

use super::Backend;
use crate::error::Result;

/// A member of a data-parallel group of `world_size` ranks, each training a replica of the same
/// adapters on its own slice of every batch.
///
/// Every rank must issue the same sums in the same order (NCCL's rule for collectives): the
/// trainer sums one bucket per decoder layer, last layer first, then the host totals.
pub trait Collective<B: Backend>: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// Queues the element-wise sum of `tensors` over all ranks, in place, behind the work
    /// queued on the backend so far; the backend's later work may run alongside it. The
    /// tensors must be neither read nor written until [`Collective::wait`] returns.
    fn start_sum(&self, be: &B, tensors: &mut [&mut B::Tensor]) -> Result<()>;

    /// Waits until every sum started so far has finished. A rank that failed, died or stalled
    /// turns into an error within the group's timeout (the group is then unusable), never a
    /// hang.
    fn wait(&self, be: &B) -> Result<()>;

    /// Sums host values over all ranks, in place (token counts, loss sums). Waits.
    fn sum_host(&self, be: &B, values: &mut [f64]) -> Result<()>;
}
