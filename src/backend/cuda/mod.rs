//! The CUDA backend: the driver, NVRTC and cuBLAS loaded at run time (the crate builds and runs
//! where none of them exist), frozen base matrices in bf16 (or projection matrices in NF4,
//! dequantized to bf16 for each product: nf4.rs), activations, adapters and optimizer state in
//! f32, matrix products through cuBLAS with f32 accumulation, every other op a kernel from
//! `kernels/` (kernels/README.md is their contract).

mod arena;
mod aside;
mod blas;
pub mod device;
mod fold;
pub use fold::{MAX_FOLDED_RANK, PROJECTION_ROOM};
mod graph;
mod head_chunks;
mod host_table;
pub mod kernels;
mod launch;
pub mod nccl;
mod nf4;
pub use nf4::DEQUANTIZED_SLOTS;
mod offload;
mod profile;
pub mod tensor;
mod timeline;

use super::{
    check_attention_shapes, check_len, check_norm_backward, check_same_shape, AdamWConstants,
    AdamWSlot, AdamWStep, AttentionShape, Backend, DeviceMemory, PassPoint, ProductOutput,
    Recorded, IGNORE_LABEL,
};
use crate::error::{Error, Result};
use crate::model::config::Activation;
use crate::quant::Nf4Tensor;
use blas::{Addend, Blas, Lane, Operand};
use cudarc::driver::{DevicePtr, DeviceRepr};
use device::{driver_error, DeviceBuffer, Gpu};
use head_chunks::{HeadChunks, HEAD_CHUNK_ROWS};
use host_table::HostTable;
use kernels::KernelCache;
use launch::{Arg, Shape, BLOCK, MAX_GRID};
use offload::Offload;
use profile::Profiler;
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;
pub use tensor::{CudaInts, CudaTensor, Dtype};
use tensor::{HostCopies, Nf4Codes, StashedLayout, Storage};
use timeline::Timeline;

/// Queries (or keys) per attention block, as the attention kernels expect.
const ATTENTION_TILE: usize = 64;
/// Threads per attention block.
const ATTENTION_THREADS: u32 = 128;
/// The warp-specialized attention kernels (kernels/flash.cu, `flash_fwd_ws` and
/// `flash_bwd_dkdv_ws`; sm_90a, head_dim up to 128, and their `_hd256` entries): queries
/// (forward) or keys (dK/dV) per block, threads per block (three warpgroups), ring buffers (the
/// forward's key/value tiles, dK/dV's pairs of Q and dO tiles; the _WIDE counts at head_dim 256:
/// rings of K and of V tiles in the forward), and the bytes of their barriers after the tiles.
const FLASH_WS_ROWS: usize = 128;
const FLASH_WS_THREADS: u32 = 384;
const FLASH_FWD_STAGES: usize = 6;
const FLASH_FWD_STAGES_WIDE: usize = 2;
const FLASH_WS_STAGES: usize = 4;
const FLASH_WS_STAGES_WIDE: usize = 2;
const FLASH_WS_BARRIER_BYTES: usize = 128;
/// Largest head dimension the attention kernels support.
const MAX_HEAD_DIM: usize = 256;
/// What the per-call bf16 copies of f32 operands are for, in memory reports.
const OPERAND_COPY: &str = "a bf16 copy of an operand";
/// Head dims whose training attention runs on tensor cores (kernels/flash.cu) on every
/// architecture; 256 too with warpgroup products (`CudaBackend::tensor_core_attention`).
const TENSOR_CORE_HEAD_DIMS: [usize; 2] = [64, 128];
/// Key rows per multiprocessor the dK/dV launch aims at: 8 blocks of 64 keys (several waves even
/// out the causal imbalance: the first key tiles see every query, the last ones few).
const DKDV_KEYS_PER_SM: usize = 8 * ATTENTION_TILE;
/// Bytes of logits one chunk of the fused LM head + cross-entropy may hold.
const LOGITS_CHUNK_BYTES: usize = 256 << 20;

/// A GPU backend.
pub struct CudaBackend {
    gpu: Gpu,
    kernels: KernelCache,
    blas: Blas,
    /// The last RoPE frequency table uploaded, reused while it stays the same.
    inv_freq: Mutex<Option<(Vec<f32>, DeviceBuffer<f32>)>>,
    /// bf16 values of the NF4 matrices products read (nf4.rs).
    nf4_scratch: Mutex<nf4::Nf4Scratch>,
    /// Per-operation timing when FINETUNE_CUDA_PROFILE is set (printed when the backend is dropped).
    profiler: Option<Profiler>,
    /// The passes' timeline when FINETUNE_CUDA_TIMELINE is set (written when the backend is
    /// dropped); the offload's copies record into it too.
    timeline: Option<Arc<Timeline>>,
    /// How products of two f32 matrices run (the LoRA products in training).
    f32_products: F32Products,
    /// The copies of offloaded activations (offload.rs).
    offload: Offload,
    /// Whether the output projection (the LM head, or the tied embedding table) is kept in
    /// pinned host memory and copied to the device for the products that read it.
    output_projection_in_host: bool,
    /// The adapter gradients in flight on the side stream, per thread (aside.rs).
    aside: Mutex<aside::InFlight>,
}

/// The arithmetic of products of two f32 matrices, and whether activations are rounded once
/// before the products that read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Products {
    /// Operands rounded to TF32 (10-bit mantissa, relative error 2⁻¹¹) on the tensor cores, f32
    /// accumulation: the rank-wide LoRA products are memory-bound, and the tensor cores' wider
    /// tiles run them about 1.5x faster than f32 FFMA. `product_input` rounds the activations
    /// that feed products with frozen matrices to bf16 once (those products round them anyway),
    /// so the LoRA products reading them run on bf16 operands, as in bf16 mixed-precision
    /// training, and read half the bytes.
    Tf32,
    /// Full f32 (FFMA), nothing rounded by `product_input`: for checking against the CPU with
    /// nothing but summation order differing.
    Exact,
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if let Some(p) = &self.profiler {
            eprint!("{}", p.report());
        }
        if let Some(t) = &self.timeline {
            t.write();
        }
    }
}

fn same_shape(a: &CudaTensor, b: &CudaTensor, what: &str) -> Result<()> {
    check_same_shape((a.rows, a.cols), (b.rows, b.cols), what)
}

/// The bf16 bits of the `[rows, cols]` matrix `data` with `room` spare columns after each row
/// and as many spare rows below (zeros), and its row pitch ([`fold::room_pitch`]); dense (pitch
/// `cols`) where that gives none.
fn with_room(data: &[f32], rows: usize, cols: usize, room: usize) -> (Vec<u16>, usize) {
    let Some(pitch) = fold::room_pitch(cols, room) else {
        return (bf16_bits(data), cols);
    };
    let mut bits = vec![0u16; (rows + room) * pitch];
    bits.par_chunks_mut(pitch)
        .zip(data.par_chunks(cols.max(1)))
        .for_each(|(dst, src)| {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = half::bf16::from_f32(x).to_bits();
            }
        });
    (bits, pitch)
}

/// The values of `t`'s rows from its bf16 bits, rows `pitch` values apart.
fn bf16_rows(bits: &[u16], t: &CudaTensor, pitch: usize) -> Vec<f32> {
    bits.chunks(pitch.max(1))
        .take(t.rows)
        .flat_map(|row| &row[..t.cols])
        .map(|&x| half::bf16::from_bits(x).to_f32())
        .collect()
}

/// bf16 bits of f32 values, rounded to nearest even.
fn bf16_bits(data: &[f32]) -> Vec<u16> {
    data.par_iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect()
}

/// `m` locked, also after a panic of an earlier holder: what the backend's mutexes guard is
/// bookkeeping updated in whole assignments, never left half-written.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What kind of tensor `s` holds, for errors.
fn storage_name(s: &Storage) -> &'static str {
    match s {
        Storage::F32(_) => "f32",
        Storage::Bf16(_) => "bf16",
        Storage::Bf16Pitched { .. } => "bf16 (rows with spare columns)",
        Storage::Nf4(_) => "NF4",
        Storage::Host { .. } => "host-resident",
        Storage::Offloaded(_) => "offloaded",
    }
}

/// The values of an f32 tensor; an error naming `op` for any other kind.
fn f32_buffer<'t>(t: &'t CudaTensor, op: &str) -> Result<&'t DeviceBuffer<f32>> {
    match &t.storage {
        Storage::F32(b) => Ok(b),
        other => Err(Error::InvalidArgument(format!(
            "{op} works on f32 tensors; a {} tensor was passed",
            storage_name(other)
        ))),
    }
}

fn wants_f32(t: &CudaTensor, op: &str) -> Result<()> {
    f32_buffer(t, op).map(|_| ())
}

/// The error of an operation on f32 or bf16 tensors given another kind.
fn wants_f32_or_bf16(t: &CudaTensor, op: &str) -> Error {
    Error::InvalidArgument(format!(
        "{op} works on f32 or bf16 tensors; a {:?} tensor was passed",
        t.dtype()
    ))
}

/// What a queued product reads besides its tensors: a bf16 copy of an f32 operand, or the NF4
/// scratch, locked so that no other product overwrites it before this one is queued (one stream
/// runs them in order). Dropped after the product is queued.
#[derive(Default)]
struct Staged<'a> {
    _bf16_copy: Option<DeviceBuffer<u16>>,
    _nf4_scratch: Option<nf4::ScratchGuard<'a>>,
}

impl Staged<'_> {
    /// Whether the operand is the tensor's own memory (nothing made for it).
    fn is_empty(&self) -> bool {
        self._bf16_copy.is_none() && self._nf4_scratch.is_none()
    }
}

/// The addresses of bf16 kernel operands as arguments, with the bf16 copies made of f32 ones
/// (which live until this is dropped, after the kernels reading them are queued).
struct Bf16Operands<const N: usize> {
    args: [Arg; N],
    _buffers: Vec<DeviceBuffer<u16>>,
}

/// Where `lm_head_cross_entropy` reads the head's rows: a device operand (a slice of it per
/// vocabulary chunk), or a host table brought over chunk by chunk through `queue` (head_chunks.rs;
/// the one a pass started, else made for each chunk of token rows).
enum HeadRows<'a> {
    Resident(Operand),
    Streamed {
        table: &'a HostTable,
        queue: Option<HeadChunks>,
    },
}

/// The kernels/flash.cu backward entries for a head dim, where dK/dV is not warp-specialized:
/// head_dim 256 has entries of its own, whose dK/dV launch has twice the blocks along y (one of
/// each pair makes dK, the other dV).
struct FlashEntries {
    dq: &'static str,
    dkdv: &'static str,
    dkdv_split: usize,
}

fn flash_entries(head_dim: usize) -> FlashEntries {
    match head_dim {
        256 => FlashEntries {
            dq: "flash_bwd_dq_hd256",
            dkdv: "flash_bwd_dkdv_hd256",
            dkdv_split: 2,
        },
        _ => FlashEntries {
            dq: "flash_bwd_dq",
            dkdv: "flash_bwd_dkdv",
            dkdv_split: 1,
        },
    }
}

/// How the attention backward leaves its gradients (`CudaBackend::attention_gradients`).
#[derive(Clone, Copy)]
enum GradientForm<'a> {
    /// f32 ([`Backend::attention_backward`]).
    F32,
    /// bf16 product inputs with `room` spare columns, dq and dk turned back by the rotary angles
    /// in `angles` ([`CudaBackend::rope_angles`]): [`Backend::attention_backward_for_products`].
    ProductInputs { angles: &'a CudaTensor, room: usize },
}

impl<'a> GradientForm<'a> {
    fn angles(&self) -> Option<&'a CudaTensor> {
        match *self {
            GradientForm::ProductInputs { angles, .. } => Some(angles),
            GradientForm::F32 => None,
        }
    }
}

/// A dK/dV kernel and its launch: blocks of `keys` key rows and `threads` threads, `split`
/// blocks along y for each (KV head, part), `shared` bytes of dynamic shared memory.
struct DkDvLaunch {
    entry: &'static str,
    keys: usize,
    threads: u32,
    split: usize,
    shared: usize,
}

/// The backward kernels of kernels/flash.cu whose shared memory `flash_shared` sizes.
#[derive(Clone, Copy)]
enum FlashKernel {
    Dq,
    DkDv,
}

/// Dynamic shared memory of a kernels/flash.cu launch: `tiles` bf16 tiles of 64 rows, plus
/// `extra` bytes. A row takes head_dim elements in the warpgroup kernels' swizzled tiles,
/// head_dim + 8 in the mma.sync kernels' padded ones.
fn flash_shared_bytes(head_dim: usize, warpgroup: bool, tiles: usize, extra: usize) -> usize {
    let pitch = if warpgroup { head_dim } else { head_dim + 8 };
    tiles * ATTENTION_TILE * pitch * std::mem::size_of::<u16>() + extra
}

/// The warp-specialized forward for a head dim on sm_90a: its entry and dynamic shared memory
/// (Q's two tiles, then the key/value buffers and the barriers: kernels/flash.cu, FlashKeyRing).
fn warp_specialized_forward(head_dim: usize) -> Option<(&'static str, usize)> {
    let (entry, tiles) = match head_dim {
        256 => ("flash_fwd_ws_hd256", 2 + 2 * FLASH_FWD_STAGES_WIDE),
        hd if hd <= 128 => ("flash_fwd_ws", 2 + 2 * FLASH_FWD_STAGES),
        _ => return None,
    };
    let shared = flash_shared_bytes(head_dim, true, tiles, FLASH_WS_BARRIER_BYTES);
    Some((entry, shared))
}

/// The warp-specialized dK/dV kernel for a head dim on sm_90a (kernels/flash.cu, FlashPairRing):
/// its entry, keys a block and dynamic shared memory.
struct WarpSpecializedDkDv {
    entry: &'static str,
    keys: usize,
    shared: usize,
}

