//! The compute backends and the operations the decoder is written against.
//!
//! Every tensor is a row-major matrix `[rows, cols]`; activations have one row per token
//! (`batch · seq` rows). The decoder in `model::decoder` calls only the methods of [`Backend`], so a new
//! backend is checked against the CPU reference op by op.

pub mod collective;
pub mod cpu;
pub mod cuda;

use crate::error::Result;
use crate::model::config::Activation;
use crate::quant::Nf4Tensor;

/// Label value meaning "no loss at this position" (PyTorch's ignore_index).
pub const IGNORE_LABEL: i32 = -100;

/// How the rows of q/k/v are grouped into sequences for attention.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// AdamW hyper-parameters for one update.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u64,
    /// Each gradient is multiplied by this first (global-norm clipping; 1 when not clipping).
    pub grad_scale: f32,
}

/// One parameter tensor's AdamW state: the parameter, its gradient and both moments.
pub struct AdamWSlot<'a, T> {
    pub param: &'a mut T,
    pub grad: &'a T,
    pub m: &'a mut T,
    pub v: &'a mut T,
}

/// Fails unless matrices `a` and `b` (`(rows, cols)`) have one shape; `what` names the operation.
pub fn check_same_shape(a: (usize, usize), b: (usize, usize), what: &str) -> Result<()> {
    if a != b {
        return Err(crate::error::Error::InvalidArgument(format!(
            "{what}: shapes [{}, {}] and [{}, {}] differ",
            a.0, a.1, b.0, b.1
        )));
    }
    Ok(())
}

/// Fails unless the RMSNorm backward's operands fit: `dy` rows `[start, start + dy.0)` of `x`,
/// a weight of `x.1` values, `x.0` scales and a gradient `dx` of `x`'s shape.
pub fn check_norm_backward(
    dy: (usize, usize),
    x: (usize, usize),
    weights: usize,
    scales: usize,
    start: usize,
    dx: (usize, usize),
) -> Result<()> {
    check_rows(x.0, start, dy.0, (x.1, dy.1), "rmsnorm_backward")?;
    if weights != x.1 || scales != x.0 {
        return Err(crate::error::Error::InvalidArgument(format!(
            "rmsnorm_backward: weight of {weights} and {scales} scales for an input of [{}, {}]",
            x.0, x.1
        )));
    }
    check_same_shape(dx, x, "rmsnorm_backward's accumulator")
}

/// Fails unless `values` values fill a `[rows, cols]` matrix exactly.
pub fn check_len(values: usize, rows: usize, cols: usize) -> Result<()> {
    if values != rows * cols {
        return Err(crate::error::Error::InvalidArgument(format!(
            "{values} values do not fill a [{rows}, {cols}] matrix"
        )));
    }
    Ok(())
}

/// Fails unless rows `[start, start + rows)` exist in a tensor of `total` rows and, when
/// `cols` is given as `(tensor's, other's)`, the two column counts agree.
pub fn check_rows(
    total: usize,
    start: usize,
    rows: usize,
    cols: (usize, usize),
    what: &str,
) -> Result<()> {
    if start.checked_add(rows).is_none_or(|end| end > total) || cols.0 != cols.1 {
        return Err(crate::error::Error::InvalidArgument(format!(
            "{what}: rows {start}..{} of {} values in a tensor of {total} rows of {} values",
            start.saturating_add(rows),
            cols.1,
            cols.0
        )));
    }
    Ok(())
}

/// Checks the `(rows, cols)` of q, k, v and the number of segment ids against `s`; where a
/// backend bounds the head dimension, `max_head_dim` also requires it even and at most that.
pub fn check_attention_shapes(
    q: (usize, usize),
    k: (usize, usize),
    v: (usize, usize),
    segments: usize,
    s: AttentionShape,
    max_head_dim: Option<usize>,
) -> Result<()> {
    let tokens = s.batch * s.seq;
    let head_dim_ok = max_head_dim.is_none_or(|max| s.head_dim % 2 == 0 && s.head_dim <= max);
    let ok = s.num_kv_heads > 0
        && s.num_heads % s.num_kv_heads == 0
        && head_dim_ok
        && q == (tokens, s.num_heads * s.head_dim)
        && k == (tokens, s.num_kv_heads * s.head_dim)
        && v == k
        && segments == tokens;
    if ok {
        return Ok(());
    }
    let limit = max_head_dim
        .map(|m| format!(" (head_dim must be even and at most {m})"))
        .unwrap_or_default();
    Err(crate::error::Error::InvalidArgument(format!(
        "attention shapes: q [{}, {}], k [{}, {}], v [{}, {}], {segments} segment ids for {s:?}{limit}",
        q.0, q.1, k.0, k.1, v.0, v.1
    )))
}

/// A device copy of a frozen matrix kept in host memory ([`Backend::bring_to_device`]), read by
/// the products queued while this lives and released when it is dropped, if this made it (a
/// copy the thread already held stays its maker's to release).
pub struct DeviceCopy<'a, B: Backend + ?Sized> {
    be: &'a B,
    t: &'a B::Tensor,
    made: bool,
}

impl<'a, B: Backend + ?Sized> DeviceCopy<'a, B> {
    /// Starts bringing `t` over (nothing to do where `t` is already on the device).
    pub fn bring(be: &'a B, t: &'a B::Tensor) -> Result<Self> {
        let made = be.bring_to_device(t)?;
        Ok(DeviceCopy { be, t, made })
    }
}

impl<B: Backend + ?Sized> Drop for DeviceCopy<'_, B> {
    fn drop(&mut self) {
        if self.made {
            self.be.release_device_copy(self.t);
        }
    }
}

/// [`Backend::rope_for_products`] as its two steps: the rotation in place, then
/// [`Backend::product_input`].
pub fn rope_then_product_input<B: Backend + ?Sized>(
    be: &B,
    mut x: B::Tensor,
    positions: &B::Ints,
    inv_freq: &[f32],
    head_dim: usize,
    inverse: bool,
    room: usize,
) -> Result<B::Tensor> {
    be.rope(&mut x, positions, inv_freq, head_dim, inverse)?;
    be.product_input(x, room)
}

