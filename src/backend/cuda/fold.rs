//! Adapted products with the adapter's rank folded into the base product's inner dimension
//! ([`Backend::adapted_product`](super::Backend::adapted_product) and its backward):
//!
//! ```text
//!   y  = x·Wᵀ + s·xa·Bᵀ = [x | xa]·[W | s·B]ᵀ       inner dimension in + r
//!   dx = dy·W + dxa·A   = [dy | dxa]·[W ; A]        inner dimension out + r
//! ```
//!
//! One product instead of two: the rank-wide expansion `xa·Bᵀ` (or `dxa·A`) writes an
//! activation-sized f32 output that the base product then reads and writes again, two passes
//! over `[rows, out]` f32 values for a product of inner dimension r.
//!
//! The activation side: a product input with spare columns after each row
//! (`Storage::Bf16Pitched`, from `product_input` or the gated kernels given the room), or an f32
//! input, which the product rounds to bf16 anyway and is rounded here into rows with room; `xa`
//! (or `dxa`) is written into the spare columns: copied, as `adapter_product` stores it in bf16
//! already, or rounded from f32. The weight side: `W` laid out with rows
//! `in + room` apart and `r` spare rows below, `s·B` rounded into the spare columns of its `out`
//! rows for the forward, `A` into the `r` rows below them for the backward. An NF4 matrix is
//! dequantized so into a scratch slot (nf4.rs); a bf16 projection matrix is uploaded so
//! ([`PROJECTION_ROOM`] spare columns and rows: `upload_projection`) and its own spare values
//! are written. Either way they are written under the scratch's lock until the product is
//! queued: a bf16 model is shared by every trainer of it, each with its own adapter. A product
//! skips the write when the same factor, scaled the same, is what the last write there put, by
//! this thread within the pass it runs ([`WrittenFactors`]): an MLP's chunks reuse gate's, up's
//! and down's factors chunk after chunk.
//! Dense bf16 matrices (a width with no room, a matrix in host memory whose device copy this
//! thread's pass did not bring over), ranks above the room, products with f32 arithmetic
//! ([`super::F32Products::Exact`]) and inputs with no room keep the two products.
//!
//! The adapter's factors and `xa` are rounded to bf16 like the activations (as in bf16
//! mixed-precision training), in the two-product path too: `adapter_product` stores `xa` and
//! `dxa` in bf16, so its expansions `xa·Bᵀ` and `dxa·A` are bf16 products.

use super::blas::{Addend, Operand};
use super::launch::{values_a_thread, Arg};
use super::nf4::{ScratchGuard, SpareFactor};
use super::tensor::{Dtype, HostCopies, Nf4Storage, Storage};
use super::{count, dim, lock, wants_f32, CudaBackend, CudaTensor};
use crate::backend::ProductOutput;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::ops::Range;
use std::thread::{self, ThreadId};

/// The largest adapter rank folded into products (the NF4 scratch slots keep that many spare
/// rows and columns).
pub const MAX_FOLDED_RANK: usize = 64;

/// The spare columns and rows of a bf16 projection matrix (`upload_projection`): adapters up to
/// this rank fold into its products in place. ~1.2 % more memory on Llama 3 8B's shapes.
pub const PROJECTION_ROOM: usize = 32;

/// The row pitch of a bf16 matrix of `cols` columns with `room` spare ones: `cols + room`
/// rounded up to 8 values (rows 16-byte aligned, as cuBLAS's fast paths want), when
/// `0 < room ≤ MAX_FOLDED_RANK` and `cols` is a multiple of 8; `None` otherwise (dense).
pub(super) fn room_pitch(cols: usize, room: usize) -> Option<usize> {
    (room > 0 && room <= MAX_FOLDED_RANK && cols % 8 == 0).then(|| cols + room.div_ceil(8) * 8)
}

/// Values an NF4 scratch slot holds so that a `[rows, cols]` matrix can be folded with any rank
/// up to [`MAX_FOLDED_RANK`]: `rows + r` rows of the widest pitch.
pub(super) fn folded_slot_elements(rows: usize, cols: usize) -> usize {
    match room_pitch(cols, MAX_FOLDED_RANK) {
        Some(pitch) => (rows + MAX_FOLDED_RANK) * pitch,
        None => rows * cols,
    }
}