fn warp_specialized_dkdv(head_dim: usize) -> Option<WarpSpecializedDkDv> {
    let f32_bytes = std::mem::size_of::<f32>();
    // Each stage of the ring holds a pair's Q and dO tiles and its lse·log2e and D (2 × 64 f32);
    // at head_dim 256 also its Pᵀ (64 × 64 f32), handed from dV's warpgroup to dK's.
    let stats = 2 * ATTENTION_TILE * f32_bytes;
    let (entry, keys, stages, stage_extra) = match head_dim {
        256 => (
            "flash_bwd_dkdv_ws_hd256",
            ATTENTION_TILE,
            FLASH_WS_STAGES_WIDE,
            stats + ATTENTION_TILE * ATTENTION_TILE * f32_bytes,
        ),
        hd if hd <= 128 => ("flash_bwd_dkdv_ws", FLASH_WS_ROWS, FLASH_WS_STAGES, stats),
        _ => return None,
    };
    // K and V of the block's key tiles, then the stages' tiles.
    let tiles = 2 * keys / ATTENTION_TILE + 2 * stages;
    let extra = stages * stage_extra + FLASH_WS_BARRIER_BYTES;
    Some(WarpSpecializedDkDv {
        entry,
        keys,
        shared: flash_shared_bytes(head_dim, true, tiles, extra),
    })
}

/// The launch of an attention kernel over tiles of ATTENTION_TILE queries (forward, dQ): a block
/// per tile, query head and sequence.
fn attention_query_tiles(s: AttentionShape) -> Shape {
    let tiles = s.seq.div_ceil(ATTENTION_TILE);
    Shape::grid(tiles, s.num_heads, s.batch, ATTENTION_THREADS)
}

/// The kernels' code for an activation (kernels/pointwise.cu).
fn activation_code(act: Activation) -> i32 {
    match act {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
    }
}

fn dim(x: usize) -> Arg {
    Arg::I32(x as i32)
}

fn count(x: usize) -> Arg {
    Arg::I64(x as i64)
}

impl CudaBackend {
    /// The number of CUDA GPUs on this machine.
    pub fn device_count() -> Result<usize> {
        device::gpu_count()
    }

    /// Opens GPU `ordinal` and its cuBLAS handle; kernels compile at their first use.
    pub fn new(ordinal: usize) -> Result<Self> {
        let gpu = Gpu::open(ordinal)?;
        let blas = Blas::new(&gpu)?;
        let kernels = KernelCache::new(&gpu);
        let timeline = Timeline::from_env(ordinal).map(Arc::new);
        let offload = Offload::new(&gpu, timeline.clone())?;
        Ok(CudaBackend {
            gpu,
            kernels,
            blas,
            inv_freq: Mutex::new(None),
            nf4_scratch: Mutex::default(),
            profiler: Profiler::from_env(),
            timeline,
            f32_products: F32Products::Tf32,
            offload,
            output_projection_in_host: false,
            aside: Mutex::default(),
        })
    }

    /// Chooses how products of two f32 matrices run (TF32 unless set otherwise).
    pub fn set_f32_products(&mut self, p: F32Products) {
        self.f32_products = p;
    }

    /// Keeps the output projection (the LM head, or the tied embedding table) that later
    /// [`Backend::upload_output_projection`] calls store in pinned host memory instead of device
    /// memory (1 GiB less on Llama 3): each micro-batch's forward pass copies it to the device
    /// beside its last quarter of layers and frees the copy after the loss; other products that
    /// read it (evaluation, generation) copy it for each product.
    pub fn set_output_projection_in_host(&mut self, in_host: bool) {
        self.output_projection_in_host = in_host;
    }

    /// A frozen bf16 matrix in pinned host memory (`in_chunks`: the output projection), laid
    /// out with `room` spare columns and rows ([`with_room`]).
    fn host_matrix(
        &self,
        data: &[f32],
        rows: usize,
        cols: usize,
        room: usize,
        in_chunks: bool,
    ) -> Result<CudaTensor> {
        check_len(data.len(), rows, cols)?;
        let (bits, pitch) = with_room(data, rows, cols, room);
        let table = HostTable::new(&self.gpu, &bits)?;
        Ok(CudaTensor {
            rows,
            cols,
            storage: Storage::host(table, pitch, in_chunks),
        })
    }

    /// Starts copying a whole host table to the device.
    fn fetch_whole_table(&self, table: &HostTable) -> Result<tensor::Arrival<u16>> {
        let what = "a host matrix's copy on the device";
        self.offload
            .fetch_table(&self.gpu, table, 0..table.len(), what)
    }

    /// The device address of a host table's values for work this thread queues: the copy its
    /// pass brought over (`bring_to_device`; the compute stream waits for it), else a copy made
    /// now, returned to live until the work reading it is queued.
    fn host_table_on_device(
        &self,
        table: &HostTable,
        copies: &HostCopies,
    ) -> Result<(u64, Option<DeviceBuffer<u16>>)> {
        let mut brought = lock(copies);
        match brought.get_mut(&std::thread::current().id()) {
            // The copy lives until the pass releases it, after its products are queued.
            Some(arrival) => Ok((self.buffer_ptr(arrival.wait()?), None)),
            None => {
                let copy = self.fetch_whole_table(table)?.settle()?;
                Ok((self.buffer_ptr(&copy), Some(copy)))
            }
        }
    }

    /// The device, its stream and its memory account.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Queues kernel `program::name`.
    fn run(
        &self,
        program: &'static str,
        name: &'static str,
        shape: Shape,
        args: &[Arg],
    ) -> Result<()> {
        self.run_labelled(program, name, || name.into(), shape, args)
    }

    /// Queues kernel `program::name`, timed under the name `label()` gives when profiling.
    fn run_labelled(
        &self,
        program: &'static str,
        name: &'static str,
        label: impl FnOnce() -> Cow<'static, str>,
        shape: Shape,
        args: &[Arg],
    ) -> Result<()> {
        let f = self.kernels.function(&self.gpu, program, name)?;
        // SAFETY: every call site passes the argument list of kernels/README.md for `name`,
        // with addresses of live buffers of the sizes checked before the call.
        self.timed(label, || unsafe {
            launch::launch(&self.gpu, &f, name, shape, args)
        })
    }