/// [`Backend::attention_for_products`] as its two steps: [`Backend::attention`], then
/// [`Backend::product_input`] of its output.
pub fn attention_then_product_input<B: Backend + ?Sized>(
    be: &B,
    [q, k, v]: [&B::Tensor; 3],
    segments: &B::Ints,
    shape: AttentionShape,
    room: usize,
) -> Result<(B::Tensor, B::Tensor)> {
    let (out, lse) = be.attention(q, k, v, segments, shape)?;
    Ok((be.product_input(out, room)?, lse))
}

/// [`Backend::attention_backward_for_products`] as its steps: [`Backend::attention_backward`],
/// then dq and dk turned back by −θ ([`Backend::rope_for_products`], `inverse`) and dv, all three
/// made product inputs with `room`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_then_product_inputs<B: Backend + ?Sized>(
    be: &B,
    [q, k, v]: [&B::Tensor; 3],
    out: B::Tensor,
    lse: &B::Tensor,
    d_out: B::Tensor,
    segments: &B::Ints,
    shape: AttentionShape,
    positions: &B::Ints,
    inv_freq: &[f32],
    room: usize,
) -> Result<[B::Tensor; 3]> {
    let (dq, dk, dv) = be.attention_backward(q, k, v, out, lse, d_out, segments, shape)?;
    let hd = shape.head_dim;
    Ok([
        be.rope_for_products(dq, positions, inv_freq, hd, true, room)?,
        be.rope_for_products(dk, positions, inv_freq, hd, true, room)?,
        be.product_input(dv, room)?,
    ])
}

/// [`Backend::rmsnorm_chunks_for_products`] as its steps: [`Backend::rmsnorm_for_products`] of
/// all rows, then the chunks' rows copied out of it (none where one chunk is all of them).
pub fn rmsnorm_then_chunks<B: Backend + ?Sized>(
    be: &B,
    x: &B::Tensor,
    w: &B::Tensor,
    (eps, unit_offset): (f32, bool),
    room: usize,
    chunks: &[(usize, usize)],
) -> Result<(Vec<B::Tensor>, B::Tensor)> {
    let (y, r) = be.rmsnorm_for_products(x, w, eps, unit_offset, room)?;
    if let [(0, rows)] = chunks {
        if *rows == be.shape(x).0 {
            return Ok((vec![y], r));
        }
    }
    let parts = chunks
        .iter()
        .map(|&(start, rows)| be.copy_rows(&y, start, rows))
        .collect::<Result<_>>()?;
    Ok((parts, r))
}

/// [`Backend::rotated_attention_inputs`] as its steps: q and k rotated in place, then
/// [`Backend::attention_inputs`].
pub fn rope_then_attention_inputs<B: Backend + ?Sized>(
    be: &B,
    [mut q, mut k, v]: [B::Tensor; 3],
    s: AttentionShape,
    positions: &B::Ints,
    inv_freq: &[f32],
) -> Result<[B::Tensor; 3]> {
    be.rope(&mut q, positions, inv_freq, s.head_dim, false)?;
    be.rope(&mut k, positions, inv_freq, s.head_dim, false)?;
    be.attention_inputs(q, k, v, s)
}

/// A point of a training pass ([`Backend::mark`]): where it starts, where each layer's forward
/// and backward pass and the loss begin, where it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassPoint {
    Start,
    Forward(usize),
    Loss,
    Backward(usize),
    End,
}

/// What reads the output of an adapted product ([`Backend::adapted_product`] and its backward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProductOutput {
    /// f32 arithmetic that keeps it (residual sums, norms, attention): f32 values.
    Sums,
    /// Only kernels that read each value once and would round it to bf16 themselves: the
    /// attention's backward (its dO), whose tensor-core products read dO in bf16 (the gated
    /// kernels' operands are `GatedOperand`). A backend that rounds product inputs to bf16 may
    /// store the output rounded to bf16 (half the bytes written and read again).
    Rounded,
    /// Read only by the gated activation's kernels (gate's and up's outputs, and dL/dm, down's
    /// input gradient): as `Rounded`, laid out by the backend so that
    /// [`Backend::gated_activation_backward_in_place`] can write its results over them.
    GatedOperand,
}

/// [`Backend::adapted_product`] as two products: `y = s·xa·Bᵀ`, then `y += x·Wᵀ`.
pub fn adapted_product_in_two<B: Backend + ?Sized>(
    be: &B,
    x: &B::Tensor,
    w: &B::Tensor,
    xa: &B::Tensor,
    b: &B::Tensor,
    s: f32,
) -> Result<B::Tensor> {
    let mut y = be.product(xa, false, b, true, s)?;
    be.matmul(x, false, w, true, 1.0, &mut y, true)?;
    Ok(y)
}

/// [`Backend::adapted_product_plus`] as the adapted product, then `+= plus`.
pub fn adapted_product_plus_in_two<B: Backend + ?Sized>(
    be: &B,
    x: &B::Tensor,
    w: &B::Tensor,
    xa: &B::Tensor,
    b: &B::Tensor,
    s: f32,
    plus: &B::Tensor,
) -> Result<B::Tensor> {
    let mut y = be.adapted_product(x, w, xa, b, s, ProductOutput::Sums)?;
    be.add_assign(&mut y, plus)?;
    Ok(y)
}

/// [`Backend::adapted_product_backward`] as two products: `dx (+)= dxa·A`, then `dx += dy·W`.
pub fn adapted_product_backward_in_two<B: Backend + ?Sized>(
    be: &B,
    dy: &B::Tensor,
    w: &B::Tensor,
    dxa: &B::Tensor,
    a: &B::Tensor,
    acc: Option<B::Tensor>,
) -> Result<B::Tensor> {
    let mut dx = product_into(be, acc, dxa, a)?;
    be.matmul(dy, false, w, false, 1.0, &mut dx, true)?;
    Ok(dx)
}

