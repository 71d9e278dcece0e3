//! NF4 projection matrices on the GPU (kernels/nf4.cu): quantized on the device at upload, kept
//! packed (codes and double-quantized absmax, ~0.52 bytes a value), and dequantized to bf16 into
//! a scratch slot right before a product that reads them, which then runs as the bf16 product of
//! a bf16 weight.
//!
//! The scratch has [`DEQUANTIZED_SLOTS`] slots, each sized for the largest NF4 matrix uploaded
//! (2 bytes a value of that matrix) and remembering which matrix it holds: a product whose matrix
//! is still in a slot skips the dequantization. Slots are reused least recently used first. Three
//! slots hold gate, up and down, the matrices an MLP cycles through chunk after chunk, so a
//! sequence in several MLP chunks dequantizes each once per layer and pass instead of once per
//! chunk and product. One stream runs every kernel in order, so a slot refilled for a later
//! product is not written before the products queued earlier have read it; the scratch stays
//! locked from the dequantization to the queuing of the product, so threads cannot interleave.

use super::host_table::HostTable;
use super::launch::{Arg, Shape, MAX_GRID};
use super::lock;
use super::tensor::{DeviceAbsmax, HostCopies, Nf4Codes, Nf4Storage, Storage};
use super::{count, CudaBackend, CudaTensor};
use crate::error::{Error, Result};
use crate::quant::nf4::{check_quantizable, dynamic_map, BLOCK, NESTED_BLOCK};
use crate::quant::{Absmax, DoubleQuant, Nf4Tensor};
use std::sync::MutexGuard;

/// NF4 matrices whose bf16 values the scratch holds at once (see the module comment).
pub const DEQUANTIZED_SLOTS: usize = 3;

/// The dequantization scratch: slots of bf16 values, least recently used first; and what the
/// folded products wrote into the spare values of the slots and of the bf16 projection matrices
/// (fold.rs), kept under the same lock.
#[derive(Default)]
pub(super) struct Nf4Scratch {
    slots: Vec<Slot>,
    pub(super) factors: super::fold::WrittenFactors,
}

/// An adapter factor that a slot's dequantization writes into the slot's spare values in the
/// same launch (fold.rs): `scale·factor` (an f32 `[rows, cols]` matrix at `values`) rounded to
/// bf16, its rows the slot's pitch apart, from `offset` values past the slot's start. The default
/// (address 0) is none: the kernel's null `factor`.
#[derive(Default)]
pub(super) struct SpareFactor {
    pub values: u64,
    pub rows: usize,
    pub cols: usize,
    pub offset: usize,
    pub scale: f32,
}

struct Slot {
    values: super::DeviceBuffer<u16>,
    /// The [`Nf4Storage::id`] of the matrix whose values are in `values`, and their row pitch.
    holds: Option<(u64, usize)>,
    /// The same as the work being recorded will find it when replayed (recorded work starts
    /// from nothing known, whatever the slots hold when it is recorded or replayed).
    recorded: Option<(u64, usize)>,
}

/// The locked NF4 scratch.
pub(super) type ScratchGuard<'a> = MutexGuard<'a, Nf4Scratch>;

/// NF4 blocks quantized per CUDA block of `nf4_quantize_blocks` (a warp each).
const BLOCKS_PER_CUDA_BLOCK: usize = 8;