    /// Runs `f`, timed under the name `name()` gives when profiling.
    fn timed<T>(
        &self,
        name: impl FnOnce() -> Cow<'static, str>,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        match &self.profiler {
            Some(p) => p.time(&self.gpu, name(), f),
            None => f(),
        }
    }

    /// A cuBLAS product (see [`Blas::gemm`]), timed under `name` and its shape `m×k×n` (with
    /// `T` for a transposed operand) when profiling.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        name: &'static str,
        a: Operand,
        trans_a: bool,
        b: Operand,
        trans_b: bool,
        alpha: f32,
        addend: Addend,
        c: Operand,
    ) -> Result<()> {
        let tf32 = a.dtype == Dtype::F32 && self.f32_products == F32Products::Tf32;
        let shape = || {
            let k = if trans_a { a.rows } else { a.cols };
            let t = |x: bool| if x { "T" } else { "" };
            let (ta, tb) = (t(trans_a), t(trans_b));
            format!("{name} {}{ta}x{k}x{}{tb}", c.rows, c.cols).into()
        };
        self.timed(shape, || {
            self.blas.gemm(
                &self.gpu,
                Lane::Compute,
                a,
                trans_a,
                b,
                trans_b,
                alpha,
                addend,
                c,
                tf32,
            )
        })
    }

    /// A kernel over many f32 tensors in one launch (kernels/README.md, `*_many_*`): each row
    /// of `rows` is one tensor's operands, the first giving the element count; the kernel reads
    /// their addresses from a table uploaded here, then `args`.
    fn elementwise_many<const N: usize>(
        &self,
        name: &'static str,
        rows: &[[&CudaTensor; N]],
        args: &[Arg],
    ) -> Result<()> {
        let mut table = Vec::with_capacity(rows.len());
        for row in rows {
            let mut ptrs = [0; N];
            for (p, t) in ptrs.iter_mut().zip(row) {
                *p = self.buffer_ptr(f32_buffer(t, name)?);
            }
            table.push((ptrs, row[0].elements()));
        }
        self.launch_over_table(name, &table, 1, args)
    }

    /// Kernel `name` over many tensors (kernels/pointwise.cu `table_row`): one row a tensor, its
    /// `N` device addresses and its element count, taken `group` elements a thread; `args`
    /// follow the table. One launch per `MAX_GRID` rows.
    fn launch_over_table<const N: usize>(
        &self,
        name: &'static str,
        rows: &[([u64; N], usize)],
        group: usize,
        args: &[Arg],
    ) -> Result<()> {
        let cols = N + 1;
        let mut table = Vec::with_capacity(rows.len() * cols);
        let mut longest = 0;
        for (ptrs, n) in rows {
            table.extend_from_slice(ptrs);
            table.push(*n as u64);
            longest = longest.max(*n);
        }
        let blocks = longest.div_ceil(group * BLOCK as usize).clamp(1, MAX_GRID);
        for part in table.chunks(cols * MAX_GRID) {
            let table = self.gpu.upload(part, "a table of tensors")?;
            let mut all = vec![Arg::Ptr(self.buffer_ptr(&table))];
            all.extend_from_slice(args);
            let shape = Shape::grid(blocks, part.len() / cols, 1, BLOCK);
            self.run("pointwise", name, shape, &all)?;
        }
        Ok(())
    }

    /// An elementwise kernel over `n` elements, a thread each (nothing is queued for `n == 0`).
    fn elementwise(&self, name: &'static str, n: usize, args: &[Arg]) -> Result<()> {
        self.elementwise_grouped(name, n, 1, args)
    }

    /// An elementwise kernel whose threads take `group` of the `n` elements each (16-byte
    /// loads: 4 or 8 for the gated kernels, 4 for `add_assign_f32`, 8 for `cast_f32_bf16` and,
    /// where aligned, `cast_f32_bf16_rows`); nothing is queued for `n == 0`.
    fn elementwise_grouped(
        &self,
        name: &'static str,
        n: usize,
        group: usize,
        args: &[Arg],
    ) -> Result<()> {
        self.elementwise_labelled(name, || name.into(), n, group, args)
    }

    /// [`Self::elementwise_grouped`], timed under the name `label()` gives when profiling.
    fn elementwise_labelled(
        &self,
        name: &'static str,
        label: impl FnOnce() -> Cow<'static, str>,
        n: usize,
        group: usize,
        args: &[Arg],
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let shape = Shape::elementwise(n.div_ceil(group));
        self.run_labelled("pointwise", name, label, shape, args)
    }

    /// bf16 values of the `n` f32 values at `src`, written at `dst`. Profiled per element
    /// count (the tensors' shapes tell the callers apart).
    fn cast_f32_bf16(&self, src: u64, dst: u64, n: usize) -> Result<()> {
        let name = "cast_f32_bf16";
        let args = [Arg::Ptr(src), Arg::Ptr(dst), count(n)];
        let label = || format!("{name} of {n}").into();
        self.elementwise_labelled(name, label, n, 8, &args)
    }

    fn buffer_ptr<T>(&self, b: &DeviceBuffer<T>) -> u64 {
        b.slice.device_ptr(self.gpu.stream()).0
    }

    /// The device address of a tensor's values (an NF4 matrix's packed codes); a table in host
    /// memory has none.
    fn ptr(&self, t: &CudaTensor) -> Result<u64> {
        match &t.storage {
            Storage::F32(b) => Ok(self.buffer_ptr(b)),
            Storage::Bf16(b) => Ok(self.buffer_ptr(b)),
            Storage::Nf4(s) => match &s.codes {
                Nf4Codes::Device(codes) => Ok(self.buffer_ptr(codes)),
                Nf4Codes::Host { .. } => Err(Error::InvalidArgument(
                    "an NF4 matrix whose codes are in host memory was passed where device codes \
                     are needed; products dequantize a device copy"
                        .into(),
                )),
            },
            Storage::Bf16Pitched { .. } => Err(Error::InvalidArgument(
                "a matrix with spare columns after each row (a product input or a projection \
                 matrix) was passed to an operation that reads dense rows; only products, \
                 copy_rows, duplicate and download read it"
                    .into(),
            )),
            Storage::Host { .. } => Err(Error::InvalidArgument(
                "a matrix in host memory was passed where a device tensor is needed; embedding \
                 reads it over the bus, products through a device copy"
                    .into(),
            )),
            Storage::Offloaded(_) => Err(Error::InvalidArgument(
                "an offloaded activation was passed where a device tensor is needed; settle it \
                 first"
                    .into(),
            )),
        }
    }

    /// The address of value `at` of the dense f32 or bf16 `t` (row r's first at `r·t.cols`).
    fn address_at(&self, t: &CudaTensor, at: usize) -> Result<u64> {
        let bytes = if t.dtype() == Dtype::Bf16 { 2 } else { 4 };
        Ok(self.ptr(t)? + (at * bytes) as u64)
    }

    /// `t`'s address, or 0 (a kernel's null pointer: none) without `t`.
    fn ptr_or_null(&self, t: Option<&CudaTensor>) -> Result<u64> {
        t.map_or(Ok(0), |t| self.ptr(t))
    }

    /// The address of an f32 tensor, as a kernel argument; `op` names the caller in errors.
    fn f32_arg(&self, t: &CudaTensor, op: &str) -> Result<Arg> {
        wants_f32(t, op)?;
        Ok(Arg::Ptr(self.ptr(t)?))
    }

    fn ints_arg(&self, i: &CudaInts) -> Arg {
        Arg::Ptr(self.buffer_ptr(&i.device))
    }

    fn tensor(&self, rows: usize, cols: usize, what: &str) -> Result<CudaTensor> {
        Ok(CudaTensor {
            rows,
            cols,
            storage: Storage::F32(self.gpu.alloc::<f32>(rows * cols, what)?),
        })
    }

    /// Whether `product_input` rounds to bf16 (not with [`F32Products::Exact`]).
    fn rounds_product_inputs(&self) -> bool {
        self.f32_products != F32Products::Exact
    }

    /// A bf16 copy of an f32 `x` (with `room` spare columns a row: fold.rs) where activations
    /// are rounded ([`F32Products::Tf32`]), for `what`; `None` for a tensor that is not f32 or
    /// where nothing is rounded.
    fn rounded_where_rounding(
        &self,
        x: &CudaTensor,
        room: usize,
        what: &str,
    ) -> Result<Option<CudaTensor>> {
        if !self.rounds_product_inputs() || x.dtype() != Dtype::F32 {
            return Ok(None);
        }
        self.rounded_copy(x, room, what).map(Some)
    }

    /// An uninitialised f32 tensor, or bf16 when `rounded`.
    fn tensor_as(&self, rows: usize, cols: usize, rounded: bool, what: &str) -> Result<CudaTensor> {
        match rounded {
            true => self.bf16_tensor(rows, cols, what),
            false => self.tensor(rows, cols, what),
        }
    }

    /// An uninitialised bf16 product input with `room` spare columns after each row where
    /// [`fold::room_pitch`] gives it (dense otherwise).
    fn product_input_tensor(
        &self,
        rows: usize,
        cols: usize,
        room: usize,
        what: &str,
    ) -> Result<CudaTensor> {
        let Some(pitch) = fold::room_pitch(cols, room) else {
            return self.bf16_tensor(rows, cols, what);
        };
        Ok(CudaTensor {
            rows,
            cols,
            storage: Storage::Bf16Pitched {
                values: self.gpu.alloc::<u16>(rows * pitch, what)?,
                pitch,
            },
        })
    }

    /// The output of a rounding kernel: f32 as computed, or a bf16 product input with `room`.
    fn rounded_output(
        &self,
        like: &CudaTensor,
        rounded: bool,
        room: usize,
        what: &str,
    ) -> Result<CudaTensor> {
        match rounded {
            true => self.product_input_tensor(like.rows, like.cols, room, what),
            false => self.tensor(like.rows, like.cols, what),
        }
    }

    /// Address of `t`'s values for kernels that write rows `t.pitch()` apart.
    fn rows_ptr(&self, t: &CudaTensor) -> Result<u64> {
        match &t.storage {
            Storage::Bf16Pitched { values, .. } => Ok(self.buffer_ptr(values)),
            _ => self.ptr(t),
        }
    }

    /// The address of the dense f32 or bf16 `t` read by an element-wise kernel, and whether
    /// it is bf16.
    fn pointwise_input(&self, t: &CudaTensor, what: &str) -> Result<(Arg, bool)> {
        match &t.storage {
            Storage::F32(_) | Storage::Bf16(_) => {
                Ok((Arg::Ptr(self.ptr(t)?), t.dtype() == Dtype::Bf16))
            }
            _ => Err(wants_f32_or_bf16(t, what)),
        }
    }

    /// The norm kernels' argument pair for their input `x` (kernels/norm.cu, `NORM_IN_*`): its
    /// address and how it is read. A bf16 x as it is; an f32 x rounded to bf16 as it is read
    /// where product inputs are rounded (the residual stream as a bf16 stack keeps it, so that a
    /// copy of x kept for the backward in bf16, [`Backend::norm_input`], reads back the same
    /// values), else as it is.
    fn norm_input_args(&self, x: &CudaTensor, what: &str) -> Result<[Arg; 2]> {
        const F32: i32 = 0;
        const F32_AS_BF16: i32 = 1;
        const BF16: i32 = 2;
        let (arg, bf16) = self.pointwise_input(x, what)?;
        let kind = match (bf16, self.rounds_product_inputs()) {
            (true, _) => BF16,
            (false, true) => F32_AS_BF16,
            (false, false) => F32,
        };
        Ok([arg, Arg::I32(kind)])
    }

    /// Values a thread of a gated kernel takes over `cols`-wide rows of `ts` (rows
    /// `t.pitch()` apart): [`launch::values_a_thread`].
    fn gated_group(&self, cols: usize, ts: &[&CudaTensor]) -> Result<usize> {
        let operands = ts
            .iter()
            .map(|t| Ok((t.pitch(), self.rows_ptr(t)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(launch::values_a_thread(cols, operands))
    }

    /// A gated kernel's argument triple for its f32, bf16 or bf16-with-room input `t`: its
    /// address, the flag saying it is bf16, and its row pitch.
    fn gated_input(&self, t: &CudaTensor, what: &str) -> Result<[Arg; 3]> {
        let bf16 = match &t.storage {
            Storage::F32(_) => false,
            Storage::Bf16(_) | Storage::Bf16Pitched { .. } => true,
            _ => return Err(wants_f32_or_bf16(t, what)),
        };
        Ok([
            Arg::Ptr(self.rows_ptr(t)?),
            Arg::I32(bf16 as i32),
            count(t.pitch()),
        ])
    }

    /// `gated_activation`, written as a bf16 product input with `room` when `rounded`.
    fn gated_activation_as(
        &self,
        g: &CudaTensor,
        u: &CudaTensor,
        act: Activation,
        rounded: bool,
        room: usize,
    ) -> Result<CudaTensor> {
        same_shape(g, u, "gated_activation")?;
        let what = "gated_activation";
        let h = self.rounded_output(g, rounded, room, "MLP activation")?;
        let (n, act) = (count(g.elements()), Arg::I32(activation_code(act)));
        let out = Arg::Ptr(self.rows_ptr(&h)?);
        if !rounded {
            let args = [self.f32_arg(g, what)?, self.f32_arg(u, what)?, out, n, act];
            let group = self.gated_group(g.elements(), &[g, u, &h])?;
            self.elementwise_grouped("gated_act_fwd", g.elements(), group, &args)?;
            return Ok(h);
        }
        let [g_arg, g_bf16, g_pitch] = self.gated_input(g, what)?;
        let [u_arg, u_bf16, u_pitch] = self.gated_input(u, what)?;
        let args = [
            g_arg,
            g_bf16,
            g_pitch,
            u_arg,
            u_bf16,
            u_pitch,
            out,
            n,
            act,
            dim(h.cols),
            count(h.pitch()),
        ];
        let group = self.gated_group(h.cols, &[g, u, &h])?;
        self.elementwise_grouped("gated_act_fwd_bf16", g.elements(), group, &args)?;
        Ok(h)
    }

    /// `gated_activation_backward`, both gradients written as bf16 product inputs with `room`
    /// when `rounded`; with `value`, also `h = act(g)·u` as `gated_activation_as` writes it
    /// (rounded: by the same kernel, in the pass that reads `g` and `u`).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn gated_activation_backward_as(
        &self,
        dh: &CudaTensor,
        g: &CudaTensor,
        u: &CudaTensor,
        act: Activation,
        rounded: bool,
        room: usize,
        value: bool,
    ) -> Result<(CudaTensor, CudaTensor, Option<CudaTensor>)> {
        same_shape(g, u, "gated_activation_backward")?;
        same_shape(g, dh, "gated_activation_backward")?;
        let dg = self.rounded_output(g, rounded, room, "MLP gradient")?;
        let du = self.rounded_output(g, rounded, room, "MLP gradient")?;
        if !rounded {
            let what = "gated_activation_backward";
            let [dg_arg, du_arg] = [&dg, &du].map(|t| self.ptr(t).map(Arg::Ptr));
            let (n, code) = (count(g.elements()), Arg::I32(activation_code(act)));
            let ins = [dh, g, u].map(|t| self.f32_arg(t, what));
            let [dh_arg, g_arg, u_arg] = ins;
            let args = [dh_arg?, g_arg?, u_arg?, dg_arg?, du_arg?, n, code];
            let group = self.gated_group(g.elements(), &[dh, g, u, &dg, &du])?;
            self.elementwise_grouped("gated_act_bwd", g.elements(), group, &args)?;
            let h = value
                .then(|| self.gated_activation_as(g, u, act, false, 0))
                .transpose()?;
            return Ok((dg, du, h));
        }
        let h = value
            .then(|| self.rounded_output(g, true, room, "MLP activation"))
            .transpose()?;
        self.gated_backward_rounded([dh, g, u], [&dg, &du], h.as_ref(), act)?;
        Ok((dg, du, h))
    }

    /// Queues `gated_act_bwd_bf16`: dg and du (and h = act(g)·u when given) as bf16 product
    /// inputs from dh, g and u, an output possibly the input of its own layout.
    fn gated_backward_rounded(
        &self,
        [dh, g, u]: [&CudaTensor; 3],
        [dg, du]: [&CudaTensor; 2],
        h: Option<&CudaTensor>,
        act: Activation,
    ) -> Result<()> {
        let what = "gated_activation_backward";
        let [dh_arg, dh_bf16, dh_pitch] = self.gated_input(dh, what)?;
        let [g_arg, g_bf16, g_pitch] = self.gated_input(g, what)?;
        let [u_arg, u_bf16, u_pitch] = self.gated_input(u, what)?;
        let h_arg = Arg::Ptr(match h {
            Some(h) => self.rows_ptr(h)?,
            None => 0,
        });
        let args = [
            dh_arg,
            dh_bf16,
            dh_pitch,
            g_arg,
            g_bf16,
            g_pitch,
            u_arg,
            u_bf16,
            u_pitch,
            Arg::Ptr(self.rows_ptr(dg)?),
            Arg::Ptr(self.rows_ptr(du)?),
            h_arg,
            count(g.elements()),
            Arg::I32(activation_code(act)),
            dim(dg.cols),
            count(dg.pitch()),
        ];
        let mut operands = vec![dh, g, u, dg, du];
        operands.extend(h);
        let group = self.gated_group(dg.cols, &operands)?;
        self.elementwise_grouped("gated_act_bwd_bf16", g.elements(), group, &args)
    }

    /// An uninitialised bf16 tensor.
    fn bf16_tensor(&self, rows: usize, cols: usize, what: &str) -> Result<CudaTensor> {
        Ok(CudaTensor {
            rows,
            cols,
            storage: Storage::Bf16(self.gpu.alloc::<u16>(rows * cols, what)?),
        })
    }

    /// bf16 copies of `n` f32 values at `src`, for `what` (named in errors and memory reports).
    fn cast_to_bf16(&self, src: u64, n: usize, what: &str) -> Result<DeviceBuffer<u16>> {
        let out = self.gpu.alloc::<u16>(n, what)?;
        self.cast_f32_bf16(src, self.buffer_ptr(&out), n)?;
        Ok(out)
    }

    /// Dense bf16 tensors as kernel arguments: bf16 ones as they are, f32 ones through bf16
    /// copies (held by the result); `op` names the caller in errors.
    fn bf16_operands<const N: usize>(
        &self,
        ts: [&CudaTensor; N],
        op: &str,
    ) -> Result<Bf16Operands<N>> {
        let mut buffers = Vec::with_capacity(N);
        let mut args = Vec::with_capacity(N);
        for t in ts {
            match &t.storage {
                Storage::Bf16(b) => args.push(Arg::Ptr(self.buffer_ptr(b))),
                _ => {
                    wants_f32(t, op)?;
                    let copy = self.cast_to_bf16(self.ptr(t)?, t.elements(), OPERAND_COPY)?;
                    args.push(Arg::Ptr(self.buffer_ptr(&copy)));
                    buffers.push(copy);
                }
            }
        }
        Ok(Bf16Operands {
            args: args.try_into().expect("one argument per tensor"),
            _buffers: buffers,
        })
    }

    /// `t` as a matrix-product operand: rounded to bf16 when `bf16` and stored in f32, an NF4
    /// matrix dequantized to bf16, a matrix in host memory read from the device copy a pass
    /// brought over (`bring_to_device`) or else copied to the device for this product (the
    /// product waits for the copy). What is returned beside it must live until the product is
    /// queued.
    fn operand(&self, t: &CudaTensor, bf16: bool) -> Result<(Operand, Staged<'_>)> {
        let mut staged = Staged::default();
        let (ptr, dtype) = match (&t.storage, bf16) {
            (Storage::Nf4(s), _) => {
                let (ptr, scratch, _) = self.dequantize_nf4(s, t.rows, t.cols, t.cols, 0, None)?;
                staged._nf4_scratch = Some(scratch);
                (ptr, Dtype::Bf16)
            }
            (Storage::Host { table, copies, .. }, _) => {
                let (ptr, copy) = self.host_table_on_device(table, copies)?;
                staged._bf16_copy = copy;
                (ptr, Dtype::Bf16)
            }
            (Storage::F32(_), true) => {
                let copy = self.cast_to_bf16(self.ptr(t)?, t.elements(), OPERAND_COPY)?;
                let ptr = self.buffer_ptr(&copy);
                staged._bf16_copy = Some(copy);
                (ptr, Dtype::Bf16)
            }
            (Storage::Bf16Pitched { values, pitch }, _) => {
                let operand = Operand {
                    pitch: *pitch,
                    ..Operand::dense(self.buffer_ptr(values), Dtype::Bf16, t.rows, t.cols)
                };
                return Ok((operand, staged));
            }
            _ => (self.ptr(t)?, t.dtype()),
        };
        // Rows `pitch` apart in a host matrix's copy laid out with room, dense otherwise.
        let operand = Operand {
            pitch: t.pitch(),
            ..Operand::dense(ptr, dtype, t.rows, t.cols)
        };
        Ok((operand, staged))
    }

    /// A device copy of `b`.
    fn copy_buffer<T: DeviceRepr>(
        &self,
        b: &DeviceBuffer<T>,
        what: &str,
    ) -> Result<DeviceBuffer<T>> {
        self.copy_range(b, 0..b.elements(), what)
    }

    /// A device copy of elements `range` of `b`.
    fn copy_range<T: DeviceRepr>(
        &self,
        b: &DeviceBuffer<T>,
        range: std::ops::Range<usize>,
        what: &str,
    ) -> Result<DeviceBuffer<T>> {
        let mut out = self.gpu.alloc::<T>(range.len(), what)?;
        self.gpu
            .stream()
            .memcpy_dtod(&b.slice.slice(range), &mut *out.slice)
            .map_err(driver_error(what))?;
        Ok(out)
    }

    /// The device copy of `inv_freq`, uploaded once while it stays the same.
    fn inv_freq_ptr(&self, inv_freq: &[f32]) -> Result<u64> {
        let mut cached = self.inv_freq.lock().expect("no panic holds it");
        if cached
            .as_ref()
            .is_none_or(|(host, _)| host.as_slice() != inv_freq)
        {
            let dev = self.gpu.upload(inv_freq, "RoPE frequencies")?;
            *cached = Some((inv_freq.to_vec(), dev));
        }
        let (_, dev) = cached.as_ref().expect("set just above");
        Ok(self.buffer_ptr(dev))
    }

    fn check_ids(ints: &CudaInts, bound: usize, what: &str, allow_ignore: bool) -> Result<()> {
        let valid =
            |i: i32| (i >= 0 && (i as usize) < bound) || (allow_ignore && i == IGNORE_LABEL);
        match ints.host.iter().position(|&i| !valid(i)) {
            None => Ok(()),
            Some(p) => Err(Error::InvalidArgument(format!(
                "{what} {} at row {p} is outside [0, {bound})",
                ints.host[p]
            ))),
        }
    }

    fn check_attention(
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        segments: &CudaInts,
        s: AttentionShape,
    ) -> Result<()> {
        check_attention_shapes(
            (q.rows, q.cols),
            (k.rows, k.cols),
            (v.rows, v.cols),
            segments.host.len(),
            s,
            Some(MAX_HEAD_DIM),
        )
    }

    /// Whether the training attention of `head_dim` runs on tensor cores (kernels/flash.cu),
    /// reading q, k, v and dO in bf16 (q, k, v as `attention_inputs` left them, f32 operands
    /// through bf16 copies); else on kernels/attention.cu's f32 kernels.
    fn tensor_core_attention(&self, head_dim: usize) -> bool {
        TENSOR_CORE_HEAD_DIMS.contains(&head_dim)
            || (head_dim == 256 && kernels::warpgroup_products(self.kernels.arch()))
    }

    /// The tensor-core forward's entry and launch: on sm_90a the warp-specialized kernel (128
    /// queries a block: Q's two tiles and the key/value buffers), else 64 queries a block of 128
    /// threads (head_dim 64 and 128).
    fn flash_forward_launch(&self, s: AttentionShape) -> (&'static str, Shape) {
        let warpgroups = kernels::warpgroup_products(self.kernels.arch());
        if let Some((entry, shared)) = warp_specialized_forward(s.head_dim).filter(|_| warpgroups) {
            let blocks = s.seq.div_ceil(FLASH_WS_ROWS);
            let shape = Shape::grid(blocks, s.num_heads, s.batch, FLASH_WS_THREADS);
            return (entry, shape.with_shared(shared));
        }
        // mma.sync: K and V in two buffers each, rows padded.
        let shared = flash_shared_bytes(s.head_dim, false, 4, 0);
        ("flash_fwd", attention_query_tiles(s).with_shared(shared))
    }

    /// The tensor-core dK/dV's entry and launch: on sm_90a the warp-specialized kernel (128 keys
    /// a block, 64 at head_dim 256: their K and V tiles, and a ring of buffers of a pair's Q and
    /// dO tiles with its statistics) where its blocks, one a query head, fill every
    /// multiprocessor (with fewer, its larger blocks were slower: seq 1000 with 8 query heads
    /// +8 %), else 64 keys a block of 128 threads (head_dim 256: twice the blocks along y,
    /// `dkdv_split`).
    fn flash_dkdv_launch(&self, s: AttentionShape) -> DkDvLaunch {
        let warpgroups = kernels::warpgroup_products(self.kernels.arch());
        if let Some(ws) = warp_specialized_dkdv(s.head_dim).filter(|_| warpgroups) {
            let blocks = s.seq.div_ceil(ws.keys) * s.num_heads * s.batch;
            if blocks >= self.gpu.multiprocessors {
                return DkDvLaunch {
                    entry: ws.entry,
                    keys: ws.keys,
                    threads: FLASH_WS_THREADS,
                    split: 1,
                    shared: ws.shared,
                };
            }
        }
        // lse·log2e and D of a tile of queries (2 × 64 f32), two buffers of them.
        let stats = 2 * ATTENTION_TILE * std::mem::size_of::<f32>();
        let e = flash_entries(s.head_dim);
        DkDvLaunch {
            entry: e.dkdv,
            keys: ATTENTION_TILE,
            threads: ATTENTION_THREADS,
            split: e.dkdv_split,
            shared: self.flash_shared(FlashKernel::DkDv, s.head_dim, 2 * stats),
        }
    }

    /// The dynamic shared memory a backward `kernel` launch for `head_dim` takes
    /// (kernels/flash.cu, each launch line), with `extra` bytes after its tiles: the warpgroup
    /// versions (sm_90a) keep Q, K or both in shared memory beside the streamed buffers
    /// (`flash_dkdv_launch` sizes the warp-specialized dK/dV).
    fn flash_shared(&self, kernel: FlashKernel, head_dim: usize, extra: usize) -> usize {
        let warpgroup = kernels::warpgroup_products(self.kernels.arch());
        let tiles = match (kernel, warpgroup) {
            (FlashKernel::Dq, false) => 4,
            (FlashKernel::Dq, true) => 6,
            (FlashKernel::DkDv, false) => 5,
            (FlashKernel::DkDv, true) => 6,
        };
        flash_shared_bytes(head_dim, warpgroup, tiles, extra)
    }

    /// RMSNorm of `x`'s rows into `y` (f32, or a bf16 product input: `rmsnorm_fwd_bf16`);
    /// returns the scales r.
    fn rmsnorm_into(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        eps: f32,
        unit_offset: bool,
        y: &CudaTensor,
    ) -> Result<CudaTensor> {
        let r = self.tensor(x.rows, 1, "rmsnorm scales")?;
        self.rmsnorm_rows_into(x, 0, w, eps, unit_offset, y, &r)?;
        Ok(r)
    }

    /// The RMSNorm of rows `[start, start + y.rows)` of `x` into `y` (f32, or bf16 with its
    /// rows `y.pitch()` apart), their scales into the same rows of `r` (kernels/norm.cu).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_rows_into(
        &self,
        x: &CudaTensor,
        start: usize,
        w: &CudaTensor,
        eps: f32,
        unit_offset: bool,
        y: &CudaTensor,
        r: &CudaTensor,
    ) -> Result<()> {
        if w.elements() != x.cols {
            return Err(Error::InvalidArgument(format!(
                "rmsnorm: weight of {} values for rows of {}",
                w.elements(),
                x.cols
            )));
        }
        super::check_rows(x.rows, start, y.rows, (x.cols, y.cols), "rmsnorm")?;
        check_len(r.elements(), x.rows, 1)?;
        if y.rows == 0 {
            return Ok(());
        }
        // Row `start` of x (dense f32 or bf16: norm_input_args checks it), scale `start` of r.
        let [_, kind] = self.norm_input_args(x, "rmsnorm")?;
        wants_f32(r, "rmsnorm scales")?;
        let mut args = vec![
            Arg::Ptr(self.address_at(x, start * x.cols)?),
            kind,
            self.f32_arg(w, "rmsnorm weight")?,
            Arg::Ptr(self.rows_ptr(y)?),
            Arg::Ptr(self.address_at(r, start)?),
            dim(y.rows),
            dim(x.cols),
        ];
        let kernel = match y.dtype() {
            Dtype::F32 => "rmsnorm_fwd",
            Dtype::Bf16 => {
                args.push(count(y.pitch()));
                "rmsnorm_fwd_bf16"
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "rmsnorm: an output of {other:?} values cannot be written"
                )))
            }
        };
        args.extend([Arg::F32(eps), Arg::I32(unit_offset as i32)]);
        self.run("norm", kernel, Shape::per_row(y.rows), &args)
    }

    /// The RMSNorm backward of rows `[start, start + rows of dy)` of `x` into the same rows of
    /// `dx` (`x`'s shape), added to them when `accumulate` (kernels/norm.cu, `rmsnorm_bwd`).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward_into(
        &self,
        dy: &CudaTensor,
        x: &CudaTensor,
        w: &CudaTensor,
        r: &CudaTensor,
        unit_offset: bool,
        start: usize,
        dx: &CudaTensor,
        accumulate: bool,
    ) -> Result<()> {
        let what = "rmsnorm_backward";
        check_norm_backward(
            (dy.rows, dy.cols),
            (x.rows, x.cols),
            w.elements(),
            r.elements(),
            start,
            (dx.rows, dx.cols),
        )?;
        if dy.rows == 0 {
            return Ok(());
        }
        for t in [dy, w, r, dx] {
            wants_f32(t, what)?;
        }
        // Row `start` of x (f32 or bf16) and dx, scale `start` of r.
        let at = |t: &CudaTensor, at: usize| self.address_at(t, at).map(Arg::Ptr);
        let [_, x_kind] = self.norm_input_args(x, what)?;
        let args = [
            Arg::Ptr(self.ptr(dy)?),
            at(x, start * x.cols)?,
            x_kind,
            Arg::Ptr(self.ptr(w)?),
            at(r, start)?,
            at(dx, start * x.cols)?,
            dim(dy.rows),
            dim(x.cols),
            Arg::I32(unit_offset as i32),
            Arg::I32(accumulate as i32),
        ];
        self.run("norm", "rmsnorm_bwd", Shape::per_row(dy.rows), &args)
    }

    /// `c = alpha·op(a)·op(b) (+ c)` into an f32 output operand, the operands' dtypes
    /// resolved as [`Backend::matmul`] states them.
    #[allow(clippy::too_many_arguments)]
    fn matmul_into(
        &self,
        a: &CudaTensor,
        trans_a: bool,
        b: &CudaTensor,
        trans_b: bool,
        alpha: f32,
        c: Operand,
        addend: Addend,
    ) -> Result<()> {
        // Mixed f32 × bf16 (or NF4, dequantized to bf16): the f32 side is rounded to bf16 so
        // cuBLAS runs a bf16 product.
        if a.dtype() == Dtype::Nf4 && b.dtype() == Dtype::Nf4 {
            return Err(Error::InvalidArgument(
                "matmul of two NF4 matrices: at most one operand may be NF4".into(),
            ));
        }
        let bf16 = a.dtype() != Dtype::F32 || b.dtype() != Dtype::F32;
        let (oa, _a_tmp) = self.operand(a, bf16)?;
        let (ob, _b_tmp) = self.operand(b, bf16)?;
        let name = match (bf16, self.f32_products) {
            (true, _) => "gemm_bf16",
            (false, F32Products::Tf32) => "gemm_tf32",
            (false, F32Products::Exact) => "gemm_f32",
        };
        self.gemm(name, oa, trans_a, ob, trans_b, alpha, addend, c)
    }

    /// Rows `[start, start + rows)` of the f32 `t` as a product's output operand.
    fn rows_operand(&self, t: &CudaTensor, start: usize, rows: usize) -> Result<Operand> {
        wants_f32(t, "the rows a product is added into")?;
        if start + rows > t.rows {
            return Err(Error::InvalidArgument(format!(
                "rows {start}..{} of a tensor of {} rows",
                start + rows,
                t.rows
            )));
        }
        let ptr = self.address_at(t, start * t.cols)?;
        Ok(Operand::dense(ptr, Dtype::F32, rows, t.cols))
    }

    /// The arguments of the rope kernels after the tensors (kernels/rope.cu), once `x`'s shape,
    /// the positions and the frequencies are checked against each other.
    fn rope_args(
        &self,
        x: &CudaTensor,
        positions: &CudaInts,
        inv_freq: &[f32],
        head_dim: usize,
        inverse: bool,
    ) -> Result<[Arg; 6]> {
        if head_dim == 0
            || x.cols % head_dim != 0
            || positions.host.len() != x.rows
            || inv_freq.len() != head_dim / 2
        {
            return Err(Error::InvalidArgument(format!(
                "rope: [{}, {}] with head_dim {head_dim}, {} positions, {} frequencies",
                x.rows,
                x.cols,
                positions.host.len(),
                inv_freq.len()
            )));
        }
        Ok([
            self.ints_arg(positions),
            Arg::Ptr(self.inv_freq_ptr(inv_freq)?),
            dim(x.rows),
            dim(x.cols / head_dim),
            dim(head_dim),
            Arg::I32(inverse as i32),
        ])
    }

    /// The rotation kernels' work items, one thread each: (row, pair within a head), each
    /// rotating its pair in every head of the row (kernels/rope.cu).
    fn rope_items(x: &CudaTensor, head_dim: usize) -> usize {
        x.rows * (head_dim / 2)
    }

    /// `rope` of the f32 `x` written rounded to bf16 into a new product input with `room`
    /// ([`Self::product_input_tensor`]), `x` left as it is (kernels/rope.cu, `rope_bf16`).
    #[allow(clippy::too_many_arguments)]
    fn rope_rounded(
        &self,
        x: &CudaTensor,
        positions: &CudaInts,
        inv_freq: &[f32],
        head_dim: usize,
        inverse: bool,
        room: usize,
        what: &str,
    ) -> Result<CudaTensor> {
        let tail = self.rope_args(x, positions, inv_freq, head_dim, inverse)?;
        let y = self.product_input_tensor(x.rows, x.cols, room, what)?;
        let items = Self::rope_items(x, head_dim);
        if items == 0 {
            return Ok(y);
        }
        let mut args = vec![
            self.f32_arg(x, "rope")?,
            Arg::Ptr(self.rows_ptr(&y)?),
            count(y.pitch()),
        ];
        args.extend(tail);
        self.run("rope", "rope_bf16", Shape::elementwise(items), &args)?;
        Ok(y)
    }

    /// Checks the operands and queues the attention forward into `out` (f32; or, for the
    /// tensor-core kernels, bf16 with its rows `out.pitch()` apart); returns `out` and the
    /// log-sum-exp of each score row.
    fn attention_into(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        segments: &CudaInts,
        s: AttentionShape,
        out: CudaTensor,
    ) -> Result<(CudaTensor, CudaTensor)> {
        Self::check_attention(q, k, v, segments, s)?;
        let lse = self.tensor(q.rows, s.num_heads, "attention log-sum-exp")?;
        if q.rows == 0 {
            return Ok((out, lse));
        }
        let what = "attention";
        let (out_ptr, lse_ptr) = (Arg::Ptr(self.rows_ptr(&out)?), Arg::Ptr(self.ptr(&lse)?));
        if self.tensor_core_attention(s.head_dim) {
            let copies = self.bf16_operands([q, k, v], what)?;
            let mut args = copies.args.to_vec();
            args.push(self.ints_arg(segments));
            let out_bf16 = Arg::I32((out.dtype() == Dtype::Bf16) as i32);
            args.extend([out_ptr, out_bf16, count(out.pitch()), lse_ptr]);
            args.extend(Self::attention_dims(s));
            let (entry, shape) = self.flash_forward_launch(s);
            self.run("flash", entry, shape, &args)?;
        } else {
            let shape = attention_query_tiles(s);
            let mut args = vec![
                self.f32_arg(q, what)?,
                self.f32_arg(k, what)?,
                self.f32_arg(v, what)?,
                self.ints_arg(segments),
            ];
            args.extend([self.f32_arg(&out, what)?, lse_ptr]);
            args.extend(Self::attention_dims(s));
            self.run("attention", "attention_fwd", shape, &args)?;
        }
        Ok((out, lse))
    }

    /// (cos θ, sin θ) of each row's rotary angles at `positions`: an f32 tensor [rows, head_dim]
    /// of head_dim/2 pairs (kernels/rope.cu, `rope_angles`), for kernels that turn values back
    /// as they store them.
    fn rope_angles(
        &self,
        like: &CudaTensor,
        positions: &CudaInts,
        inv_freq: &[f32],
        head_dim: usize,
    ) -> Result<CudaTensor> {
        let [positions, inv_freq, rows, ..] =
            self.rope_args(like, positions, inv_freq, head_dim, true)?;
        let angles = self.tensor(like.rows, head_dim, "rope angles")?;
        let items = Self::rope_items(like, head_dim);
        if items > 0 {
            let args = [
                Arg::Ptr(self.ptr(&angles)?),
                positions,
                inv_freq,
                rows,
                dim(head_dim / 2),
            ];
            self.run("rope", "rope_angles", Shape::elementwise(items), &args)?;
        }
        Ok(angles)
    }

    /// The attention's gradients dq, dk, dv (kernels/flash.cu, or attention.cu's f32 kernels)
    /// in the form `form` asks for; `out` and `d_out` are freed before they exist.
    #[allow(clippy::too_many_arguments)]
    fn attention_gradients(
        &self,
        [q, k, v]: [&CudaTensor; 3],
        out: CudaTensor,
        lse: &CudaTensor,
        d_out: CudaTensor,
        segments: &CudaInts,
        s: AttentionShape,
        form: GradientForm,
    ) -> Result<[CudaTensor; 3]> {
        Self::check_attention(q, k, v, segments, s)?;
        same_shape(q, &out, "attention_backward")?;
        same_shape(q, &d_out, "attention_backward")?;
        let what = "attention_backward";
        let flash = self.tensor_core_attention(s.head_dim);
        let gradient = |like: &CudaTensor, what: &str| match form {
            GradientForm::F32 => self.tensor(like.rows, like.cols, what),
            GradientForm::ProductInputs { room, .. } => {
                self.product_input_tensor(like.rows, like.cols, room, what)
            }
        };
        if q.rows == 0 {
            return Ok([
                gradient(q, "attention dq")?,
                gradient(k, "attention dk")?,
                gradient(v, "attention dv")?,
            ]);
        }
        if !flash && form.angles().is_some() {
            return Err(Error::InvalidArgument(format!(
                "{what}: gradients as product inputs need the tensor-core kernels (head_dim {})",
                s.head_dim
            )));
        }
        // delta_t,h = Σ_d dO·O (O in f32, or the product input the forward made of it), read by
        // both gradient kernels. The same pass gives dO the form those read where it comes in
        // another (a copy: bf16 for the tensor-core ones, f32 for the CUDA-core ones); `out`,
        // and a `d_out` copied so, are not needed after it.
        let delta = self.tensor(q.rows, s.num_heads, "attention delta")?;
        let [out_bf16, d_out_bf16] = [&out, &d_out].map(|t| match t.dtype() {
            Dtype::F32 => Ok(false),
            Dtype::Bf16 => Ok(true),
            _ => Err(wants_f32_or_bf16(t, what)),
        });
        let (out_bf16, d_out_bf16) = (out_bf16?, d_out_bf16?);
        let rounded = (flash && !d_out_bf16)
            .then(|| self.gpu.alloc::<u16>(d_out.elements(), OPERAND_COPY))
            .transpose()?;
        let widened = (!flash && d_out_bf16)
            .then(|| self.tensor(d_out.rows, d_out.cols, "attention dO in f32"))
            .transpose()?;
        let rounded_ptr = rounded.as_ref().map(|b| self.buffer_ptr(b));
        let widened_ptr = widened.as_ref().map(|t| self.ptr(t)).transpose()?;
        let args = [
            Arg::Ptr(self.rows_ptr(&out)?),
            dim(out.pitch()),
            Arg::I32(out_bf16 as i32),
            Arg::Ptr(self.ptr(&d_out)?),
            Arg::I32(d_out_bf16 as i32),
            Arg::Ptr(rounded_ptr.unwrap_or(0)),
            Arg::Ptr(widened_ptr.unwrap_or(0)),
            Arg::Ptr(self.ptr(&delta)?),
            dim(q.rows),
            dim(s.num_heads),
            dim(s.head_dim),
        ];
        let warps = Shape::grid((q.rows * s.num_heads).div_ceil(8), 1, 1, 256);
        self.run("attention", "attention_bwd_delta", warps, &args)?;
        drop(out);
        // The kernels read the copy where one was made, and a d_out copied is freed before the
        // gradients are made.
        let copy_ptr = rounded_ptr.or(widened_ptr);
        let d_out_arg = Arg::Ptr(match copy_ptr {
            Some(ptr) => ptr,
            None => self.ptr(&d_out)?,
        });
        let _d_out = copy_ptr.is_none().then_some(d_out);
        let statistics = [
            self.f32_arg(lse, what)?,
            Arg::Ptr(self.ptr(&delta)?),
            self.ints_arg(segments),
        ];
        // Tensor-core kernels read bf16 operands (copies of f32 ones kept until both kernels are
        // queued).
        let qkv = flash
            .then(|| self.bf16_operands([q, k, v], what))
            .transpose()?;
        let mut inputs = match &qkv {
            Some(qkv) => qkv.args.to_vec(),
            None => [q, k, v]
                .iter()
                .map(|t| self.f32_arg(t, what))
                .collect::<Result<_>>()?,
        };
        inputs.push(d_out_arg);
        inputs.extend(statistics);
        let (program, dq_kernel, dq_shared, dkdv) = if flash {
            let dq_shared = self.flash_shared(FlashKernel::Dq, s.head_dim, 0);
            let e = flash_entries(s.head_dim);
            ("flash", e.dq, dq_shared, self.flash_dkdv_launch(s))
        } else {
            let dkdv = DkDvLaunch {
                entry: "attention_bwd_dkdv",
                keys: ATTENTION_TILE,
                threads: ATTENTION_THREADS,
                split: 1,
                shared: 0,
            };
            ("attention", "attention_bwd_dq", 0, dkdv)
        };
        let dq = gradient(q, "attention dq")?;
        let mut args = inputs.clone();
        args.push(Arg::Ptr(self.rows_ptr(&dq)?));
        args.extend(self.gradient_form_args(&dq, form.angles(), flash)?);
        args.extend(Self::attention_dims(s));
        let shape = attention_query_tiles(s);
        self.run(program, dq_kernel, shape.with_shared(dq_shared), &args)?;
        // One block per (key tile, KV head) leaves a short sequence with too few blocks to fill
        // the GPU; then each query-head group is split into parts written to separate slabs.
        let tiles = s.seq.div_ceil(dkdv.keys);
        let keys = tiles * dkdv.keys * s.num_kv_heads * s.batch;
        let group = s.num_heads / s.num_kv_heads;
        let parts = (1..=group)
            .filter(|p| group % p == 0)
            .find(|p| keys * p >= DKDV_KEYS_PER_SM * self.gpu.multiprocessors)
            .unwrap_or(group);
        let dk = gradient(k, "attention dk")?;
        let dv = gradient(v, "attention dv")?;
        let slabs = (parts > 1)
            .then(|| -> Result<_> {
                let n = parts * k.rows;
                Ok((
                    self.tensor(n, k.cols, "attention dk parts")?,
                    self.tensor(n, k.cols, "attention dv parts")?,
                ))
            })
            .transpose()?;
        // Slabs are dense f32, each kernel's share, summed into the gradients below.
        let (dk_out, dv_out, kv_angles) = match &slabs {
            Some((a, b)) => (a, b, None),
            None => (&dk, &dv, form.angles()),
        };
        let mut args = inputs;
        args.push(Arg::Ptr(self.rows_ptr(dk_out)?));
        args.push(Arg::Ptr(self.rows_ptr(dv_out)?));
        args.extend(self.gradient_form_args(dk_out, kv_angles, flash)?);
        args.extend(Self::attention_dims(s));
        let shape = Shape::grid(
            tiles,
            s.num_kv_heads * parts * dkdv.split,
            s.batch,
            dkdv.threads,
        );
        self.run(program, dkdv.entry, shape.with_shared(dkdv.shared), &args)?;
        if let Some((dk_parts, dv_parts)) = &slabs {
            let s = (parts, s.num_kv_heads, s.head_dim);
            self.sum_slabs(dk_parts, s, &dk, form.angles())?;
            self.sum_slabs(dv_parts, s, &dv, None)?;
        }
        Ok([dq, dk, dv])
    }

    /// `sum` = the sum of the `parts` slabs of `slabs` (dense f32, `sum`'s shape each, of
    /// `heads` heads of `head_dim`), added in slab order: f32, or a bf16 product input turned
    /// back by `angles` where given (kernels/pointwise.cu, `sum_slabs_f32` / `sum_slabs_bf16`).
    fn sum_slabs(
        &self,
        slabs: &CudaTensor,
        (parts, heads, head_dim): (usize, usize, usize),
        sum: &CudaTensor,
        angles: Option<&CudaTensor>,
    ) -> Result<()> {
        if sum.dtype() == Dtype::F32 {
            let args = [
                Arg::Ptr(self.ptr(slabs)?),
                Arg::Ptr(self.ptr(sum)?),
                dim(parts),
                count(sum.elements()),
            ];
            return self.elementwise("sum_slabs_f32", sum.elements(), &args);
        }
        let angles = self.ptr_or_null(angles)?;
        let args = [
            Arg::Ptr(self.ptr(slabs)?),
            dim(parts),
            Arg::Ptr(self.rows_ptr(sum)?),
            count(sum.pitch()),
            Arg::Ptr(angles),
            count(sum.rows),
            dim(heads),
            dim(head_dim),
        ];
        self.elementwise("sum_slabs_bf16", sum.elements() / 2, &args)
    }

    /// The arguments after a tensor-core backward kernel's gradient addresses, saying how it
    /// writes gradients like `like` (kernels/flash.cu, `FlashOut`): bf16 or f32, the row pitch,
    /// and the angles turning them back (0: none). The CUDA-core kernels take none.
    fn gradient_form_args(
        &self,
        like: &CudaTensor,
        angles: Option<&CudaTensor>,
        flash: bool,
    ) -> Result<Vec<Arg>> {
        if !flash {
            return Ok(Vec::new());
        }
        let angles = self.ptr_or_null(angles)?;
        Ok(vec![
            Arg::I32((like.dtype() == Dtype::Bf16) as i32),
            count(like.pitch()),
            Arg::Ptr(angles),
        ])
    }

    /// The trailing arguments shared by the attention kernels.
    fn attention_dims(s: AttentionShape) -> [Arg; 6] {
        [
            dim(s.batch),
            dim(s.seq),
            dim(s.num_heads),
            dim(s.num_kv_heads),
            dim(s.head_dim),
            Arg::F32(1.0 / (s.head_dim as f32).sqrt()),
        ]
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Ints = CudaInts;
    type Recording = graph::Recording;

    fn describe(&self) -> String {
        let (major, minor) = self.gpu.capability;
        format!(
            "cuda:{} ({}, sm_{major}{minor})",
            self.gpu.ordinal, self.gpu.name
        )
    }

    fn device_memory(&self) -> Option<DeviceMemory> {
        Some(DeviceMemory {
            live_bytes: self.gpu.memory.live(),
            peak_bytes: self.gpu.memory.peak(),
            peak_set_by: self.gpu.memory.peak_set_by(),
            peak_purposes: self.gpu.memory.peak_purposes(),
        })
    }

    fn reset_peak_memory(&self) {
        self.gpu.memory.reset_peak();
        // Only fails where the driver lacks graph memory, and then no graph holds any.
        let _ = self.gpu.reset_graph_memory_peak();
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        check_len(data.len(), rows, cols)?;
        Ok(CudaTensor {
            rows,
            cols,
            storage: Storage::F32(self.gpu.upload(data, "a tensor")?),
        })
    }

    fn upload_frozen(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        check_len(data.len(), rows, cols)?;
        Ok(CudaTensor {
            rows,
            cols,
            storage: Storage::Bf16(self.gpu.upload(&bf16_bits(data), "a frozen weight")?),
        })
    }

    /// The matrix with [`fold::PROJECTION_ROOM`] spare columns after each row and as many spare
    /// rows below (zeros), where folded products write an adapter's factors (fold.rs); a width
    /// with no room ([`fold::room_pitch`]) is uploaded dense.
    fn upload_projection(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        check_len(data.len(), rows, cols)?;
        let (bits, pitch) = with_room(data, rows, cols, fold::PROJECTION_ROOM);
        let values = self.gpu.upload(&bits, "a projection matrix")?;
        let storage = match pitch == cols {
            true => Storage::Bf16(values),
            false => Storage::Bf16Pitched { values, pitch },
        };
        Ok(CudaTensor {
            rows,
            cols,
            storage,
        })
    }

    fn upload_lookup_table(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        self.host_matrix(data, rows, cols, 0, false)
    }

    /// Laid out as [`Backend::upload_projection`] lays matrices out on the device, so that its
    /// device copies fold adapters into their products the same way.
    fn upload_frozen_in_host(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        self.host_matrix(data, rows, cols, fold::PROJECTION_ROOM, false)
    }

    fn upload_output_projection(
        &self,
        data: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<CudaTensor> {
        match self.output_projection_in_host {
            true => self.host_matrix(data, rows, cols, 0, true),
            false => self.upload_frozen(data, rows, cols),
        }
    }

    fn upload_frozen_nf4(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        self.quantize_nf4(data, rows, cols)
    }

    fn upload_nf4(&self, q: Nf4Tensor) -> Result<CudaTensor> {
        self.upload_nf4_tensor(&q)
    }

    fn upload_ints(&self, data: &[i32]) -> Result<CudaInts> {
        Ok(CudaInts {
            device: self.gpu.upload(data, "token ids")?,
            host: data.to_vec(),
        })
    }

    fn write(&self, t: &mut CudaTensor, data: &[f32]) -> Result<()> {
        check_len(data.len(), t.rows, t.cols)?;
        let Storage::F32(b) = &mut t.storage else {
            return wants_f32(t, "write");
        };
        self.gpu
            .stream()
            .memcpy_htod(data, &mut *b.slice)
            .map_err(driver_error("writing a tensor"))
    }

    fn write_ints(&self, ints: &mut CudaInts, data: &[i32]) -> Result<()> {
        check_len(data.len(), ints.host.len(), 1)?;
        self.gpu
            .stream()
            .memcpy_htod(data, &mut *ints.device.slice)
            .map_err(driver_error("writing token ids"))?;
        ints.host.copy_from_slice(data);
        Ok(())
    }

    fn download(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        match &t.storage {
            Storage::Host { table, pitch, .. } => Ok(bf16_rows(table.bits()?, t, *pitch)),
            Storage::F32(b) => self.gpu.download(&b.slice, "downloading a tensor"),
            Storage::Bf16(b) => Ok(self
                .gpu
                .download(&b.slice, "downloading a weight")?
                .into_iter()
                .map(|x| half::bf16::from_bits(x).to_f32())
                .collect()),
            Storage::Bf16Pitched { values, pitch } => {
                let bits = self
                    .gpu
                    .download(&values.slice, "downloading a product input")?;
                Ok(bf16_rows(&bits, t, *pitch))
            }
            Storage::Nf4(_) => Ok(self.download_nf4(t)?.dequantize()),
            Storage::Offloaded(o) => {
                let bytes = self.offload.host_bytes(o)?;
                let bf16 = || -> Vec<u16> {
                    bytes
                        .chunks_exact(2)
                        .map(|b| u16::from_ne_bytes([b[0], b[1]]))
                        .collect()
                };
                Ok(match o.layout {
                    StashedLayout::F32 => bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                    StashedLayout::Bf16 => bf16_rows(&bf16(), t, t.cols),
                    StashedLayout::Bf16Pitched(pitch) => bf16_rows(&bf16(), t, pitch),
                })
            }
        }
    }

    fn stash_moves(&self) -> bool {
        true
    }

    fn mark(&self, point: PassPoint) -> Result<()> {
        match &self.timeline {
            Some(t) => t.mark(&self.gpu, point),
            None => Ok(()),
        }
    }

    fn stash_all<const N: usize>(&self, ts: [CudaTensor; N]) -> Result<[CudaTensor; N]> {
        self.offload.stash_all(&self.gpu, ts)
    }

    fn fetch_stashed(&self, mut t: CudaTensor) -> Result<CudaTensor> {
        self.offload.fetch(&self.gpu, &mut t)?;
        Ok(t)
    }

    fn settle(&self, t: CudaTensor) -> Result<CudaTensor> {
        self.offload.settle(&self.gpu, t)
    }

    /// The output projection (`in_chunks`) starts coming over in chunks, which this thread's
    /// next loss takes (head_chunks.rs); any other host matrix comes over whole.
    fn bring_to_device(&self, t: &CudaTensor) -> Result<bool> {
        /// Starts `make` for this thread unless it holds one already; whether it started.
        fn once<T>(
            brought: &Mutex<HashMap<ThreadId, T>>,
            make: impl FnOnce() -> Result<T>,
        ) -> Result<bool> {
            match lock(brought).entry(std::thread::current().id()) {
                Entry::Vacant(slot) => slot.insert(make()?),
                Entry::Occupied(_) => return Ok(false),
            };
            Ok(true)
        }
        match &t.storage {
            Storage::Host {
                table,
                in_chunks: true,
                chunks,
                ..
            } => once(chunks, || {
                HeadChunks::start(&self.offload, &self.gpu, table, t.rows, t.cols)
            }),
            Storage::Host { table, copies, .. } => once(copies, || self.fetch_whole_table(table)),
            Storage::Nf4(s) => match &s.codes {
                Nf4Codes::Host { table, copies, .. } => {
                    once(copies, || self.fetch_whole_table(table))
                }
                Nf4Codes::Device(_) => Ok(false),
            },
            _ => Ok(false),
        }
    }

    fn release_device_copy(&self, t: &CudaTensor) {
        // Freed in stream order, after the work queued before.
        let thread = std::thread::current().id();
        match &t.storage {
            Storage::Host { copies, chunks, .. } => {
                drop(lock(copies).remove(&thread));
                drop(lock(chunks).remove(&thread));
            }
            Storage::Nf4(s) => {
                if let Nf4Codes::Host { copies, .. } = &s.codes {
                    drop(lock(copies).remove(&thread));
                }
            }
            _ => {}
        }
    }

    fn keep_codes_in_host(&self, t: CudaTensor) -> Result<CudaTensor> {
        self.nf4_codes_to_host(t)
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            rows,
            cols,
            storage: Storage::F32(self.gpu.alloc_zeros(rows * cols, "a tensor")?),
        })
    }

    fn output(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        self.tensor(rows, cols, "a tensor")
    }

    fn duplicate(&self, t: &CudaTensor) -> Result<CudaTensor> {
        let storage = match &t.storage {
            Storage::F32(b) => Storage::F32(self.copy_buffer(b, "a tensor copy")?),
            Storage::Bf16(b) => Storage::Bf16(self.copy_buffer(b, "a weight copy")?),
            Storage::Bf16Pitched { values, pitch } => Storage::Bf16Pitched {
                values: self.copy_buffer(values, "a product input copy")?,
                pitch: *pitch,
            },
            Storage::Nf4(s) => Storage::Nf4(Box::new(self.duplicate_nf4(s)?)),
            Storage::Host {
                table,
                pitch,
                in_chunks,
                ..
            } => Storage::host(
                HostTable::new(&self.gpu, table.bits()?)?,
                *pitch,
                *in_chunks,
            ),
            Storage::Offloaded(_) => {
                return Err(Error::InvalidArgument(
                    "duplicate: an offloaded activation must be settled first".into(),
                ))
            }
        };
        Ok(CudaTensor {
            rows: t.rows,
            cols: t.cols,
            storage,
        })
    }

    fn shape(&self, t: &CudaTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn reshape(&self, t: CudaTensor, rows: usize, cols: usize) -> CudaTensor {
        assert_eq!(
            t.elements(),
            rows * cols,
            "reshape changes the element count"
        );
        assert!(
            cols == t.cols || t.pitch() == t.cols,
            "reshape of rows with spare columns to another row length"
        );
        CudaTensor { rows, cols, ..t }
    }

    fn adapter_product(
        &self,
        x: &CudaTensor,
        m: &CudaTensor,
        trans_m: bool,
        alpha: f32,
    ) -> Result<CudaTensor> {
        // Stored in bf16 where the products reading it would round it (a bf16 product: one
        // operand bf16 or NF4); f32 otherwise, as any product.
        let bf16 = x.dtype() != Dtype::F32 || m.dtype() != Dtype::F32;
        if !self.rounds_product_inputs() || !bf16 || x.cols == 0 {
            return self.product(x, false, m, trans_m, alpha);
        }
        let cols = if trans_m { m.rows } else { m.cols };
        let xa = self.bf16_tensor(x.rows, cols, "an adapter's rank-wide product")?;
        let (out, _) = self.operand(&xa, false)?;
        self.matmul_into(x, false, m, trans_m, alpha, out, Addend::Nothing)?;
        Ok(xa)
    }

    fn matmul(
        &self,
        a: &CudaTensor,
        trans_a: bool,
        b: &CudaTensor,
        trans_b: bool,
        alpha: f32,
        c: &mut CudaTensor,
        accumulate: bool,
    ) -> Result<()> {
        wants_f32(c, "matmul output")?;
        let k = if trans_a { a.rows } else { a.cols };
        if k == 0 {
            return if accumulate {
                Ok(())
            } else {
                self.fill_zero(c)
            };
        }
        let (oc, _) = self.operand(c, false)?;
        let addend = if accumulate {
            Addend::Output
        } else {
            Addend::Nothing
        };
        self.matmul_into(a, trans_a, b, trans_b, alpha, oc, addend)
    }

    /// Rounds an f32 `x` to bf16 once (the products would each round it otherwise), with
    /// `room` spare columns after each row for the adapted products (fold.rs); with
    /// [`F32Products::Exact`] nothing is rounded.
    fn rounded_product_input(&self, x: &CudaTensor, room: usize) -> Result<Option<CudaTensor>> {
        self.rounded_where_rounding(x, room, "a product input")
    }

    fn product_input_rows(
        &self,
        x: &CudaTensor,
        start: usize,
        rows: usize,
        room: usize,
    ) -> Result<CudaTensor> {
        if !self.rounds_product_inputs() || x.dtype() != Dtype::F32 {
            return self.product_input(self.copy_rows(x, start, rows)?, room);
        }
        super::check_rows(x.rows, start, rows, (x.cols, x.cols), "product_input_rows")?;
        self.rounded_rows(x, start..start + rows, room, "a product input")
    }

    /// All in one launch (`cast_many_f32_bf16`) in queued work: the factors' ~450 casts a pass
    /// on Llama 3 8B were as many launches of a few microseconds. Recorded work rounds them one
    /// by one (a replay launches them at no host cost, and the launch's table of addresses
    /// would be a copy from host memory inside the recording).
    fn rounded_product_inputs(&self, xs: &[&CudaTensor]) -> Result<Option<Vec<CudaTensor>>> {
        if self.gpu.records_here() {
            return crate::backend::rounded_one_by_one(self, xs);
        }
        if !self.rounds_product_inputs() || xs.iter().any(|x| x.dtype() != Dtype::F32) {
            return Ok(None);
        }
        let what = "an adapter factor in bf16";
        let mut out = Vec::with_capacity(xs.len());
        let mut rows = Vec::with_capacity(xs.len());
        for x in xs {
            let y = self.bf16_tensor(x.rows, x.cols, what)?;
            rows.push(([self.ptr(x)?, self.ptr(&y)?], x.elements()));
            out.push(y);
        }
        self.launch_over_table("cast_many_f32_bf16", &rows, 8, &[])?;
        Ok(Some(out))
    }

    /// A bf16 copy of an f32 `x` where product inputs are rounded: what the norm kernels read
    /// of `x` there (`norm_input_args`).
    fn norm_input(&self, x: &CudaTensor) -> Result<Option<CudaTensor>> {
        self.rounded_where_rounding(x, 0, "a norm input")
    }

    fn adapted_product(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        xa: &CudaTensor,
        b: &CudaTensor,
        s: f32,
        out: ProductOutput,
    ) -> Result<CudaTensor> {
        match self.folded_product(x, w, xa, b, s, out, None)? {
            Some(y) => Ok(y),
            None => super::adapted_product_in_two(self, x, w, xa, b, s),
        }
    }

    fn adapted_product_plus(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        xa: &CudaTensor,
        b: &CudaTensor,
        s: f32,
        plus: &CudaTensor,
    ) -> Result<CudaTensor> {
        let sums = ProductOutput::Sums;
        match self.folded_product(x, w, xa, b, s, sums, Some(plus))? {
            Some(y) => Ok(y),
            None => super::adapted_product_plus_in_two(self, x, w, xa, b, s, plus),
        }
    }

    fn adapted_product_add_rows(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        xa: &CudaTensor,
        b: &CudaTensor,
        s: f32,
        acc: &mut CudaTensor,
        start: usize,
    ) -> Result<()> {
        if acc.cols != w.rows {
            return Err(Error::InvalidArgument(format!(
                "adapted product of {} outputs added into rows of {} columns",
                w.rows, acc.cols
            )));
        }
        let rows = self.rows_operand(acc, start, x.rows)?;
        if self.folded_product_into(x, w, xa, b, s, rows, Addend::Output)? {
            return Ok(());
        }
        // The two products of `adapted_product_in_two`, each added into the rows.
        self.matmul_into(xa, false, b, true, s, rows, Addend::Output)?;
        self.matmul_into(x, false, w, true, 1.0, rows, Addend::Output)
    }

    fn adapted_product_backward(
        &self,
        dy: &CudaTensor,
        w: &CudaTensor,
        dxa: &CudaTensor,
        a: &CudaTensor,
        acc: Option<CudaTensor>,
        out: ProductOutput,
    ) -> Result<CudaTensor> {
        match self.folded_product_backward(dy, w, dxa, a, acc, out)? {
            Ok(dx) => Ok(dx),
            Err(acc) => super::adapted_product_backward_in_two(self, dy, w, dxa, a, acc),
        }
    }

    fn add_row_vector(&self, x: &mut CudaTensor, bias: &CudaTensor) -> Result<()> {
        if bias.elements() != x.cols {
            return Err(Error::InvalidArgument(format!(
                "bias of {} values for rows of {}",
                bias.elements(),
                x.cols
            )));
        }
        let args = [
            self.f32_arg(x, "add_row_vector")?,
            self.f32_arg(bias, "add_row_vector")?,
            count(x.rows),
            dim(x.cols),
        ];
        self.elementwise("add_row_vector_f32", x.elements(), &args)
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        same_shape(x, y, "add_assign")?;
        let args = [
            self.f32_arg(x, "add_assign")?,
            self.f32_arg(y, "add_assign")?,
            count(x.elements()),
        ];
        self.elementwise_grouped("add_assign_f32", x.elements(), 4, &args)
    }

    fn fill_zero(&self, t: &mut CudaTensor) -> Result<()> {
        let Storage::F32(b) = &mut t.storage else {
            return wants_f32(t, "fill_zero");
        };
        self.gpu
            .stream()
            .memset_zeros(&mut *b.slice)
            .map_err(driver_error("zeroing a tensor"))
    }

    fn sum_squares(&self, xs: &[&CudaTensor]) -> Result<f64> {
        let out = self.gpu.alloc_zeros::<f64>(1, "a sum")?;
        let rows: Vec<[&CudaTensor; 1]> = xs.iter().map(|&x| [x]).collect();
        let args = [Arg::Ptr(self.buffer_ptr(&out))];
        self.elementwise_many("sum_squares_many_f32", &rows, &args)?;
        Ok(self.gpu.download(&out.slice, "a sum")?[0])
    }

    fn has_non_finite(&self, x: &CudaTensor) -> Result<bool> {
        let flag = self.gpu.alloc_zeros::<u32>(1, "a flag")?;
        let args = [
            self.f32_arg(x, "has_non_finite")?,
            count(x.elements()),
            Arg::Ptr(self.buffer_ptr(&flag)),
        ];
        self.elementwise("find_non_finite_f32", x.elements(), &args)?;
        Ok(self.gpu.download(&flag.slice, "a flag")?[0] != 0)
    }

    fn embedding(&self, table: &CudaTensor, ids: &CudaInts, scale: f32) -> Result<CudaTensor> {
        Self::check_ids(ids, table.rows, "token id", false)?;
        let (rows, cols) = (ids.host.len(), table.cols);
        let (kernel, table_ptr) = match &table.storage {
            Storage::Host { table: t, .. } if table.pitch() == table.cols => {
                ("embedding_bf16", t.device_ptr())
            }
            Storage::Bf16(_) => ("embedding_bf16", self.ptr(table)?),
            Storage::F32(_) => ("embedding_f32", self.ptr(table)?),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "embedding: the table is {}; embeddings are never quantized or offloaded",
                    storage_name(&table.storage)
                )))
            }
        };
        let out = self.tensor(rows, cols, "embeddings")?;
        let args = [
            Arg::Ptr(table_ptr),
            self.ints_arg(ids),
            Arg::Ptr(self.ptr(&out)?),
            dim(rows),
            dim(cols),
            Arg::F32(scale),
        ];
        self.elementwise(kernel, rows * cols, &args)?;
        Ok(out)
    }

    fn rmsnorm(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        eps: f32,
        unit_offset: bool,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let y = self.tensor(x.rows, x.cols, "rmsnorm output")?;
        let r = self.rmsnorm_into(x, w, eps, unit_offset, &y)?;
        Ok((y, r))
    }

    fn rmsnorm_for_products(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        eps: f32,
        unit_offset: bool,
        room: usize,
    ) -> Result<(CudaTensor, CudaTensor)> {
        if !self.rounds_product_inputs() {
            return self.rmsnorm(x, w, eps, unit_offset);
        }
        let y = self.product_input_tensor(x.rows, x.cols, room, "a product input")?;
        let r = self.rmsnorm_into(x, w, eps, unit_offset, &y)?;
        Ok((y, r))
    }

    fn rmsnorm_chunks_for_products(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        eps: f32,
        unit_offset: bool,
        room: usize,
        chunks: &[(usize, usize)],
    ) -> Result<(Vec<CudaTensor>, CudaTensor)> {
        if !self.rounds_product_inputs() {
            return super::rmsnorm_then_chunks(self, x, w, (eps, unit_offset), room, chunks);
        }
        let r = self.tensor(x.rows, 1, "rmsnorm scales")?;
        let mut parts = Vec::with_capacity(chunks.len());
        for &(start, rows) in chunks {
            let y = self.product_input_tensor(rows, x.cols, room, "a product input")?;
            self.rmsnorm_rows_into(x, start, w, eps, unit_offset, &y, &r)?;
            parts.push(y);
        }
        Ok((parts, r))
    }

    fn rmsnorm_backward(
        &self,
        dy: &CudaTensor,
        x: &CudaTensor,
        w: &CudaTensor,
        r: &CudaTensor,
        unit_offset: bool,
        acc: Option<CudaTensor>,
    ) -> Result<CudaTensor> {
        same_shape(dy, x, "rmsnorm_backward")?;
        let accumulate = acc.is_some();
        let dx = match acc {
            Some(acc) => acc,
            None => self.tensor(x.rows, x.cols, "rmsnorm gradient")?,
        };
        self.rmsnorm_backward_into(dy, x, w, r, unit_offset, 0, &dx, accumulate)?;
        Ok(dx)
    }

    fn rmsnorm_backward_rows(
        &self,
        dy: &CudaTensor,
        x: &CudaTensor,
        w: &CudaTensor,
        r: &CudaTensor,
        unit_offset: bool,
        start: usize,
        acc: &mut CudaTensor,
    ) -> Result<()> {
        self.rmsnorm_backward_into(dy, x, w, r, unit_offset, start, acc, true)
    }

    fn rope(
        &self,
        x: &mut CudaTensor,
        positions: &CudaInts,
        inv_freq: &[f32],
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        let tail = self.rope_args(x, positions, inv_freq, head_dim, inverse)?;
        let items = Self::rope_items(x, head_dim);
        if items == 0 {
            return Ok(());
        }
        let mut args = vec![self.f32_arg(x, "rope")?];
        args.extend(tail);
        self.run("rope", "rope_f32", Shape::elementwise(items), &args)
    }

    fn rope_for_products(
        &self,
        x: CudaTensor,
        positions: &CudaInts,
        inv_freq: &[f32],
        head_dim: usize,
        inverse: bool,
        room: usize,
    ) -> Result<CudaTensor> {
        if !self.rounds_product_inputs() || x.dtype() != Dtype::F32 {
            return super::rope_then_product_input(
                self, x, positions, inv_freq, head_dim, inverse, room,
            );
        }
        let what = "a product input";
        self.rope_rounded(&x, positions, inv_freq, head_dim, inverse, room, what)
    }

    fn rotated_attention_inputs(
        &self,
        q: CudaTensor,
        k: CudaTensor,
        v: CudaTensor,
        s: AttentionShape,
        positions: &CudaInts,
        inv_freq: &[f32],
    ) -> Result<[CudaTensor; 3]> {
        let f32_qk = q.dtype() == Dtype::F32 && k.dtype() == Dtype::F32;
        if !self.tensor_core_attention(s.head_dim) || !f32_qk {
            return super::rope_then_attention_inputs(self, [q, k, v], s, positions, inv_freq);
        }
        // Rounded as attention_inputs rounds them (dense bf16), the rotation on the way; each
        // f32 tensor is freed once its rounded copy is queued.
        let what = "attention q, k, v in bf16";
        let rounded =
            |t: CudaTensor| self.rope_rounded(&t, positions, inv_freq, s.head_dim, false, 0, what);
        let q = rounded(q)?;
        let k = rounded(k)?;
        self.attention_inputs(q, k, v, s)
    }

    fn attention_inputs(
        &self,
        q: CudaTensor,
        k: CudaTensor,
        v: CudaTensor,
        s: AttentionShape,
    ) -> Result<[CudaTensor; 3]> {
        if !self.tensor_core_attention(s.head_dim) {
            return Ok([q, k, v]);
        }
        // Rounded as the kernels' bf16 copies would be; the f32 values are freed here.
        let [q, k, v] = [q, k, v].map(|t| match t.dtype() {
            Dtype::F32 => self.rounded_copy(&t, 0, "attention q, k, v in bf16"),
            _ => Ok(t),
        });
        Ok([q?, k?, v?])
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        segments: &CudaInts,
        s: AttentionShape,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let out = self.tensor(q.rows, q.cols, "attention output")?;
        self.attention_into(q, k, v, segments, s, out)
    }

    /// Where the tensor-core kernels run and products read rounded inputs, the kernel writes
    /// its output rounded into the product input. A layer at 8,192 tokens on Llama 3 8B then
    /// writes 64 MiB of bf16 in place of 128 MiB of f32, and no cast reads it back (~50 µs).
    fn attention_for_products(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        segments: &CudaInts,
        s: AttentionShape,
        room: usize,
    ) -> Result<(CudaTensor, CudaTensor)> {
        if !self.rounds_product_inputs() || !self.tensor_core_attention(s.head_dim) {
            return super::attention_then_product_input(self, [q, k, v], segments, s, room);
        }
        let out = self.product_input_tensor(q.rows, q.cols, room, "attention output")?;
        self.attention_into(q, k, v, segments, s, out)
    }

    fn attention_backward(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        out: CudaTensor,
        lse: &CudaTensor,
        d_out: CudaTensor,
        segments: &CudaInts,
        s: AttentionShape,
    ) -> Result<(CudaTensor, CudaTensor, CudaTensor)> {
        let form = GradientForm::F32;
        let [dq, dk, dv] =
            self.attention_gradients([q, k, v], out, lse, d_out, segments, s, form)?;
        Ok((dq, dk, dv))
    }

    fn attention_backward_for_products(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        out: CudaTensor,
        lse: &CudaTensor,
        d_out: CudaTensor,
        segments: &CudaInts,
        s: AttentionShape,
        positions: &CudaInts,
        inv_freq: &[f32],
        room: usize,
    ) -> Result<[CudaTensor; 3]> {
        let qkv = [q, k, v];
        if !self.rounds_product_inputs() || !self.tensor_core_attention(s.head_dim) {
            return super::attention_backward_then_product_inputs(
                self, qkv, out, lse, d_out, segments, s, positions, inv_freq, room,
            );
        }
        let angles = self.rope_angles(q, positions, inv_freq, s.head_dim)?;
        let form = GradientForm::ProductInputs {
            angles: &angles,
            room,
        };
        self.attention_gradients(qkv, out, lse, d_out, segments, s, form)
    }

    fn attention_decode(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        heads: (usize, usize, usize),
    ) -> Result<(CudaTensor, CudaTensor)> {
        let (h, kvh, hd) = heads;
        let (m, n) = (q.rows, k.rows);
        let ok = kvh > 0
            && h % kvh == 0
            && hd % 2 == 0
            && hd <= MAX_HEAD_DIM
            && q.cols == h * hd
            && k.cols == kvh * hd
            && (v.rows, v.cols) == (k.rows, k.cols)
            && m <= n;
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "attention_decode: q [{m}, {}], k [{n}, {}], v [{}, {}] for heads {heads:?}",
                q.cols, k.cols, v.rows, v.cols
            )));
        }
        let out = self.tensor(m, q.cols, "attention output")?;
        let lse = self.tensor(m, h, "attention log-sum-exp")?;
        if m == 0 {
            return Ok((out, lse));
        }
        let what = "attention_decode";
        let args = [
            self.f32_arg(q, what)?,
            self.f32_arg(k, what)?,
            self.f32_arg(v, what)?,
            Arg::Ptr(self.ptr(&out)?),
            Arg::Ptr(self.ptr(&lse)?),
            dim(m),
            dim(n),
            dim(h),
            dim(kvh),
            dim(hd),
            Arg::F32(1.0 / (hd as f32).sqrt()),
        ];
        let shape = Shape::grid(m, h, 1, ATTENTION_THREADS);
        self.run("attention", "attention_decode", shape, &args)?;
        Ok((out, lse))
    }

    fn copy_rows(&self, t: &CudaTensor, start: usize, rows: usize) -> Result<CudaTensor> {
        super::check_rows(t.rows, start, rows, (t.cols, t.cols), "copy_rows")?;
        let range = start * t.pitch()..(start + rows) * t.pitch();
        let storage = match &t.storage {
            Storage::F32(b) => Storage::F32(self.copy_range(b, range, "a copy of rows")?),
            Storage::Bf16(b) => Storage::Bf16(self.copy_range(b, range, "a copy of rows")?),
            Storage::Bf16Pitched { values, pitch } => Storage::Bf16Pitched {
                values: self.copy_range(values, range, "a copy of rows")?,
                pitch: *pitch,
            },
            _ => return Err(wants_f32_or_bf16(t, "copy_rows")),
        };
        Ok(CudaTensor {
            rows,
            cols: t.cols,
            storage,
        })
    }

    fn add_rows(&self, dst: &mut CudaTensor, start: usize, src: &CudaTensor) -> Result<()> {
        let cols = (dst.cols, src.cols);
        super::check_rows(dst.rows, start, src.rows, cols, "add_rows")?;
        wants_f32(dst, "add_rows")?;
        let args = [
            Arg::Ptr(self.address_at(dst, start * dst.cols)?),
            self.f32_arg(src, "add_rows")?,
            count(src.elements()),
        ];
        self.elementwise_grouped("add_assign_f32", src.elements(), 4, &args)
    }

    fn append_rows(&self, dst: &mut CudaTensor, src: &CudaTensor) -> Result<()> {
        if dst.cols != src.cols {
            return Err(Error::InvalidArgument(format!(
                "append_rows: rows of {} and {} values",
                dst.cols, src.cols
            )));
        }
        let (Storage::F32(d), Storage::F32(s)) = (&dst.storage, &src.storage) else {
            return Err(Error::InvalidArgument(
                "append_rows works on f32 tensors".into(),
            ));
        };
        let old = d.elements();
        let mut grown = self.gpu.alloc::<f32>(old + s.elements(), "a KV cache")?;
        let stream = self.gpu.stream();
        stream
            .memcpy_dtod(&*d.slice, &mut grown.slice.slice_mut(..old))
            .map_err(driver_error("growing a KV cache"))?;
        stream
            .memcpy_dtod(&*s.slice, &mut grown.slice.slice_mut(old..))
            .map_err(driver_error("growing a KV cache"))?;
        dst.rows += src.rows;
        dst.storage = Storage::F32(grown);
        Ok(())
    }

    fn gated_activation(
        &self,
        g: &CudaTensor,
        u: &CudaTensor,
        act: Activation,
    ) -> Result<CudaTensor> {
        self.gated_activation_as(g, u, act, false, 0)
    }

    fn gated_activation_backward(
        &self,
        dh: &CudaTensor,
        g: &CudaTensor,
        u: &CudaTensor,
        act: Activation,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let (dg, du, _) = self.gated_activation_backward_as(dh, g, u, act, false, 0, false)?;
        Ok((dg, du))
    }

    fn gated_activation_for_products(
        &self,
        g: &CudaTensor,
        u: &CudaTensor,
        act: Activation,
        room: usize,
    ) -> Result<CudaTensor> {
        self.gated_activation_as(g, u, act, self.rounds_product_inputs(), room)
    }

    fn gated_activation_backward_for_products(
        &self,
        dh: &CudaTensor,
        g: &CudaTensor,
        u: &CudaTensor,
        act: Activation,
        room: usize,
        value: bool,
    ) -> Result<(CudaTensor, CudaTensor, Option<CudaTensor>)> {
        let rounded = self.rounds_product_inputs();
        self.gated_activation_backward_as(dh, g, u, act, rounded, room, value)
    }

    fn gated_activation_backward_in_place(
        &self,
        dh: CudaTensor,
        g: CudaTensor,
        u: CudaTensor,
        act: Activation,
        room: usize,
        value: bool,
    ) -> Result<(CudaTensor, CudaTensor, Option<CudaTensor>)> {
        // The results' layout: bf16 product inputs with `room`.
        let layout = fold::room_pitch(g.cols, room);
        let fits = |t: &CudaTensor| {
            (t.rows, t.cols) == (g.rows, g.cols)
                && matches!(t.storage, Storage::Bf16Pitched { pitch, .. } if Some(pitch) == layout)
        };
        if !self.rounds_product_inputs() || !fits(&g) || !fits(&u) {
            return self.gated_activation_backward_for_products(&dh, &g, &u, act, room, value);
        }
        same_shape(&g, &dh, "gated_activation_backward")?;
        // h over dh where dh has the layout, else in a buffer of its own.
        let h_over_dh = value && fits(&dh);
        let h_apart = (value && !h_over_dh)
            .then(|| self.rounded_output(&g, true, room, "MLP activation"))
            .transpose()?;
        let h = if h_over_dh {
            Some(&dh)
        } else {
            h_apart.as_ref()
        };
        self.gated_backward_rounded([&dh, &g, &u], [&g, &u], h, act)?;
        // A dh not written over is freed in stream order, after the kernel.
        let h = if h_over_dh { Some(dh) } else { h_apart };
        Ok((g, u, h))
    }

    fn dropout(&self, x: &CudaTensor, p: f32, seed: u64) -> Result<CudaTensor> {
        if p <= 0.0 {
            return self.duplicate(x);
        }
        let (kernel, rounded) = match &x.storage {
            Storage::F32(_) => ("dropout_f32", false),
            Storage::Bf16(_) => ("dropout_bf16", true),
            _ => return Err(wants_f32_or_bf16(x, "dropout")),
        };
        let y = self.tensor_as(x.rows, x.cols, rounded, "dropout output")?;
        let args = [
            Arg::Ptr(self.ptr(x)?),
            Arg::Ptr(self.ptr(&y)?),
            count(x.elements()),
            Arg::F32(p),
            Arg::U64(seed),
        ];
        self.elementwise(kernel, x.elements(), &args)?;
        Ok(y)
    }

    fn lm_head_cross_entropy(
        &self,
        h: &CudaTensor,
        w: &CudaTensor,
        labels: &CudaInts,
        scale: &CudaTensor,
        row_loss: &mut CudaTensor,
    ) -> Result<CudaTensor> {
        if h.cols != w.cols || labels.host.len() != h.rows || row_loss.elements() != h.rows {
            return Err(Error::InvalidArgument(format!(
                "lm head: hidden [{}, {}], weight [{}, {}], {} labels, {} row losses",
                h.rows,
                h.cols,
                w.rows,
                w.cols,
                labels.host.len(),
                row_loss.elements()
            )));
        }
        if !matches!(h.dtype(), Dtype::F32 | Dtype::Bf16) {
            return Err(wants_f32_or_bf16(h, "lm head input"));
        }
        if scale.elements() != 1 {
            return Err(Error::InvalidArgument(format!(
                "lm head: the scale is a [{}, {}] tensor; a [1, 1] one was expected",
                scale.rows, scale.cols
            )));
        }
        let scale_ptr = self.f32_arg(scale, "lm head scale")?;
        let row_loss_ptr = self.ptr(row_loss)?;
        wants_f32(row_loss, "lm head row losses")?;
        if w.dtype() == Dtype::Nf4 {
            return Err(Error::InvalidArgument(
                "lm head: the weight is an NF4 matrix; the LM head is never quantized".into(),
            ));
        }
        let vocab = w.rows;
        Self::check_ids(labels, vocab, "label", true)?;
        let dh = self.zeros(h.rows, h.cols)?;
        // Rows of skipped chunks keep this 0.
        self.fill_zero(row_loss)?;
        // Recorded work runs every chunk: which chunks have labels can differ between replays.
        let skip_unlabelled = !self.gpu.records_here();
        // A bf16 weight (or a host table) or a rounded input (`product_input`) makes bf16
        // products, as in `matmul` (an f32 weight with a rounded input is then rounded too, per
        // call: only hand-made f32 heads meet that); the probabilities are then written in bf16
        // over the logits (`ce_online_chunk_bf16`).
        let bf16 = matches!(w.dtype(), Dtype::Bf16 | Dtype::HostBf16) || h.dtype() == Dtype::Bf16;
        let elem = if bf16 { 2 } else { 4 };
        let (h_all, _h_tmp) = self.operand(h, bf16)?;
        // The head's rows: on the device (a slice of it per chunk), or the output projection in
        // host memory, brought over chunk by chunk (a queue this thread's pass may have started).
        let (mut head, _w_tmp) = match &w.storage {
            Storage::Host {
                table,
                in_chunks: true,
                chunks,
                ..
            } => {
                let queue = lock(chunks).remove(&std::thread::current().id());
                (HeadRows::Streamed { table, queue }, Staged::default())
            }
            _ => {
                let (wo, staged) = self.operand(w, bf16)?;
                (HeadRows::Resident(wo), staged)
            }
        };
        // The vocabulary in chunks of vc rows of the head, the tokens in chunks of `rows_per`:
        // each token chunk goes over every vocabulary chunk (kernels/loss.cu, "in chunks").
        let vc = HEAD_CHUNK_ROWS.min(vocab).max(1);
        let rows_per = (LOGITS_CHUNK_BYTES / (4 * vc)).clamp(1, h.rows.max(1));
        let logits = self.gpu.alloc::<f32>(rows_per * vc, "a chunk of logits")?;
        // W[label] of each row of a token chunk, copied from the head's chunk holding it.
        let wy = self
            .gpu
            .alloc::<u8>(rows_per * h.cols * elem, "the labels' head rows")?;
        let stats = "the loss's running statistics";
        let m_state = self.gpu.alloc::<f32>(rows_per, stats)?;
        let z_state = self.gpu.alloc::<f64>(rows_per, stats)?;
        let y_state = self.gpu.alloc::<f32>(rows_per, stats)?;
        let state = [&m_state, &y_state].map(|b| Arg::Ptr(self.buffer_ptr(b)));
        let z_ptr = Arg::Ptr(self.buffer_ptr(&z_state));
        let logits_ptr = self.buffer_ptr(&logits);
        let chunk_kernel = match bf16 {
            true => "ce_online_chunk_bf16",
            false => "ce_online_chunk",
        };
        for start in (0..h.rows).step_by(rows_per) {
            let rows = rows_per.min(h.rows - start);
            if skip_unlabelled
                && labels.host[start..start + rows]
                    .iter()
                    .all(|&l| l == IGNORE_LABEL)
            {
                continue;
            }
            let h_rows = Operand {
                ptr: h_all.ptr + (start * h.cols * elem) as u64,
                rows,
                ..h_all
            };
            let dh_ptr = self.ptr(&dh)? + (start * h.cols * 4) as u64;
            let dh_rows = Operand::dense(dh_ptr, Dtype::F32, rows, h.cols);
            let labels_ptr = self.buffer_ptr(&labels.device) + (start * 4) as u64;
            // Each token chunk reads the head from its first row: a streamed one from the queue a
            // pass started (the first time), else from a new queue.
            if let HeadRows::Streamed { table, queue } = &mut head {
                if queue.is_none() {
                    *queue = Some(HeadChunks::start(
                        &self.offload,
                        &self.gpu,
                        table,
                        vocab,
                        h.cols,
                    )?);
                }
            }
            for v0 in (0..vocab).step_by(vc) {
                let n = vc.min(vocab - v0);
                // Lives until the chunk's products are queued (then freed in stream order).
                let mut arrival = None;
                let w_chunk = match &mut head {
                    HeadRows::Resident(wo) => Operand {
                        ptr: wo.ptr + (v0 * wo.pitch * elem) as u64,
                        rows: n,
                        ..*wo
                    },
                    HeadRows::Streamed { table, queue } => {
                        let chunk = match queue {
                            Some(q) => q.next(&self.offload, &self.gpu, table)?,
                            None => None,
                        };
                        let chunk = chunk.filter(|c| c.first_row == v0 && c.rows == n);
                        let Some(chunk) = chunk else {
                            return Err(Error::Device(format!(
                                "lm head: the chunk of rows from {v0} did not come in order"
                            )));
                        };
                        let copy = arrival.insert(chunk.copy);
                        Operand::dense(self.buffer_ptr(copy.wait()?), Dtype::Bf16, n, h.cols)
                    }
                };
                // z = h·W_chunkᵀ; then the running statistics, dh rescaled, P over z.
                let z = Operand::dense(logits_ptr, Dtype::F32, rows, n);
                self.gemm(
                    "lm_head_logits",
                    h_rows,
                    false,
                    w_chunk,
                    true,
                    1.0,
                    Addend::Nothing,
                    z,
                )?;
                let args = [
                    Arg::Ptr(logits_ptr),
                    Arg::Ptr(labels_ptr),
                    dim(rows),
                    dim(n),
                    dim(v0),
                    state[0],
                    z_ptr,
                    state[1],
                    Arg::Ptr(dh_ptr),
                    dim(h.cols),
                    Arg::Ptr(w_chunk.ptr),
                    count(w_chunk.pitch),
                    Arg::Ptr(self.buffer_ptr(&wy)),
                ];
                self.run("loss", chunk_kernel, Shape::per_row(rows), &args)?;
                // dh += P·W_chunk
                let p = match bf16 {
                    true => Operand {
                        dtype: Dtype::Bf16,
                        pitch: 2 * n,
                        ..z
                    },
                    false => z,
                };
                let added = Addend::Output;
                self.gemm("lm_head_dh", p, false, w_chunk, false, 1.0, added, dh_rows)?;
                drop(arrival);
            }
            if let HeadRows::Streamed { queue, .. } = &mut head {
                *queue = None; // used up
            }
            // dh = s·(dh / z − W[label]); row_loss = lse − logit[label]
            let args = [
                Arg::Ptr(labels_ptr),
                state[0],
                z_ptr,
                state[1],
                Arg::Ptr(self.buffer_ptr(&wy)),
                Arg::I32(bf16 as i32),
                Arg::Ptr(dh_ptr),
                dim(h.cols),
                scale_ptr,
                Arg::Ptr(row_loss_ptr + (start * 4) as u64),
            ];
            self.run("loss", "ce_online_finish", Shape::per_row(rows), &args)?;
        }
        Ok(dh)
    }

    fn adamw(&self, slots: &mut [AdamWSlot<'_, CudaTensor>], h: AdamWStep) -> Result<()> {
        let mut rows = Vec::with_capacity(slots.len());
        for s in slots.iter() {
            same_shape(s.param, s.grad, "adamw")?;
            same_shape(s.param, s.m, "adamw")?;
            same_shape(s.param, s.v, "adamw")?;
            rows.push([&*s.param, s.grad, &*s.m, &*s.v]);
        }
        let c = AdamWConstants::of(h);
        let args = [
            Arg::F32(c.decay),
            Arg::F32(h.beta1),
            Arg::F32(h.beta2),
            Arg::F32(c.step_size),
            Arg::F32(c.bc2_sqrt),
            Arg::F32(h.eps),
            Arg::F32(h.grad_scale),
        ];
        self.elementwise_many("adamw_many_f32", &rows, &args)
    }

    fn record(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<Recorded<graph::Recording>> {
        self.record_work(work)
    }

    fn replay(&self, recording: &graph::Recording) -> Result<()> {
        self.replay_work(recording)
    }

    fn records_work(&self) -> bool {
        self.profiler.is_none()
    }

    fn add_adapter_gradients(
        &self,
        dy: &CudaTensor,
        xa: &CudaTensor,
        dxa: &CudaTensor,
        x: &CudaTensor,
        s: f32,
        da: &mut CudaTensor,
        db: &mut CudaTensor,
    ) -> Result<()> {
        self.adapter_gradients_aside(dy, xa, dxa, x, s, da, db)
    }

    fn drop_after_adapter_gradients(&self, t: CudaTensor) {
        self.drop_after_aside(t);
    }

    fn hold_adapter_factors(&self, held: bool) {
        self.hold_factors(held);
    }

    fn join_adapter_gradients(&self) -> Result<()> {
        self.join_aside()
    }
}

#[cfg(test)]
mod tests {
    use super::{warp_specialized_dkdv, warp_specialized_forward};

    /// The most dynamic shared memory a block may opt in to on Hopper (227 KiB).
    const HOPPER_SHARED_LIMIT: usize = 232_448;

    #[test]
    fn warp_specialized_attention_fits_in_hopper_shared_memory() {
        for head_dim in [64, 128, 256] {
            let (entry, shared) = warp_specialized_forward(head_dim).unwrap();
            assert!(shared <= HOPPER_SHARED_LIMIT, "{entry}: {shared} bytes");
            let dkdv = warp_specialized_dkdv(head_dim).unwrap();
            let (entry, shared) = (dkdv.entry, dkdv.shared);
            assert!(shared <= HOPPER_SHARED_LIMIT, "{entry}: {shared} bytes");
        }
        // kernels/flash.cu's launch lines, head_dim 128 and 256.
        assert_eq!(
            warp_specialized_forward(128).unwrap().1,
            14 * 64 * 128 * 2 + 128
        );
        assert_eq!(
            warp_specialized_forward(256).unwrap().1,
            6 * 64 * 256 * 2 + 128
        );
        let stage = 2 * 64 * 4;
        assert_eq!(
            warp_specialized_dkdv(128).unwrap().shared,
            12 * 64 * 128 * 2 + 4 * stage + 128
        );
        assert_eq!(
            warp_specialized_dkdv(256).unwrap().shared,
            6 * 64 * 256 * 2 + 2 * (64 * 64 * 4 + stage) + 128
        );
        assert!(warp_specialized_forward(192).is_none() && warp_specialized_dkdv(192).is_none());
    }
}