/// [`Backend::add_adapter_gradients`] in order on `be`'s one stream: `db += s·dyᵀ·xa`, then
/// `da += dxaᵀ·x`.
#[allow(clippy::too_many_arguments)]
pub fn adapter_gradients_in_order<B: Backend + ?Sized>(
    be: &B,
    dy: &B::Tensor,
    xa: &B::Tensor,
    dxa: &B::Tensor,
    x: &B::Tensor,
    s: f32,
    da: &mut B::Tensor,
    db: &mut B::Tensor,
) -> Result<()> {
    be.matmul(dy, true, xa, false, s, db, true)?;
    be.matmul(dxa, true, x, false, 1.0, da, true)
}

/// `a·b`, added into `acc` when given, else into a new tensor.
pub fn product_into<B: Backend + ?Sized>(
    be: &B,
    acc: Option<B::Tensor>,
    a: &B::Tensor,
    b: &B::Tensor,
) -> Result<B::Tensor> {
    match acc {
        Some(mut c) => {
            be.matmul(a, false, b, false, 1.0, &mut c, true)?;
            Ok(c)
        }
        None => be.product(a, false, b, false, 1.0),
    }
}

/// [`Backend::rounded_product_inputs`] a tensor at a time: its default, and where a backend
/// cannot take them all at once.
pub fn rounded_one_by_one<B: Backend + ?Sized>(
    be: &B,
    xs: &[&B::Tensor],
) -> Result<Option<Vec<B::Tensor>>> {
    let rounded = xs.iter().map(|x| be.rounded_product_input(x, 0));
    Ok(rounded.collect::<Result<Vec<_>>>()?.into_iter().collect())
}

/// The per-step constants of [`Backend::adamw`], computed once on the host the way torch does.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConstants {
    /// `1 − lr·wd`.
    pub decay: f32,
    /// `lr / (1 − β1^t)`.
    pub step_size: f32,
    /// `sqrt(1 − β2^t)`.
    pub bc2_sqrt: f32,
}

impl AdamWConstants {
    pub fn of(h: AdamWStep) -> Self {
        let bc1 = 1.0 - (h.beta1 as f64).powi(h.step as i32);
        let bc2 = 1.0 - (h.beta2 as f64).powi(h.step as i32);
        AdamWConstants {
            decay: 1.0 - h.lr * h.weight_decay,
            step_size: (h.lr as f64 / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
        }
    }
}

/// Device memory held by a backend's tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMemory {
    pub live_bytes: usize,
    /// The most held at once since the backend started or the peak was last reset.
    pub peak_bytes: usize,
    /// What the allocation that reached the peak was for (named as in out-of-memory errors).
    pub peak_set_by: String,
    /// Bytes held per purpose (as named in out-of-memory errors) at the peak, largest first;
    /// they add up to `peak_bytes`.
    pub peak_purposes: Vec<(String, usize)>,
}

/// What [`Backend::record`] made of some work. Unless `Kept`, the caller runs the work
/// unrecorded.
pub enum Recorded<R> {
    /// The recording, to replay.
    Kept(R),
    /// Not recorded now: a resource it needs is in use elsewhere. Worth trying again.
    NotNow,
    /// Not recorded, and not worth trying again with the same work: the backend does not
    /// record (`work` not called), or the recording's memory would pass the device-memory cap
    /// beside what is held (its block can exceed the most the work holds at once, which the
    /// work queued op by op may still fit in). The caller may hold on to that answer for as
    /// long as the work's shape stays, though memory other work holds may have decided it.
    Never,
}