/// What the folded products wrote into spare values (a weight's spare columns or rows), by a
/// launch of their own or by the dequantization that filled the slot, for the products after
/// them to skip writing the same again; kept under the NF4 scratch's lock.
///
/// A factor's values stay the same only while the pass reading it runs (the optimizer writes
/// them between passes): each thread declares its pass ([`CudaBackend::hold_factors`]) and gets
/// a number of its own, and a write counts for later products only with the same number, in
/// queued work (recorded work's writes run at its replays, which forget everything here, as do
/// a slot's refill and a reallocation of the slots).
#[derive(Default)]
pub(super) struct WrittenFactors {
    /// The last write queued at each address, by the pass (its number) that wrote it; 0: none.
    at: HashMap<u64, (Written, u64)>,
    /// The pass each thread is running, by number.
    passes: HashMap<ThreadId, u64>,
    last_pass: u64,
}

/// A factor's write into spare values: its address, shape, scale and the pitch written with.
#[derive(Clone, Copy, PartialEq)]
struct Written {
    factor: u64,
    rows: usize,
    cols: usize,
    pitch: usize,
    scale: u32,
}

impl WrittenFactors {
    /// Starts (`held`) or ends a pass of the calling thread.
    fn hold(&mut self, held: bool) {
        let me = thread::current().id();
        if held {
            self.last_pass += 1;
            self.passes.insert(me, self.last_pass);
        } else {
            self.passes.remove(&me);
        }
    }

    /// Whether the calling thread's pass wrote `w` at `dst` last; else takes `w` as written
    /// there now (for the calling thread's pass, or none).
    fn written_already(&mut self, dst: u64, w: Written) -> bool {
        let pass = self
            .passes
            .get(&thread::current().id())
            .copied()
            .unwrap_or(0);
        if pass != 0 && self.at.get(&dst) == Some(&(w, pass)) {
            return true;
        }
        self.at.insert(dst, (w, pass));
        false
    }

    /// Forgets the writes at addresses in `range` (a slot about to hold another matrix).
    pub(super) fn forget_within(&mut self, range: Range<u64>) {
        self.at.retain(|dst, _| !range.contains(dst));
    }

    /// Forgets every write (recorded work replayed, slots reallocated).
    pub(super) fn forget_all(&mut self) {
        self.at.clear();
    }
}