impl CudaBackend {
    /// Quantizes `data` (`rows × cols`, finite) to NF4 with double-quantized absmax on the
    /// device: the values are uploaded once in f32, freed after the first kernel.
    pub(super) fn quantize_nf4(
        &self,
        data: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<CudaTensor> {
        check_quantizable(data, rows, cols)?;
        let n = rows * cols;
        let blocks = n.div_ceil(BLOCK);
        let groups = blocks.div_ceil(NESTED_BLOCK);
        let x = self.gpu.upload(data, "a weight to quantize")?;
        let packed = self.gpu.alloc::<u8>(n.div_ceil(2), "NF4 codes")?;
        let absmax = self.gpu.alloc::<f32>(blocks, "NF4 block absmax values")?;
        let warps = Shape::grid(
            blocks.div_ceil(BLOCKS_PER_CUDA_BLOCK).min(MAX_GRID),
            1,
            1,
            32 * BLOCKS_PER_CUDA_BLOCK as u32,
        );
        let args = [
            Arg::Ptr(self.buffer_ptr(&x)),
            count(n),
            Arg::Ptr(self.buffer_ptr(&packed)),
            Arg::Ptr(self.buffer_ptr(&absmax)),
        ];
        self.run("nf4", "nf4_quantize_blocks", warps, &args)?;
        drop(x);
        let offset = self.gpu.alloc::<f32>(1, "the NF4 absmax offset")?;
        let args = [
            Arg::Ptr(self.buffer_ptr(&absmax)),
            count(blocks),
            Arg::Ptr(self.buffer_ptr(&offset)),
        ];
        self.run("nf4", "nf4_absmax_mean", Shape::grid(1, 1, 1, 1024), &args)?;
        let codes = self.gpu.alloc::<u8>(blocks, "NF4 absmax codes")?;
        let nested_absmax = self.gpu.alloc::<f32>(groups, "NF4 nested absmax values")?;
        let map = self.gpu.upload(&dynamic_map(), "the NF4 absmax map")?;
        let args = [
            Arg::Ptr(self.buffer_ptr(&absmax)),
            count(blocks),
            Arg::Ptr(self.buffer_ptr(&offset)),
            Arg::Ptr(self.buffer_ptr(&map)),
            Arg::Ptr(self.buffer_ptr(&codes)),
            Arg::Ptr(self.buffer_ptr(&nested_absmax)),
        ];
        let per_group = Shape::grid(groups, 1, 1, NESTED_BLOCK as u32);
        self.run("nf4", "nf4_double_quantize", per_group, &args)?;
        let absmax = DeviceAbsmax::Double {
            codes,
            nested_absmax,
            map,
            offset,
        };
        self.nf4_tensor(
            rows,
            cols,
            Nf4Storage::new(Nf4Codes::Device(packed), absmax),
        )
    }

    /// Uploads an NF4 matrix as it is (plain or double-quantized absmax).
    pub(super) fn upload_nf4_tensor(&self, q: &Nf4Tensor) -> Result<CudaTensor> {
        let packed = self.gpu.upload(q.packed(), "NF4 codes")?;
        let absmax = match q.absmax() {
            Absmax::Plain(v) => DeviceAbsmax::Plain(self.gpu.upload(v, "NF4 absmax values")?),
            Absmax::Double(d) => DeviceAbsmax::Double {
                codes: self.gpu.upload(d.codes(), "NF4 absmax codes")?,
                nested_absmax: self
                    .gpu
                    .upload(d.nested_absmax(), "NF4 nested absmax values")?,
                map: self.gpu.upload(&d.map()[..], "the NF4 absmax map")?,
                offset: self.gpu.upload(&[d.offset()], "the NF4 absmax offset")?,
            },
        };
        self.nf4_tensor(
            q.rows(),
            q.cols(),
            Nf4Storage::new(Nf4Codes::Device(packed), absmax),
        )
    }

    /// The tensor of `storage`, with the scratch slots grown to hold its values in bf16, with
    /// the spare rows and columns of a folded product (fold.rs), so that the memory account
    /// knows at load time what the products will need.
    fn nf4_tensor(&self, rows: usize, cols: usize, storage: Nf4Storage) -> Result<CudaTensor> {
        let elements = super::fold::folded_slot_elements(rows, cols);
        let mut scratch = self.lock_nf4_scratch();
        let big_enough = |slot: &Slot| slot.values.elements() >= elements;
        if scratch.slots.len() < DEQUANTIZED_SLOTS || !scratch.slots.iter().all(big_enough) {
            // The smaller slots leave the memory account before the larger ones enter.
            scratch.slots.clear();
            scratch.factors.forget_all();
            for _ in 0..DEQUANTIZED_SLOTS {
                let values = self
                    .gpu
                    .alloc::<u16>(elements, "the NF4 dequantization scratch")?;
                scratch.slots.push(Slot {
                    values,
                    holds: None,
                    recorded: None,
                });
            }
        }
        Ok(CudaTensor {
            rows,
            cols,
            storage: Storage::Nf4(Box::new(storage)),
        })
    }

    /// Starts the recorded view of the scratch (`Slot::recorded`) from nothing known.
    pub(super) fn start_recording_dequantized(&self) {
        for slot in &mut self.lock_nf4_scratch().slots {
            slot.recorded = None;
        }
    }

    /// Runs `replay` (queueing recorded work that may dequantize into any slot) under the
    /// scratch's lock, so that no dequantization and its product are queued apart around it,
    /// then takes every slot to hold nothing known.
    pub(super) fn replacing_dequantized<T>(&self, replay: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut scratch = self.lock_nf4_scratch();
        let queued = replay();
        for slot in &mut scratch.slots {
            slot.holds = None;
        }
        // It rewrote spare values too.
        scratch.factors.forget_all();
        queued
    }

    /// The scratch, locked; folded products of bf16 matrices take the lock too while they
    /// rewrite a matrix's spare values and queue the product reading them (fold.rs).
    pub(super) fn lock_nf4_scratch(&self) -> ScratchGuard<'_> {
        // Slot bookkeeping is a few assignments; a panic elsewhere cannot leave it half-done.
        lock(&self.nf4_scratch)
    }