/// A compute device. Methods that allocate return new tensors; methods taking `&mut` work in place.
pub trait Backend: Send + Sync + 'static {
    /// A matrix of f32 values (the storage precision is the backend's business).
    type Tensor: Send + Sync;
    /// A vector of 32-bit integers (token ids, positions, labels, segment ids).
    type Ints: Send + Sync;
    /// Work recorded once by [`Backend::record`] and run again by [`Backend::replay`].
    type Recording: Send;

    /// A short human-readable description ("cpu (2 threads)").
    fn describe(&self) -> String;

    /// Device memory in use and its peak, for backends with memory of their own.
    fn device_memory(&self) -> Option<DeviceMemory> {
        None
    }
    /// Starts a new peak measurement of [`Backend::device_memory`].
    fn reset_peak_memory(&self) {}

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// Uploads a frozen base matrix; a backend may store it in lower precision (the CUDA backend
    /// keeps bf16). Such a tensor is only read: by matmul, embedding, the LM head and download.
    fn upload_frozen(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor> {
        self.upload(data, rows, cols)
    }
    /// Quantizes a frozen base matrix to NF4 with double-quantized absmax (bit for bit as
    /// [`Nf4Tensor::quantize`]; a device backend quantizes on the device) and keeps it packed.
    /// Such a tensor is only read: by matmul, which dequantizes it on the fly, and by download,
    /// which returns the dequantized values.
    fn upload_frozen_nf4(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// Keeps an already quantized NF4 matrix (a bitsandbytes-4bit checkpoint's weight) packed, as
    /// [`Backend::upload_frozen_nf4`] does.
    fn upload_nf4(&self, q: Nf4Tensor) -> Result<Self::Tensor>;
    /// Uploads a frozen projection matrix of a decoder layer (`[out, in]`), read only by
    /// products and download. A backend may lay it out for the adapted products (a GPU
    /// backend: spare columns and rows where an adapter's factors are written before each
    /// product, so that the adapter's rank folds into the base product's inner dimension).
    fn upload_projection(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor> {
        self.upload_frozen(data, rows, cols)
    }
    /// Uploads a frozen lookup table that only [`Backend::embedding`] reads (an untied embedding
    /// table); a backend may keep it in host memory and move only the rows a batch looks up (its
    /// products, if any, then read a device copy).
    fn upload_lookup_table(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor> {
        self.upload_frozen(data, rows, cols)
    }
    /// Uploads a frozen matrix read only by products and download, kept in host memory where
    /// the backend computes elsewhere (a GPU backend: pinned host memory); its products then read
    /// the copy [`Backend::bring_to_device`] brought over, or copy it each. The CPU keeps it as
    /// [`Backend::upload_frozen`] does.
    fn upload_frozen_in_host(
        &self,
        data: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self::Tensor> {
        self.upload_frozen(data, rows, cols)
    }
    /// Moves the codes of a frozen quantized projection matrix ([`Backend::upload_nf4`],
    /// [`Backend::upload_frozen_nf4`]) to host memory where the backend computes elsewhere (a GPU
    /// backend: pinned host memory, the absmax values staying on the device); its products then
    /// dequantize the copy [`Backend::bring_to_device`] brought over, or copy the codes each.
    /// The CPU keeps the matrix as it is.
    fn keep_codes_in_host(&self, t: Self::Tensor) -> Result<Self::Tensor> {
        Ok(t)
    }
    /// Uploads the output projection (the LM head, or the embedding table when tied): frozen,
    /// read by the LM head's products, by [`Backend::embedding`] when tied and by download. A
    /// backend may keep it in host memory, where [`Backend::bring_to_device`] brings a copy
    /// ahead of the training step's LM head.
    fn upload_output_projection(
        &self,
        data: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self::Tensor> {
        self.upload_frozen(data, rows, cols)
    }
    fn upload_ints(&self, data: &[i32]) -> Result<Self::Ints>;
    /// Overwrites the values of `t` with `data` (as many as `t` holds), in place: the buffer
    /// stays where it is, so recorded work reading it sees the new values.
    fn write(&self, t: &mut Self::Tensor, data: &[f32]) -> Result<()>;
    /// [`Backend::write`] for a vector of integers.
    fn write_ints(&self, ints: &mut Self::Ints, data: &[i32]) -> Result<()>;
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// A tensor whose every element the caller overwrites before reading it (a backend may skip
    /// the zeroing that [`Backend::zeros`] does).
    fn output(&self, rows: usize, cols: usize) -> Result<Self::Tensor> {
        self.zeros(rows, cols)
    }
    /// `(rows, cols)`.
    fn shape(&self, t: &Self::Tensor) -> (usize, usize);
    /// A copy of `t` in new storage.
    fn duplicate(&self, t: &Self::Tensor) -> Result<Self::Tensor>;
    /// Reinterprets a row-major matrix with another shape of the same size (no copy).
    fn reshape(&self, t: Self::Tensor, rows: usize, cols: usize) -> Self::Tensor;

    /// `c = alpha · op(a) · op(b) + (accumulate ? c : 0)`, `op(x) = xᵀ` when the flag is set.
    /// One of `a` and `b` may be an NF4 matrix (see [`Backend::upload_frozen_nf4`]).
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        a: &Self::Tensor,
        trans_a: bool,
        b: &Self::Tensor,
        trans_b: bool,
        alpha: f32,
        c: &mut Self::Tensor,
        accumulate: bool,
    ) -> Result<()>;
    /// `alpha · op(a) · op(b)` as a new tensor ([`Backend::matmul`] into a fresh output).
    fn product(
        &self,
        a: &Self::Tensor,
        trans_a: bool,
        b: &Self::Tensor,
        trans_b: bool,
        alpha: f32,
    ) -> Result<Self::Tensor> {
        let ((ar, ac), (br, bc)) = (self.shape(a), self.shape(b));
        let rows = if trans_a { ac } else { ar };
        let cols = if trans_b { br } else { bc };
        let mut c = self.output(rows, cols)?;
        self.matmul(a, trans_a, b, trans_b, alpha, &mut c, false)?;
        Ok(c)
    }
    /// An adapter's rank-wide product `alpha · x · op(m)` (`[rows, r]`): the adapter input
    /// `xa = dropout(x)·Aᵀ` or its gradient `dxa = s·dy·B`, read afterwards only as an operand
    /// of products (the adapted products and their backward, the adapter's gradients). A
    /// backend whose products round their operands to bf16 may store it rounded (the CUDA
    /// backend: the values each of those products would round it to, half the bytes, and no
    /// rounded copy per product); the CPU stores f32 ([`Backend::product`]).
    fn adapter_product(
        &self,
        x: &Self::Tensor,
        m: &Self::Tensor,
        trans_m: bool,
        alpha: f32,
    ) -> Result<Self::Tensor> {
        self.product(x, false, m, trans_m, alpha)
    }
    /// [`Backend::adapted_product`] added into rows `[start, start + rows of x)` of `acc` (which
    /// has a column per row of `w`): the product's output lands in a tensor that exists
    /// already (the MLP's down projection into the residual), with no tensor of its own where
    /// the backend can add it there at once.
    #[allow(clippy::too_many_arguments)]
    fn adapted_product_add_rows(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        xa: &Self::Tensor,
        b: &Self::Tensor,
        s: f32,
        acc: &mut Self::Tensor,
        start: usize,
    ) -> Result<()> {
        let y = self.adapted_product(x, w, xa, b, s, ProductOutput::Sums)?;
        self.add_rows(acc, start, &y)
    }

    /// `x` made ready to be an operand of products with frozen matrices, for a caller that reads
    /// it no other way afterwards (only matmul, the adapted products, lm_head_cross_entropy,
    /// copy_rows, download, stash and attention_backward's `out`; dropout too when `room` is
    /// 0). A backend whose products round their activation operand anyway (the CUDA backend: to
    /// bf16) rounds it here once for all the products that share it, and keeps half the bytes;
    /// the CPU returns `x`. `room`: the rank of the adapters whose [`Backend::adapted_product`]
    /// (or its backward) reads `x`, 0 when none does: a backend that folds the adapter's term
    /// into the product's inner dimension may leave that many spare columns after each row.
    fn product_input(&self, x: Self::Tensor, room: usize) -> Result<Self::Tensor> {
        Ok(self.rounded_product_input(&x, room)?.unwrap_or(x))
    }
    /// Rows `[start, start + rows)` of `x` made a product input with `room`: what
    /// [`Backend::product_input`] makes of [`Backend::copy_rows`]; a backend that rounds product
    /// inputs reads the rows in place and writes them rounded at once (no copy in between).
    fn product_input_rows(
        &self,
        x: &Self::Tensor,
        start: usize,
        rows: usize,
        room: usize,
    ) -> Result<Self::Tensor> {
        self.product_input(self.copy_rows(x, start, rows)?, room)
    }
    /// [`Backend::product_input`] of `x` as a new tensor, `x` kept (a caller that still needs
    /// `x` itself), or `None` when products read `x` as it is (the CPU).
    fn rounded_product_input(&self, x: &Self::Tensor, room: usize) -> Result<Option<Self::Tensor>> {
        let _ = (x, room);
        Ok(None)
    }
    /// [`Backend::rounded_product_input`] of each of `xs` with no room, all or none: `None`
    /// when any comes back `None`. For the adapters' factors, rounded once a pass (a backend
    /// may round them all in one launch).
    fn rounded_product_inputs(&self, xs: &[&Self::Tensor]) -> Result<Option<Vec<Self::Tensor>>> {
        rounded_one_by_one(self, xs)
    }
    /// A copy of the residual `x` as the RMSNorms read it, for a caller that keeps it for them
    /// alone (a layer's input or x1 kept for the backward pass), or `None` where the norms read
    /// x as it is (the CPU). A backend whose norms read the residual rounded (the CUDA backend
    /// where it rounds product inputs: to bf16, as a bf16 stack stores the residual) returns the
    /// rounded copy, half the bytes: the norms read the same values from it as from x. Only the
    /// norms, `stash`, `fetch_stashed`, `settle` and `download` read it.
    fn norm_input(&self, x: &Self::Tensor) -> Result<Option<Self::Tensor>> {
        let _ = x;
        Ok(None)
    }
    /// An adapted projection `y = x·Wᵀ + s·xa·Bᵀ` (`[rows, out]`, new), with the adapter input
    /// `xa = dropout(x)·Aᵀ` (`[rows, r]`) computed by the caller and `b = B: [out, r]`. The
    /// adapter's term is written first and the base product accumulated onto it (the large
    /// product reads `y` as part of its own work, where adding the rank-wide term afterwards
    /// would be one more pass over `y`). A backend may instead run the one product
    /// `[x | xa]·[W | s·B]ᵀ` (inner dimension in + r), with `x` from
    /// [`Backend::product_input`] given the room. `out` says what reads `y` (f32 by default).
    fn adapted_product(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        xa: &Self::Tensor,
        b: &Self::Tensor,
        s: f32,
        out: ProductOutput,
    ) -> Result<Self::Tensor> {
        let _ = out;
        adapted_product_in_two(self, x, w, xa, b, s)
    }
    /// `plus + x·Wᵀ + s·xa·Bᵀ` in f32 ([`Backend::adapted_product`] added to `plus`, same
    /// shape, left as it is): a residual sum. A backend may have the product's own epilogue
    /// read `plus`, with no pass of its own over the sum.
    #[allow(clippy::too_many_arguments)]
    fn adapted_product_plus(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        xa: &Self::Tensor,
        b: &Self::Tensor,
        s: f32,
        plus: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        adapted_product_plus_in_two(self, x, w, xa, b, s, plus)
    }
    /// The input gradient of [`Backend::adapted_product`] without dropout: `dx = dy·W + dxa·A`
    /// with `dxa = s·dy·B` (`[rows, r]`, computed by the caller, which also needs it for A's
    /// gradient) and `a = A: [r, in]`, added into `acc` when given. The adapter's share first,
    /// as in the forward; a backend may run the one product `[dy | dxa]·[W ; A]` (inner
    /// dimension out + r), with `dy` from [`Backend::product_input`] given the room. `out` says
    /// what reads `dx` when no `acc` is given (f32 by default; an `acc` stays as it is).
    fn adapted_product_backward(
        &self,
        dy: &Self::Tensor,
        w: &Self::Tensor,
        dxa: &Self::Tensor,
        a: &Self::Tensor,
        acc: Option<Self::Tensor>,
        out: ProductOutput,
    ) -> Result<Self::Tensor> {
        let _ = out;
        adapted_product_backward_in_two(self, dy, w, dxa, a, acc)
    }
    /// A LoRA pair's gradients from its projection's backward: `db += s·dyᵀ·xa` and
    /// `da += dxaᵀ·x` (`dy: [rows, out]`, `xa`, `dxa: [rows, r]`, `x: [rows, in]`). A device
    /// backend may run them beside the work queued after them (CUDA: on a second stream; each
    /// reads an activation-sized matrix for a rank-wide result, and nothing of the pass waits
    /// for it): they are complete, and their inputs no longer read, once
    /// [`Backend::join_adapter_gradients`] is queued. Until then nothing may write `dy`, `xa`,
    /// `dxa`, `x`, `da` or `db`, and a caller done with one of them hands it to
    /// [`Backend::drop_after_adapter_gradients`] instead of dropping it.
    #[allow(clippy::too_many_arguments)]
    fn add_adapter_gradients(
        &self,
        dy: &Self::Tensor,
        xa: &Self::Tensor,
        dxa: &Self::Tensor,
        x: &Self::Tensor,
        s: f32,
        da: &mut Self::Tensor,
        db: &mut Self::Tensor,
    ) -> Result<()> {
        adapter_gradients_in_order(self, dy, xa, dxa, x, s, da, db)
    }
    /// Says that a pass of the calling thread begins (`true`) or ends (`false`). Until it ends
    /// the adapter factors its products read keep their values, so a backend may skip
    /// rewriting a factor where it wrote the same one for an earlier product of the pass (the
    /// CUDA backend's folded products: backend/cuda/fold.rs). Factors change between passes.
    fn hold_adapter_factors(&self, held: bool) {
        let _ = held;
    }
    /// Drops `t` once the adapter gradients queued so far no longer read it (at once where they
    /// ran in order).
    fn drop_after_adapter_gradients(&self, t: Self::Tensor) {
        drop(t);
    }
    /// Makes the work queued from now on wait for the adapter gradients queued so far
    /// ([`Backend::add_adapter_gradients`]), and drops what was handed over for them.
    fn join_adapter_gradients(&self) -> Result<()> {
        Ok(())
    }
    /// `x[r, :] += bias` for every row.
    fn add_row_vector(&self, x: &mut Self::Tensor, bias: &Self::Tensor) -> Result<()>;
    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// Marks a point of a training pass on the backend's timeline, where it keeps one (a GPU's
    /// `FINETUNE_CUDA_TIMELINE`, backend/cuda/timeline.rs); nothing otherwise.
    fn mark(&self, point: PassPoint) -> Result<()> {
        let _ = point;
        Ok(())
    }
    /// Moves a layer input kept for the backward pass out of device memory: a GPU backend copies
    /// it to pinned host memory on a stream of its own while later work runs, and frees the
    /// device copy once done. Only [`Backend::fetch_stashed`] and [`Backend::settle`] read the
    /// result. The CPU keeps the tensor as it is.
    fn stash(&self, t: Self::Tensor) -> Result<Self::Tensor> {
        let [t] = self.stash_all([t])?;
        Ok(t)
    }
    /// [`Backend::stash`] of several tensors at one point of the work: their copies start
    /// together (on a GPU the buffers of earlier copies out are freed once for all of them).
    fn stash_all<const N: usize>(&self, ts: [Self::Tensor; N]) -> Result<[Self::Tensor; N]> {
        Ok(ts)
    }
    /// Whether [`Backend::stash`] moves tensors out of the memory the backend computes in (a GPU
    /// backend's copies in host memory): then keeping more of them stashed costs host memory
    /// only. The CPU's stash keeps tensors where they are.
    fn stash_moves(&self) -> bool {
        false
    }
    /// Starts bringing a stashed tensor back to the device; the copy overlaps the work queued
    /// after it. [`Backend::settle`] must run before anything reads it.
    fn fetch_stashed(&self, t: Self::Tensor) -> Result<Self::Tensor> {
        Ok(t)
    }
    /// Makes later work wait until a fetched (or stashed) tensor is back on the device, and
    /// returns it as an ordinary tensor.
    fn settle(&self, t: Self::Tensor) -> Result<Self::Tensor> {
        Ok(t)
    }
    /// Starts copying a frozen matrix kept in host memory ([`Backend::upload_frozen_in_host`],
    /// [`Backend::keep_codes_in_host`], [`Backend::upload_output_projection`]) to the device, beside the work queued after it;
    /// the products this thread queues with `t` until [`Backend::release_device_copy`] wait for
    /// the copy and read it (each thread brings its own: passes over one model may run on
    /// several threads at once). Nothing happens when `t` is already where products read it
    /// (always on the CPU) or this thread's copy is already there. Returns whether this call
    /// started a copy (and so whose release frees it).
    fn bring_to_device(&self, t: &Self::Tensor) -> Result<bool> {
        let _ = t;
        Ok(false)
    }
    /// Frees the device copy [`Backend::bring_to_device`] made of `t` on this thread (after the
    /// work queued before, which may still read it); later products copy `t` each until it is
    /// brought again.
    fn release_device_copy(&self, t: &Self::Tensor) {
        let _ = t;
    }
    /// Sets every element of `x` to 0, whatever it held (NaN too, which a product with 0 keeps).
    fn fill_zero(&self, x: &mut Self::Tensor) -> Result<()>;
    /// `Σ x²` over every element of every tensor in `xs`, accumulated in f64 (one result for a
    /// whole set, so a device backend waits once).
    fn sum_squares(&self, xs: &[&Self::Tensor]) -> Result<f64>;
    /// Whether any element is NaN or infinite.
    fn has_non_finite(&self, x: &Self::Tensor) -> Result<bool>;

    /// Rows `table[ids[t]] · scale`.
    fn embedding(&self, table: &Self::Tensor, ids: &Self::Ints, scale: f32)
        -> Result<Self::Tensor>;

    /// RMSNorm of each row: `y = x · r · w'`, `r = 1/sqrt(mean(x²) + eps)`, `w' = w` or `1 + w`.
    /// Returns `y` and `r` (one value a row, `[rows, 1]`). The norms (and their backward) read x
    /// as [`Backend::norm_input`] says.
    fn rmsnorm(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        eps: f32,
        unit_offset: bool,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// [`Backend::rmsnorm`] with `y` made a product input for products whose adapters have rank
    /// `room` ([`Backend::product_input`]): the same values, without an f32 `y` where the backend
    /// rounds product inputs (it writes the rounded values at once).
    fn rmsnorm_for_products(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        eps: f32,
        unit_offset: bool,
        room: usize,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let (y, r) = self.rmsnorm(x, w, eps, unit_offset)?;
        Ok((self.product_input(y, room)?, r))
    }
    /// [`Backend::rmsnorm_for_products`] with `y` in row chunks (`chunks`: `(start, rows)` in
    /// order, covering `x`'s rows), one tensor a chunk, and `r` of all rows: what
    /// [`Backend::copy_rows`] would make of the whole `y`. A backend may write each chunk where
    /// it goes in the first place (no whole `y`, no copies).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_chunks_for_products(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        eps: f32,
        unit_offset: bool,
        room: usize,
        chunks: &[(usize, usize)],
    ) -> Result<(Vec<Self::Tensor>, Self::Tensor)> {
        rmsnorm_then_chunks(self, x, w, (eps, unit_offset), room, chunks)
    }
    /// Input gradient of [`Backend::rmsnorm`] with a frozen weight:
    /// `dx_j = r·w'_j·dy_j − (r³/n)·x_j·Σ_i dy_i·w'_i·x_i`, added into `acc` (the gradient that
    /// the residual carries past the norm, same shape) when given and returned, else new.
    fn rmsnorm_backward(
        &self,
        dy: &Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Tensor,
        r: &Self::Tensor,
        unit_offset: bool,
        acc: Option<Self::Tensor>,
    ) -> Result<Self::Tensor>;
    /// [`Backend::rmsnorm_backward`] of rows `[start, start + rows of dy)` of `x` (and `r`), added
    /// into the same rows of `acc` (`x`'s shape): the norm's backward one chunk of rows at a time,
    /// bit for bit the rows the whole call makes.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward_rows(
        &self,
        dy: &Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Tensor,
        r: &Self::Tensor,
        unit_offset: bool,
        start: usize,
        acc: &mut Self::Tensor,
    ) -> Result<()>;

    /// Rotary embedding in place on `x: [tokens, heads·head_dim]` ("rotate half" layout): with
    /// `θ = pos·inv_freq[i]`, `(x_i, x_{i+d/2}) ← (x_i cosθ − x_{i+d/2} sinθ, x_{i+d/2} cosθ + x_i sinθ)`.
    /// `inverse` rotates by −θ, which is the backward pass (the rotation is orthogonal).
    fn rope(
        &self,
        x: &mut Self::Tensor,
        positions: &Self::Ints,
        inv_freq: &[f32],
        head_dim: usize,
        inverse: bool,
    ) -> Result<()>;

    /// [`Backend::rope`] of `x`, then `x` made a product input for products whose adapters have
    /// rank `room` ([`Backend::product_input`]): a backend that rounds product inputs may write
    /// the rotated values rounded at once.
    fn rope_for_products(
        &self,
        x: Self::Tensor,
        positions: &Self::Ints,
        inv_freq: &[f32],
        head_dim: usize,
        inverse: bool,
        room: usize,
    ) -> Result<Self::Tensor> {
        rope_then_product_input(self, x, positions, inv_freq, head_dim, inverse, room)
    }

    /// q and k rotated ([`Backend::rope`] at `positions`), then q, k and v made ready for
    /// attention ([`Backend::attention_inputs`]): a backend whose attention rounds its inputs
    /// may write the rotated q and k rounded at once.
    fn rotated_attention_inputs(
        &self,
        q: Self::Tensor,
        k: Self::Tensor,
        v: Self::Tensor,
        s: AttentionShape,
        positions: &Self::Ints,
        inv_freq: &[f32],
    ) -> Result<[Self::Tensor; 3]> {
        rope_then_attention_inputs(self, [q, k, v], s, positions, inv_freq)
    }

    /// q, k and v made ready for [`Backend::attention`] and its backward, for a caller that
    /// reads them no other way afterwards: a backend whose attention rounds them (the CUDA
    /// tensor-core path: to bf16) rounds them here once for both passes and keeps half the
    /// bytes; the CPU returns them.
    fn attention_inputs(
        &self,
        q: Self::Tensor,
        k: Self::Tensor,
        v: Self::Tensor,
        s: AttentionShape,
    ) -> Result<[Self::Tensor; 3]> {
        let _ = s;
        Ok([q, k, v])
    }
    /// Causal softmax attention with grouped KV heads. Row t of q/k/v is token `t % seq` of sequence
    /// `t / seq`; key j is visible to query i when j ≤ i and both have the same segment id (packing).
    /// Returns the output `[tokens, heads·head_dim]` and the log-sum-exp of each score row
    /// (`[tokens, heads]`), kept for the backward pass.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        segments: &Self::Ints,
        shape: AttentionShape,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// [`Backend::attention`] with its output made a product input with `room`
    /// ([`Backend::product_input`]), for o's products: a backend may write it so in the first
    /// place (CUDA: rounded by the attention kernel, never stored in f32).
    fn attention_for_products(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        segments: &Self::Ints,
        shape: AttentionShape,
        room: usize,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        attention_then_product_input(self, [q, k, v], segments, shape, room)
    }
    /// Gradients `(dq, dk, dv)` of [`Backend::attention`]; `out` is its output or the
    /// [`Backend::product_input`] made of it, `d_out` may be a product's output stored for it
    /// ([`ProductOutput::Rounded`]). `out` and `d_out` are consumed: a
    /// backend frees them as soon as it has what it needs of them (the CUDA backend: before
    /// the gradients exist, which at long sequences lowers the step's peak by two activations).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        out: Self::Tensor,
        lse: &Self::Tensor,
        d_out: Self::Tensor,
        segments: &Self::Ints,
        shape: AttentionShape,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)>;
    /// The gradients of attention over q and k rotated at `positions`
    /// ([`Backend::rotated_attention_inputs`]), made ready for q's, k's and v's products:
    /// [`Backend::attention_backward`], dq and dk turned back by −θ (RoPE's backward), and all
    /// three made product inputs with `room` ([`Backend::product_input`]). A backend may write
    /// them so in the first place (CUDA: turned back and rounded by the attention's kernels as
    /// they store them, or, where the dK/dV launch is split into f32 slabs, as the slabs are
    /// summed).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_for_products(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        out: Self::Tensor,
        lse: &Self::Tensor,
        d_out: Self::Tensor,
        segments: &Self::Ints,
        shape: AttentionShape,
        positions: &Self::Ints,
        inv_freq: &[f32],
        room: usize,
    ) -> Result<[Self::Tensor; 3]> {
        attention_backward_then_product_inputs(
            self,
            [q, k, v],
            out,
            lse,
            d_out,
            segments,
            shape,
            positions,
            inv_freq,
            room,
        )
    }

    /// Attention of the last `m` positions of one sequence over all its `n` cached keys: query i
    /// (row i of `q: [m, heads·head_dim]`) sits at position `n − m + i` and sees keys 0..=n−m+i
    /// of `k, v: [n, kv_heads·head_dim]`. `heads = (heads, kv_heads, head_dim)`. Returns the
    /// output and the log-sum-exp of each row, as [`Backend::attention`] does.
    fn attention_decode(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: (usize, usize, usize),
    ) -> Result<(Self::Tensor, Self::Tensor)>;

    /// Appends the rows of `src` below those of `dst` (same column count).
    fn append_rows(&self, dst: &mut Self::Tensor, src: &Self::Tensor) -> Result<()>;

    /// A copy of rows `[start, start + rows)` of `t`.
    fn copy_rows(&self, t: &Self::Tensor, start: usize, rows: usize) -> Result<Self::Tensor>;

    /// `dst[start + i] += src[i]` for every row `i` of `src` (same column count).
    fn add_rows(&self, dst: &mut Self::Tensor, start: usize, src: &Self::Tensor) -> Result<()>;

    /// Gated MLP activation `h = act(g) · u`.
    fn gated_activation(
        &self,
        g: &Self::Tensor,
        u: &Self::Tensor,
        act: Activation,
    ) -> Result<Self::Tensor>;
    /// `(dg, du)` of [`Backend::gated_activation`]: `dg = dh·u·act'(g)`, `du = dh·act(g)`.
    fn gated_activation_backward(
        &self,
        dh: &Self::Tensor,
        g: &Self::Tensor,
        u: &Self::Tensor,
        act: Activation,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// [`Backend::gated_activation`] as a product input ([`Backend::product_input`], with
    /// `room`); a backend that rounds product inputs may write the rounded values directly.
    /// Here and in the backward, `g`, `u` (and `dh`) may be outputs of adapted products made for
    /// them ([`ProductOutput::GatedOperand`]).
    fn gated_activation_for_products(
        &self,
        g: &Self::Tensor,
        u: &Self::Tensor,
        act: Activation,
        room: usize,
    ) -> Result<Self::Tensor> {
        self.product_input(self.gated_activation(g, u, act)?, room)
    }
    /// [`Backend::gated_activation_backward`] with both gradients as product inputs; with
    /// `value`, also `h = act(g)·u` as [`Backend::gated_activation_for_products`] gives it
    /// (with `room`), which a backend may write in the pass that reads `g` and `u` for the
    /// gradients (the MLP's backward reads h only after dh exists).
    #[allow(clippy::type_complexity)]
    fn gated_activation_backward_for_products(
        &self,
        dh: &Self::Tensor,
        g: &Self::Tensor,
        u: &Self::Tensor,
        act: Activation,
        room: usize,
        value: bool,
    ) -> Result<(Self::Tensor, Self::Tensor, Option<Self::Tensor>)> {
        let (dg, du) = self.gated_activation_backward(dh, g, u, act)?;
        let h = value
            .then(|| self.gated_activation_for_products(g, u, act, room))
            .transpose()?;
        Ok((
            self.product_input(dg, room)?,
            self.product_input(du, room)?,
            h,
        ))
    }

    /// [`Backend::gated_activation_backward_for_products`] taking its inputs: a backend may
    /// write the results over them (dg over g, du over u, h over dh) where their layout is the
    /// results' ([`ProductOutput::GatedOperand`] products), so that the MLP's backward holds one
    /// chunk-sized buffer of each instead of two.
    #[allow(clippy::type_complexity)]
    fn gated_activation_backward_in_place(
        &self,
        dh: Self::Tensor,
        g: Self::Tensor,
        u: Self::Tensor,
        act: Activation,
        room: usize,
        value: bool,
    ) -> Result<(Self::Tensor, Self::Tensor, Option<Self::Tensor>)> {
        self.gated_activation_backward_for_products(&dh, &g, &u, act, room, value)
    }

    /// Inverted dropout with a counter-based mask: element i is kept when
    /// `hash(seed, i) ≥ p` and then scaled by `1/(1−p)`. The same seed gives the same mask, so the
    /// backward pass applies this very function to the gradient.
    fn dropout(&self, x: &Self::Tensor, p: f32, seed: u64) -> Result<Self::Tensor>;

    /// LM head fused with cross-entropy: `logits = h·Wᵀ` computed a chunk of rows at a time so the
    /// whole `[tokens, vocab]` matrix never exists. Writes row t's loss `lse_t − logit_t[label_t]`
    /// into `row_loss` (`[tokens, 1]`; 0 where the label is [`IGNORE_LABEL`]) and returns
    /// `dh = (softmax − onehot)·W · scale`, where `scale` is a `[1, 1]` tensor read by the device
    /// work itself (so recorded work can be replayed with another scale); ignored rows get 0.
    fn lm_head_cross_entropy(
        &self,
        h: &Self::Tensor,
        w: &Self::Tensor,
        labels: &Self::Ints,
        scale: &Self::Tensor,
        row_loss: &mut Self::Tensor,
    ) -> Result<Self::Tensor>;

    /// Decoupled-weight-decay Adam (as `torch.optim.AdamW`) on every slot: `g ← g·grad_scale`,
    /// `p ← p·(1 − lr·wd)`, then `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
    /// `p ← p − lr·m̂/(sqrt(v̂) + eps)` with `m̂ = m/(1−β1^t)`, `v̂ = v/(1−β2^t)`. All slots in
    /// one call, so a device backend can update them in one launch.
    fn adamw(&self, slots: &mut [AdamWSlot<'_, Self::Tensor>], h: AdamWStep) -> Result<()>;

    /// Records the device work `work` queues, without running it, for [`Backend::replay`]
    /// (see [`Recorded`] for when it does not). Recorded work must queue device operations only
    /// (nothing read back, nothing uploaded from the host), and every buffer it allocates must
    /// be freed within it; a replay runs the same operations on the same buffers, with
    /// whatever values they hold then.
    fn record(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<Recorded<Self::Recording>> {
        let _ = work;
        Ok(Recorded::Never)
    }
    /// Runs recorded work again (queued like any other operation).
    fn replay(&self, recording: &Self::Recording) -> Result<()>;
    /// Whether [`Backend::record`] may keep a recording (false where it always answers
    /// `Never`).
    fn records_work(&self) -> bool {
        false
    }
}