/// Where a folded product's weight values lie (see [`CudaBackend::folded_weight`]).
enum FoldedWeight<'w> {
    /// An NF4 matrix, dequantized into a scratch slot with the folded layout.
    Nf4(&'w Nf4Storage),
    /// The address of a bf16 matrix uploaded with the folded layout.
    InPlace(u64),
    /// The device copies of a matrix in host memory laid out so; this thread's is written.
    HostCopy(&'w HostCopies),
}

/// Whether a `[rows, cols]` matrix stored `pitch` values a row in `len` values has room for
/// `r` spare columns and rows, with 16-byte aligned rows.
fn has_room(w: &CudaTensor, pitch: usize, len: usize, r: usize) -> bool {
    r > 0 && pitch >= w.cols + r && pitch % 8 == 0 && len >= (w.rows + r) * pitch
}

/// The activation operand `[x | xa]` of a folded product, with what it reads from (a rounded
/// copy of an f32 `x`, freed once the product is queued).
struct Widened {
    operand: Operand,
    _copy: Option<CudaTensor>,
}

impl CudaBackend {
    /// A bf16 copy of the f32 `x`, for `what`: with `room` spare columns after each row where
    /// [`room_pitch`] gives them, dense otherwise.
    pub(super) fn rounded_copy(
        &self,
        x: &CudaTensor,
        room: usize,
        what: &str,
    ) -> Result<CudaTensor> {
        self.rounded_rows(x, 0..x.rows, room, what)
    }

    /// [`Self::rounded_copy`] of rows `rows` of the f32 `x` alone (read in place).
    pub(super) fn rounded_rows(
        &self,
        x: &CudaTensor,
        rows: Range<usize>,
        room: usize,
        what: &str,
    ) -> Result<CudaTensor> {
        wants_f32(x, what)?;
        let src = self.address_at(x, rows.start * x.cols)?;
        let n = rows.len();
        if room_pitch(x.cols, room).is_none() {
            let values = self.cast_to_bf16(src, n * x.cols, what)?;
            return Ok(CudaTensor {
                rows: n,
                cols: x.cols,
                storage: Storage::Bf16(values),
            });
        }
        let out = self.product_input_tensor(n, x.cols, room, what)?;
        self.cast_rows_bf16(src, n, x.cols, self.rows_ptr(&out)?, out.pitch(), 1.0)?;
        Ok(out)
    }

    /// See [`crate::backend::Backend::hold_adapter_factors`].
    pub(super) fn hold_factors(&self, held: bool) {
        self.lock_nf4_scratch().factors.hold(held);
    }

    /// Writes an adapter factor (`scale·factor`, rounded) into a folded weight's spare values at
    /// `dst`, rows `pitch` apart, unless this thread's pass wrote it there last (`memo`: the
    /// weight's spare values are its own or a slot's, not a copy made for this product) or the
    /// dequantization that just filled the slot wrote it (`dequantized_with`).
    #[allow(clippy::too_many_arguments)]
    fn write_factor(
        &self,
        scratch: &mut ScratchGuard,
        memo: bool,
        factor: &CudaTensor,
        dst: u64,
        pitch: usize,
        scale: f32,
        dequantized_with: bool,
    ) -> Result<()> {
        let written = Written {
            factor: self.ptr(factor)?,
            rows: factor.rows,
            cols: factor.cols,
            pitch,
            scale: scale.to_bits(),
        };
        // Recorded work writes at its replays, whatever the memo says now.
        if memo && !self.gpu.records_here() && scratch.factors.written_already(dst, written) {
            return Ok(());
        }
        // The dequantization's launch wrote it (in queued work with `memo`, noted just above for
        // the products after this one).
        if dequantized_with {
            return Ok(());
        }
        self.write_rows_bf16(factor, dst, pitch, scale)
    }

    /// Writes `scale·src` (a dense `[rows, cols]` matrix) in bf16 at `dst`, its rows `pitch`
    /// values apart: an f32 `src` rounded, a bf16 one (at scale 1) copied.
    fn write_rows_bf16(&self, src: &CudaTensor, dst: u64, pitch: usize, scale: f32) -> Result<()> {
        if matches!(src.storage, Storage::Bf16(_)) && scale == 1.0 {
            let args = [
                Arg::Ptr(self.ptr(src)?),
                Arg::Ptr(dst),
                count(src.rows),
                dim(src.cols),
                count(pitch),
            ];
            let label = || format!("copy_bf16_rows {}x{}", src.rows, src.cols).into();
            return self.elementwise_labelled("copy_bf16_rows", label, src.elements(), 4, &args);
        }
        wants_f32(src, "an adapter's columns")?;
        self.cast_rows_bf16(self.ptr(src)?, src.rows, src.cols, dst, pitch, scale)
    }

    /// Writes `scale·x` (dense f32 `[rows, cols]` at `x`) rounded to bf16 at `dst`, its rows
    /// `pitch` values apart (kernels/pointwise.cu, `cast_f32_bf16_rows`).
    fn cast_rows_bf16(
        &self,
        x: u64,
        rows: usize,
        cols: usize,
        dst: u64,
        pitch: usize,
        scale: f32,
    ) -> Result<()> {
        let args = [
            Arg::Ptr(x),
            Arg::Ptr(dst),
            count(rows),
            dim(cols),
            count(pitch),
            Arg::F32(scale),
        ];
        let group = values_a_thread(cols, [(cols, x), (pitch, dst)]);
        let label = || format!("cast_f32_bf16_rows {rows}x{cols}").into();
        self.elementwise_labelled("cast_f32_bf16_rows", label, rows * cols, group, &args)
    }

    /// `[x | extra]` as a product operand: `extra` (`[rows, r]`: f32, rounded, or dense bf16,
    /// copied) written into the spare columns of `x`, or of a rounded copy of an f32 `x`; `None`
    /// when `x` has no room for it.
    fn widened(&self, x: &CudaTensor, extra: &CudaTensor) -> Result<Option<Widened>> {
        let r = extra.cols;
        if extra.rows != x.rows || !self.rounds_product_inputs() {
            return Ok(None);
        }
        let copy = match &x.storage {
            Storage::Bf16Pitched { pitch, .. } if *pitch >= x.cols + r => None,
            Storage::F32(_) if room_pitch(x.cols, r).is_some() => {
                Some(self.rounded_copy(x, r, "a product input")?)
            }
            _ => return Ok(None),
        };
        let t = copy.as_ref().unwrap_or(x);
        let base = self.rows_ptr(t)?;
        let tail = base + (t.cols * std::mem::size_of::<u16>()) as u64;
        self.write_rows_bf16(extra, tail, t.pitch(), 1.0)?;
        Ok(Some(Widened {
            operand: Operand {
                ptr: base,
                dtype: Dtype::Bf16,
                rows: t.rows,
                cols: t.cols + r,
                pitch: t.pitch(),
            },
            _copy: copy,
        }))
    }

    /// A folded product's output: f32, or bf16 for [`ProductOutput::Rounded`] (the fold rounds its
    /// inputs to bf16 already), with the room of a product input of rank `r` for
    /// [`ProductOutput::GatedOperand`] (the gated backward's outputs' layout, which it then
    /// writes over them).
    fn product_output(
        &self,
        rows: usize,
        cols: usize,
        out: ProductOutput,
        r: usize,
    ) -> Result<CudaTensor> {
        match out {
            ProductOutput::Sums => self.tensor_as(rows, cols, false, "a tensor"),
            ProductOutput::Rounded => self.tensor_as(rows, cols, true, "a tensor"),
            ProductOutput::GatedOperand => self.product_input_tensor(rows, cols, r, "a tensor"),
        }
    }

    /// Where `w`'s values lie in its folded layout for rank `r`, and that layout's pitch: an NF4
    /// matrix whose scratch slot has room, or a bf16 matrix uploaded with room for `r` spare
    /// columns and rows.
    fn folded_weight<'w>(&self, w: &'w CudaTensor, r: usize) -> Option<(FoldedWeight<'w>, usize)> {
        match &w.storage {
            Storage::Nf4(nf4) => Some((FoldedWeight::Nf4(nf4), room_pitch(w.cols, r)?)),
            Storage::Bf16Pitched { values, pitch } if has_room(w, *pitch, values.elements(), r) => {
                Some((FoldedWeight::InPlace(self.buffer_ptr(values)), *pitch))
            }
            // Its device copy, when this thread's pass brought one over (`bring_to_device`).
            Storage::Host {
                table,
                pitch,
                copies,
                ..
            } if has_room(w, *pitch, table.len(), r)
                && lock(copies).contains_key(&std::thread::current().id()) =>
            {
                Some((FoldedWeight::HostCopy(copies), *pitch))
            }
            _ => None,
        }
    }

    /// The address of `w`'s bf16 values in its folded layout (`pitch`, `r` spare rows): the
    /// dequantized scratch slot or the matrix itself. Also the scratch's lock, to hold until
    /// the product reading the spare values is queued, and whether a dequantization queued here
    /// wrote `spare` too (one launch instead of two: ~450 a pass on Llama 3 8B QLoRA).
    fn folded_values(
        &self,
        weight: FoldedWeight,
        w: &CudaTensor,
        pitch: usize,
        r: usize,
        spare: Option<SpareFactor>,
    ) -> Result<(u64, ScratchGuard<'_>, bool)> {
        match weight {
            FoldedWeight::Nf4(nf4) => self.dequantize_nf4(nf4, w.rows, w.cols, pitch, r, spare),
            FoldedWeight::InPlace(values) => Ok((values, self.lock_nf4_scratch(), false)),
            FoldedWeight::HostCopy(copies) => {
                // The copy stays in the map (this thread releases it after the layer's
                // products); the map's lock is not held while waiting for the scratch's.
                let values = {
                    let mut brought = lock(copies);
                    let copy = brought
                        .get_mut(&std::thread::current().id())
                        .ok_or_else(|| {
                            Error::InvalidArgument(
                                "a folded product's host matrix lost its device copy".into(),
                            )
                        })?;
                    self.buffer_ptr(copy.wait()?)
                };
                Ok((values, self.lock_nf4_scratch(), false))
            }
        }
    }

    /// `scale·factor` as a dequantization's write into its slot's spare values, `offset` values
    /// past the slot's start, where the factor is f32 (what `write_rows_bf16` would round; a
    /// bf16 one is copied by a launch of its own).
    fn spare_factor(
        &self,
        factor: &CudaTensor,
        offset: usize,
        scale: f32,
    ) -> Result<Option<SpareFactor>> {
        if factor.dtype() != Dtype::F32 {
            return Ok(None);
        }
        Ok(Some(SpareFactor {
            values: self.ptr(factor)?,
            rows: factor.rows,
            cols: factor.cols,
            offset,
            scale,
        }))
    }

    /// `[x | xa]·[W | s·B]ᵀ` when it can run as one product (see the module comment), stored
    /// as [`Self::product_output`] says; with `plus` (an f32 matrix of the output's shape,
    /// left as it is), `plus + [x | xa]·[W | s·B]ᵀ`, the sum made by the product's epilogue.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn folded_product(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        xa: &CudaTensor,
        b: &CudaTensor,
        s: f32,
        out: ProductOutput,
        plus: Option<&CudaTensor>,
    ) -> Result<Option<CudaTensor>> {
        if self.fold_layout(x, w, xa, b).is_none() {
            return Ok(None);
        }
        let y = self.product_output(x.rows, w.rows, out, xa.cols)?;
        let (out, _) = self.operand(&y, false)?;
        let addend = match plus {
            None => Addend::Nothing,
            Some(p) => {
                wants_f32(p, "a product's addend")?;
                if (p.rows, p.cols, p.pitch()) != (out.rows, out.cols, out.pitch) {
                    return Err(Error::InvalidArgument(format!(
                        "a product's addend [{}, {}] is not laid out like its output [{}, {}]",
                        p.rows, p.cols, out.rows, out.cols
                    )));
                }
                Addend::Matrix(self.ptr(p)?)
            }
        };
        Ok(self
            .folded_product_into(x, w, xa, b, s, out, addend)?
            .then_some(y))
    }

    /// Where `W`'s values lie and the pitch of its folded layout when `[x | xa]·[W | s·B]ᵀ` has
    /// the shapes and storage of one folded product (an f32 `x` still needs its rounded copy
    /// with room: `widened`).
    fn fold_layout<'w>(
        &self,
        x: &CudaTensor,
        w: &'w CudaTensor,
        xa: &CudaTensor,
        b: &CudaTensor,
    ) -> Option<(FoldedWeight<'w>, usize)> {
        let r = xa.cols;
        let layout = self.folded_weight(w, r)?;
        ((b.rows, b.cols) == (w.rows, r) && x.cols == w.cols).then_some(layout)
    }

    /// `out = [x | xa]·[W | s·B]ᵀ + addend` when it can run as one product; false (nothing
    /// queued) when it cannot.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn folded_product_into(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        xa: &CudaTensor,
        b: &CudaTensor,
        s: f32,
        out: Operand,
        addend: Addend,
    ) -> Result<bool> {
        let r = xa.cols;
        let Some((weight, pitch)) = self.fold_layout(x, w, xa, b) else {
            return Ok(false);
        };
        let Some(act) = self.widened(x, xa)? else {
            return Ok(false);
        };
        let memo = !matches!(weight, FoldedWeight::HostCopy(_));
        let spare = self.spare_factor(b, w.cols, s)?;
        let (slot, mut scratch, with) = self.folded_values(weight, w, pitch, r, spare)?;
        let tail = slot + (w.cols * std::mem::size_of::<u16>()) as u64;
        self.write_factor(&mut scratch, memo, b, tail, pitch, s, with)?;
        let weight = Operand {
            ptr: slot,
            dtype: Dtype::Bf16,
            rows: w.rows,
            cols: w.cols + r,
            pitch,
        };
        self.gemm(
            "gemm_bf16_folded",
            act.operand,
            false,
            weight,
            true,
            1.0,
            addend,
            out,
        )?;
        Ok(true)
    }

    /// `[dy | dxa]·[W ; A]` (added into `acc` when given, else stored as `out` says) when it
    /// can run as one product; otherwise `acc` comes back untouched.
    pub(super) fn folded_product_backward(
        &self,
        dy: &CudaTensor,
        w: &CudaTensor,
        dxa: &CudaTensor,
        a: &CudaTensor,
        acc: Option<CudaTensor>,
        out: ProductOutput,
    ) -> Result<std::result::Result<CudaTensor, Option<CudaTensor>>> {
        let r = dxa.cols;
        let Some((weight, pitch)) = self.folded_weight(w, r) else {
            return Ok(Err(acc));
        };
        let acc_fits = acc
            .as_ref()
            .is_none_or(|t| (t.rows, t.cols) == (dy.rows, w.cols));
        if (a.rows, a.cols) != (r, w.cols) || dy.cols != w.rows || !acc_fits {
            return Ok(Err(acc));
        }
        let Some(act) = self.widened(dy, dxa)? else {
            return Ok(Err(acc));
        };
        let memo = !matches!(weight, FoldedWeight::HostCopy(_));
        let spare = self.spare_factor(a, w.rows * pitch, 1.0)?;
        let (slot, mut scratch, with) = self.folded_values(weight, w, pitch, r, spare)?;
        let below = slot + (w.rows * pitch * std::mem::size_of::<u16>()) as u64;
        self.write_factor(&mut scratch, memo, a, below, pitch, 1.0, with)?;
        let weight = Operand {
            ptr: slot,
            dtype: Dtype::Bf16,
            rows: w.rows + r,
            cols: w.cols,
            pitch,
        };
        let addend = match acc {
            Some(_) => Addend::Output,
            None => Addend::Nothing,
        };
        let dx = match acc {
            Some(dx) => dx,
            None => self.product_output(dy.rows, w.cols, out, r)?,
        };
        let (out, _) = self.operand(&dx, false)?;
        self.gemm(
            "gemm_bf16_folded",
            act.operand,
            false,
            weight,
            false,
            1.0,
            addend,
            out,
        )?;
        Ok(Ok(dx))
    }
}