    /// The address of a scratch slot holding the bf16 values of `s` (a `[rows, cols]` matrix)
    /// with rows `pitch` values apart and room for `spare_rows` more rows below them: the slot
    /// that already holds them so, else the least recently used one, into which their
    /// dequantization is queued. Returns the scratch's lock too, to hold until the product
    /// reading the slot is queued.
    ///
    /// `spare` (an adapter factor for the slot's spare values, fold.rs) is written by the same
    /// launch where a dequantization is queued; the flag returned says whether it was.
    pub(super) fn dequantize_nf4(
        &self,
        s: &Nf4Storage,
        rows: usize,
        cols: usize,
        pitch: usize,
        spare_rows: usize,
        spare: Option<SpareFactor>,
    ) -> Result<(u64, ScratchGuard<'_>, bool)> {
        let elements = (rows + spare_rows) * pitch;
        let mut scratch = self.lock_nf4_scratch();
        // Recorded work keeps its own view of the slots and leaves the queued work's alone.
        let recording = self.gpu.records_here();
        fn known(slot: &mut Slot, recording: bool) -> &mut Option<(u64, usize)> {
            if recording {
                &mut slot.recorded
            } else {
                &mut slot.holds
            }
        }
        let held = scratch
            .slots
            .iter_mut()
            .position(|slot| *known(slot, recording) == Some((s.id, pitch)));
        let (i, spare_written) = match held {
            Some(i) => (i, false),
            None => {
                let slot = scratch
                    .slots
                    .first_mut()
                    .filter(|slot| slot.values.elements() >= elements)
                    .ok_or_else(|| {
                        Error::Device(format!(
                            "no NF4 scratch slot of {elements} values (NF4 tensors come from nf4_tensor)"
                        ))
                    })?;
                *known(slot, recording) = None;
                let values = self.buffer_ptr(&slot.values);
                let bytes = slot.values.elements() * std::mem::size_of::<u16>();
                let spare_written = spare.is_some();
                self.queue_dequantize(s, rows, cols, pitch, values, spare)?;
                *known(slot, recording) = Some((s.id, pitch));
                // Its spare values now belong to another matrix's layout.
                scratch.factors.forget_within(values..values + bytes as u64);
                (0, spare_written)
            }
        };
        let slot = scratch.slots.remove(i);
        let out = self.buffer_ptr(&slot.values);
        scratch.slots.push(slot);
        Ok((out, scratch, spare_written))
    }

    /// Queues the dequantization of `s` (`[rows, cols]`) to bf16 at `out`, rows `pitch` values
    /// apart (`cols`: dense; otherwise both multiples of 8, as fold.rs's pitches are), and the
    /// write of `spare` in the same launch.
    fn queue_dequantize(
        &self,
        s: &Nf4Storage,
        rows: usize,
        cols: usize,
        pitch: usize,
        out: u64,
        spare: Option<SpareFactor>,
    ) -> Result<()> {
        let elements = rows * cols;
        let spare = spare.unwrap_or_default();
        // A copy made here (no pass brought one over) lives until the kernel is queued.
        let (values, _copy) = match &s.codes {
            Nf4Codes::Device(b) => (self.buffer_ptr(b), None),
            Nf4Codes::Host { table, copies, .. } => self.host_table_on_device(table, copies)?,
        };
        let [absmax, codes, nested, map, offset] = match &s.absmax {
            DeviceAbsmax::Plain(a) => [self.buffer_ptr(a), 0, 0, 0, 0],
            DeviceAbsmax::Double {
                codes,
                nested_absmax,
                map,
                offset,
            } => [
                0,
                self.buffer_ptr(codes),
                self.buffer_ptr(nested_absmax),
                self.buffer_ptr(map),
                self.buffer_ptr(offset),
            ],
        };
        let args = [
            Arg::Ptr(values),
            Arg::Ptr(absmax),
            Arg::Ptr(codes),
            Arg::Ptr(nested),
            Arg::Ptr(map),
            Arg::Ptr(offset),
            Arg::Ptr(out),
            count(elements),
            super::dim(cols),
            count(pitch),
            Arg::Ptr(spare.values),
            count(spare.rows),
            super::dim(spare.cols),
            count(spare.offset),
            Arg::F32(spare.scale),
        ];
        // One thread a 64 values (eight groups of 8: kernels/nf4.cu).
        let shape = Shape::elementwise(elements.div_ceil(64));
        self.run("nf4", "nf4_dequantize_bf16", shape, &args)
    }

    /// A device copy of an NF4 matrix.
    pub(super) fn duplicate_nf4(&self, s: &Nf4Storage) -> Result<Nf4Storage> {
        let what = "an NF4 weight copy";
        let absmax = match &s.absmax {
            DeviceAbsmax::Plain(a) => DeviceAbsmax::Plain(self.copy_buffer(a, what)?),
            DeviceAbsmax::Double {
                codes,
                nested_absmax,
                map,
                offset,
            } => DeviceAbsmax::Double {
                codes: self.copy_buffer(codes, what)?,
                nested_absmax: self.copy_buffer(nested_absmax, what)?,
                map: self.copy_buffer(map, what)?,
                offset: self.copy_buffer(offset, what)?,
            },
        };
        let codes = match &s.codes {
            Nf4Codes::Device(b) => Nf4Codes::Device(self.copy_buffer(b, what)?),
            Nf4Codes::Host { table, bytes, .. } => Nf4Codes::Host {
                table: HostTable::new(&self.gpu, table.bits()?)?,
                bytes: *bytes,
                copies: HostCopies::default(),
            },
        };
        Ok(Nf4Storage::new(codes, absmax))
    }

    /// `t` with its NF4 codes moved to pinned host memory (see [`Nf4Codes::Host`]); any other
    /// tensor as it is.
    pub(super) fn nf4_codes_to_host(&self, mut t: CudaTensor) -> Result<CudaTensor> {
        let Storage::Nf4(s) = &mut t.storage else {
            return Ok(t);
        };
        let Nf4Codes::Device(b) = &s.codes else {
            return Ok(t);
        };
        let bytes = self
            .gpu
            .download(&b.slice, "moving NF4 codes to host memory")?;
        let words: Vec<u16> = bytes
            .chunks(2)
            .map(|pair| u16::from_ne_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]))
            .collect();
        // The device codes are freed here, once their host copy exists.
        s.codes = Nf4Codes::Host {
            table: HostTable::new(&self.gpu, &words)?,
            bytes: bytes.len(),
            copies: HostCopies::default(),
        };
        Ok(t)
    }

    /// The packed codes and absmax values of an NF4 tensor, as stored on the device.
    pub fn download_nf4(&self, t: &CudaTensor) -> Result<Nf4Tensor> {
        let Storage::Nf4(s) = &t.storage else {
            return Err(crate::error::Error::InvalidArgument(format!(
                "download_nf4: the tensor is {:?}, not NF4",
                t.dtype()
            )));
        };
        let what = "downloading an NF4 weight";
        let packed = match &s.codes {
            Nf4Codes::Device(b) => self.gpu.download(&b.slice, what)?,
            Nf4Codes::Host { table, bytes, .. } => {
                let mut packed: Vec<u8> =
                    table.bits()?.iter().flat_map(|w| w.to_ne_bytes()).collect();
                packed.truncate(*bytes);
                packed
            }
        };
        let absmax =
            match &s.absmax {
                DeviceAbsmax::Plain(a) => Absmax::Plain(self.gpu.download(&a.slice, what)?),
                DeviceAbsmax::Double {
                    codes,
                    nested_absmax,
                    map,
                    offset,
                } => {
                    let map: [f32; 256] = self.gpu.download(&map.slice, what)?.try_into().map_err(
                        |m: Vec<f32>| {
                            crate::error::Error::Device(format!(
                                "{what}: the absmax map holds {} values, not 256",
                                m.len()
                            ))
                        },
                    )?;
                    Absmax::Double(DoubleQuant::from_parts(
                        self.gpu.download(&codes.slice, what)?,
                        self.gpu.download(&nested_absmax.slice, what)?,
                        self.gpu.download(&offset.slice, what)?[0],
                        map,
                    )?)
                }
            };
        Nf4Tensor::from_parts(t.rows, t.cols, packed, absmax)
    }
}
