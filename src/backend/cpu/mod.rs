//! The f32 CPU backend: the reference every other backend is checked against, and the fallback
//! where no GPU exists. Matrix products use the `gemm` crate; row-wise ops run on a private rayon
//! pool so an embedding application's own pool is left alone.

mod attention;
mod decode;
pub mod gemm;
mod loss;
mod nf4;
mod pointwise;
pub mod pool;

use super::{check_norm_backward, AdamWSlot, AdamWStep, AttentionShape, Backend};
use crate::error::{Error, Result};
use crate::model::config::Activation;
use crate::quant::Nf4Tensor;
use gemm::{parallelism, MatRef};
use pool::{Buffer, BufferPool};
use rayon::prelude::*;
use std::sync::Arc;

/// A row-major f32 matrix in host memory, or a frozen base matrix kept in NF4.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    /// The values; empty when the matrix is in `nf4`.
    pub data: Buffer,
    /// An NF4 base matrix (flattened row-major like `data`). Only matmul, which dequantizes a
    /// block of rows at a time, and download read it; every other op refuses it.
    pub nf4: Option<Arc<Nf4Tensor>>,
}

impl CpuTensor {
    /// A matrix of f32 values.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        Self::from_buffer(rows, cols, Buffer::unpooled(data))
    }

    /// A matrix of f32 values held by a (pooled) buffer.
    pub fn from_buffer(rows: usize, cols: usize, data: Buffer) -> Self {
        CpuTensor {
            rows,
            cols,
            data,
            nf4: None,
        }
    }

    /// A `[rows, cols]` matrix from `buffers` whose values the caller overwrites (a recycled
    /// buffer keeps its old values).
    pub fn uninit(buffers: &BufferPool, rows: usize, cols: usize) -> Self {
        Self::from_buffer(rows, cols, buffers.uninit(rows * cols))
    }

    /// A `[rows, cols]` matrix of zeros from `buffers`.
    pub fn zeros(buffers: &BufferPool, rows: usize, cols: usize) -> Self {
        Self::from_buffer(rows, cols, buffers.zeroed(rows * cols))
    }

    fn view(&self) -> MatRef<'_> {
        MatRef::new(&self.data, self.rows, self.cols)
    }

    /// `op(self)` as a view (`self` holds f32 values).
    fn op_view(&self, trans: bool) -> MatRef<'_> {
        if trans {
            self.view().t()
        } else {
            self.view()
        }
    }
}

/// The CPU backend, its thread pool and its recycled buffers.
pub struct CpuBackend {
    workers: rayon::ThreadPool,
    threads: usize,
    buffers: BufferPool,
}

impl CpuBackend {
    /// A backend with `threads` worker threads (0: one per available core).
    pub fn new(threads: usize) -> Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let workers = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("finetune-cpu-{i}"))
            .build()
            .map_err(|e| {
                Error::InvalidArgument(format!("cannot start {threads} CPU threads: {e}"))
            })?;
        Ok(CpuBackend {
            workers,
            threads,
            buffers: BufferPool::default(),
        })
    }

    /// Runs `f` on this backend's pool, so nested parallel work uses its threads.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.workers.install(f)
    }

    /// [`CpuTensor::uninit`] from this backend's buffers.
    fn uninit(&self, rows: usize, cols: usize) -> CpuTensor {
        CpuTensor::uninit(&self.buffers, rows, cols)
    }

    fn check_attention(
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        segments: &[i32],
        shape: AttentionShape,
    ) -> Result<()> {
        Self::dense(&[q, k, v], "attention")?;
        let dims = |t: &CpuTensor| (t.rows, t.cols);
        super::check_attention_shapes(dims(q), dims(k), dims(v), segments.len(), shape, None)
    }

    /// The RMSNorm backward of rows `[start, start + rows of dy)` of `x` into the same rows of
    /// `dx` (`x`'s shape), added to them when `accumulate`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward_into(
        &self,
        dy: &CpuTensor,
        x: &CpuTensor,
        w: &CpuTensor,
        r: &CpuTensor,
        unit_offset: bool,
        start: usize,
        dx: &mut CpuTensor,
        accumulate: bool,
    ) -> Result<()> {
        Self::dense(&[dy, x, w, r, dx], "rmsnorm backward")?;
        let (n, rows) = (x.cols, dy.rows);
        check_norm_backward(
            (dy.rows, dy.cols),
            (x.rows, x.cols),
            w.data.len(),
            r.data.len(),
            start,
            (dx.rows, dx.cols),
        )?;
        let span = start * n..(start + rows) * n;
        self.install(|| {
            pointwise::rmsnorm_backward(
                &dy.data,
                &x.data[span.clone()],
                n,
                &w.data,
                &r.data[start..start + rows],
                unit_offset,
                accumulate,
                &mut dx.data[span.clone()],
            )
        });
        Ok(())
    }

    fn same_shape(a: &CpuTensor, b: &CpuTensor, what: &str) -> Result<()> {
        super::check_same_shape((a.rows, a.cols), (b.rows, b.cols), what)
    }

    /// Fails when one of `ts` is an NF4 matrix, which `op` cannot read.
    fn dense(ts: &[&CpuTensor], op: &str) -> Result<()> {
        if ts.iter().any(|t| t.nf4.is_some()) {
            return Err(Error::InvalidArgument(format!(
                "{op}: an NF4 weight was passed; NF4 matrices are only multiplied and downloaded"
            )));
        }
        Ok(())
    }
}

/// The value of a `[1, 1]` tensor.
fn scalar(t: &CpuTensor, what: &str) -> Result<f32> {
    match t.data[..] {
        [x] => Ok(x),
        _ => Err(Error::InvalidArgument(format!(
            "{what}: a [1, 1] tensor was expected, got [{}, {}]",
            t.rows, t.cols
        ))),
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Ints = Vec<i32>;
    /// The CPU runs its work as it is queued: nothing to record.
    type Recording = std::convert::Infallible;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CpuTensor> {
        if data.len() != rows * cols {
            return Err(Error::InvalidArgument(format!(
                "{} values do not fill a [{rows}, {cols}] matrix",
                data.len()
            )));
        }
        Ok(CpuTensor::from_buffer(
            rows,
            cols,
            self.buffers.copy_of(data),
        ))
    }

    fn upload_frozen_nf4(&self, data: &[f32], rows: usize, cols: usize) -> Result<CpuTensor> {
        self.upload_nf4(self.install(|| Nf4Tensor::quantize(data, rows, cols))?)
    }

    fn upload_nf4(&self, q: Nf4Tensor) -> Result<CpuTensor> {
        Ok(CpuTensor {
            rows: q.rows(),
            cols: q.cols(),
            data: Buffer::default(),
            nf4: Some(Arc::new(q)),
        })
    }

    fn upload_ints(&self, data: &[i32]) -> Result<Vec<i32>> {
        Ok(data.to_vec())
    }

    fn write(&self, t: &mut CpuTensor, data: &[f32]) -> Result<()> {
        Self::dense(&[t], "write")?;
        super::check_len(data.len(), t.rows, t.cols)?;
        t.data.copy_from_slice(data);
        Ok(())
    }

    fn write_ints(&self, ints: &mut Vec<i32>, data: &[i32]) -> Result<()> {
        super::check_len(data.len(), ints.len(), 1)?;
        ints.copy_from_slice(data);
        Ok(())
    }

    fn download(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(match &t.nf4 {
            Some(q) => self.install(|| q.dequantize()),
            None => t.data.to_vec(),
        })
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor::zeros(&self.buffers, rows, cols))
    }

    fn output(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(self.uninit(rows, cols))
    }

    fn duplicate(&self, t: &CpuTensor) -> Result<CpuTensor> {
        Ok(t.clone())
    }

    fn shape(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn reshape(&self, t: CpuTensor, rows: usize, cols: usize) -> CpuTensor {
        assert_eq!(
            t.rows * t.cols,
            rows * cols,
            "reshape changes the element count"
        );
        CpuTensor { rows, cols, ..t }
    }

    fn matmul(
        &self,
        a: &CpuTensor,
        trans_a: bool,
        b: &CpuTensor,
        trans_b: bool,
        alpha: f32,
        c: &mut CpuTensor,
        accumulate: bool,
    ) -> Result<()> {
        Self::dense(&[c], "matmul output")?;
        let op_shape = |t: &CpuTensor, trans: bool| {
            if trans {
                (t.cols, t.rows)
            } else {
                (t.rows, t.cols)
            }
        };
        let ((m, k), (kb, n)) = (op_shape(a, trans_a), op_shape(b, trans_b));
        if k != kb || (c.rows, c.cols) != (m, n) {
            return Err(Error::InvalidArgument(format!(
                "matmul shapes: [{m}, {k}]·[{kb}, {n}] into [{}, {}]",
                c.rows, c.cols
            )));
        }
        let (threads, scratch) = (self.threads, &self.buffers);
        match (&a.nf4, &b.nf4) {
            (None, None) => {
                let (av, bv) = (a.op_view(trans_a), b.op_view(trans_b));
                let par = parallelism(m, n, k, threads);
                let cols = c.cols;
                self.install(|| gemm::gemm(av, bv, alpha, &mut c.data, cols, accumulate, par));
                Ok(())
            }
            (Some(w), None) => {
                let w = nf4::Nf4Operand::new(w, a, nf4::Side::A, trans_a);
                let other = b.op_view(trans_b);
                self.install(|| nf4::matmul(w, other, alpha, c, accumulate, threads, scratch))
            }
            (None, Some(w)) => {
                let w = nf4::Nf4Operand::new(w, b, nf4::Side::B, trans_b);
                let other = a.op_view(trans_a);
                self.install(|| nf4::matmul(w, other, alpha, c, accumulate, threads, scratch))
            }
            (Some(_), Some(_)) => Err(Error::InvalidArgument(
                "matmul of two NF4 matrices: at most one operand may be NF4".into(),
            )),
        }
    }

    fn add_row_vector(&self, x: &mut CpuTensor, bias: &CpuTensor) -> Result<()> {
        Self::dense(&[x, bias], "add_row_vector")?;
        if bias.data.len() != x.cols {
            return Err(Error::InvalidArgument(format!(
                "bias of {} values for rows of {}",
                bias.data.len(),
                x.cols
            )));
        }
        let cols = x.cols;
        self.install(|| {
            x.data.par_chunks_mut(cols).for_each(|row| {
                row.iter_mut().zip(&bias.data).for_each(|(a, b)| *a += b);
            })
        });
        Ok(())
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        Self::same_shape(x, y, "add")?;
        Self::dense(&[x, y], "add")?;
        self.install(|| pointwise::zip_apply(&mut x.data, &y.data, |a, b| *a += b));
        Ok(())
    }

    fn fill_zero(&self, x: &mut CpuTensor) -> Result<()> {
        Self::dense(&[x], "fill_zero")?;
        x.data.fill(0.0);
        Ok(())
    }

    fn sum_squares(&self, xs: &[&CpuTensor]) -> Result<f64> {
        Self::dense(xs, "sum_squares")?;
        Ok(xs
            .iter()
            .flat_map(|x| &x.data)
            .map(|&a| (a as f64) * (a as f64))
            .sum())
    }

    fn has_non_finite(&self, x: &CpuTensor) -> Result<bool> {
        Self::dense(&[x], "has_non_finite")?;
        Ok(x.data.iter().any(|a| !a.is_finite()))
    }

    fn embedding(&self, table: &CpuTensor, ids: &Vec<i32>, scale: f32) -> Result<CpuTensor> {
        Self::dense(&[table], "embedding")?;
        let d = table.cols;
        let mut out = self.uninit(ids.len(), d);
        for (t, (row, &id)) in out.data.chunks_mut(d).zip(ids).enumerate() {
            let id = usize::try_from(id)
                .ok()
                .filter(|&i| i < table.rows)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "token id {id} at position {t} is outside the vocabulary of {} tokens",
                        table.rows
                    ))
                })?;
            row.iter_mut()
                .zip(&table.data[id * d..(id + 1) * d])
                .for_each(|(o, &w)| *o = w * scale);
        }
        Ok(out)
    }

    fn rmsnorm(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        eps: f32,
        unit_offset: bool,
    ) -> Result<(CpuTensor, CpuTensor)> {
        Self::dense(&[x, w], "rmsnorm")?;
        if w.data.len() != x.cols {
            return Err(Error::InvalidArgument(format!(
                "norm weight of {} values for rows of {}",
                w.data.len(),
                x.cols
            )));
        }
        let (mut y, mut r) = (self.uninit(x.rows, x.cols), self.uninit(x.rows, 1));
        self.install(|| pointwise::rmsnorm(x, &w.data, eps, unit_offset, &mut y.data, &mut r.data));
        Ok((y, r))
    }

    fn rmsnorm_backward(
        &self,
        dy: &CpuTensor,
        x: &CpuTensor,
        w: &CpuTensor,
        r: &CpuTensor,
        unit_offset: bool,
        acc: Option<CpuTensor>,
    ) -> Result<CpuTensor> {
        Self::same_shape(dy, x, "rmsnorm backward")?;
        let accumulate = acc.is_some();
        let mut dx = acc.unwrap_or_else(|| self.uninit(x.rows, x.cols));
        self.rmsnorm_backward_into(dy, x, w, r, unit_offset, 0, &mut dx, accumulate)?;
        Ok(dx)
    }

    fn rmsnorm_backward_rows(
        &self,
        dy: &CpuTensor,
        x: &CpuTensor,
        w: &CpuTensor,
        r: &CpuTensor,
        unit_offset: bool,
        start: usize,
        acc: &mut CpuTensor,
    ) -> Result<()> {
        self.rmsnorm_backward_into(dy, x, w, r, unit_offset, start, acc, true)
    }

    fn rope(
        &self,
        x: &mut CpuTensor,
        positions: &Vec<i32>,
        inv_freq: &[f32],
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        Self::dense(&[x], "rope")?;
        if positions.len() != x.rows || x.cols % head_dim != 0 || inv_freq.len() * 2 != head_dim {
            return Err(Error::InvalidArgument(format!(
                "rope: {} positions, rows of {} values, head_dim {head_dim}, {} frequencies",
                positions.len(),
                x.cols,
                inv_freq.len()
            )));
        }
        self.install(|| pointwise::rope(x, positions, inv_freq, head_dim, inverse));
        Ok(())
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        segments: &Vec<i32>,
        shape: AttentionShape,
    ) -> Result<(CpuTensor, CpuTensor)> {
        Self::check_attention(q, k, v, segments, shape)?;
        Ok(self.install(|| attention::forward(q, k, v, segments, shape, &self.buffers)))
    }

    fn attention_backward(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        out: CpuTensor,
        lse: &CpuTensor,
        d_out: CpuTensor,
        segments: &Vec<i32>,
        shape: AttentionShape,
    ) -> Result<(CpuTensor, CpuTensor, CpuTensor)> {
        Self::check_attention(q, k, v, segments, shape)?;
        Self::same_shape(&out, &d_out, "attention backward")?;
        Self::dense(&[&out, lse, &d_out], "attention backward")?;
        let inputs = attention::BackwardInputs {
            q,
            k,
            v,
            out: &out,
            lse,
            d_out: &d_out,
        };
        Ok(self.install(|| attention::backward(inputs, segments, shape, &self.buffers)))
    }

    fn attention_decode(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        heads: (usize, usize, usize),
    ) -> Result<(CpuTensor, CpuTensor)> {
        Self::dense(&[q, k, v], "attention_decode")?;
        decode::check_shapes(q, k, v, heads)?;
        Ok(self.install(|| decode::attention(q, k, v, heads)))
    }

    fn copy_rows(&self, t: &CpuTensor, start: usize, rows: usize) -> Result<CpuTensor> {
        Self::dense(&[t], "copy_rows")?;
        super::check_rows(t.rows, start, rows, (t.cols, t.cols), "copy_rows")?;
        let values = &t.data[start * t.cols..(start + rows) * t.cols];
        Ok(CpuTensor::from_buffer(
            rows,
            t.cols,
            self.buffers.copy_of(values),
        ))
    }

    fn add_rows(&self, dst: &mut CpuTensor, start: usize, src: &CpuTensor) -> Result<()> {
        Self::dense(&[dst, src], "add_rows")?;
        super::check_rows(dst.rows, start, src.rows, (dst.cols, src.cols), "add_rows")?;
        let part = &mut dst.data[start * src.cols..(start + src.rows) * src.cols];
        self.install(|| pointwise::zip_apply(part, &src.data, |a, b| *a += b));
        Ok(())
    }

    fn append_rows(&self, dst: &mut CpuTensor, src: &CpuTensor) -> Result<()> {
        Self::dense(&[dst, src], "append_rows")?;
        if dst.cols != src.cols {
            return Err(Error::InvalidArgument(format!(
                "append_rows: rows of {} values onto rows of {}",
                src.cols, dst.cols
            )));
        }
        dst.data.extend_from_slice(&src.data);
        dst.rows += src.rows;
        Ok(())
    }

    fn gated_activation(&self, g: &CpuTensor, u: &CpuTensor, act: Activation) -> Result<CpuTensor> {
        Self::same_shape(g, u, "gated activation")?;
        Self::dense(&[g, u], "gated activation")?;
        let mut h = u.clone();
        self.install(|| pointwise::gated_activation(&mut h.data, &g.data, act));
        Ok(h)
    }

    fn gated_activation_backward(
        &self,
        dh: &CpuTensor,
        g: &CpuTensor,
        u: &CpuTensor,
        act: Activation,
    ) -> Result<(CpuTensor, CpuTensor)> {
        Self::same_shape(g, u, "gated activation backward")?;
        Self::same_shape(dh, g, "gated activation backward")?;
        Self::dense(&[dh, g, u], "gated activation backward")?;
        let (mut dg, mut du) = (self.uninit(dh.rows, dh.cols), self.uninit(dh.rows, dh.cols));
        let inputs = pointwise::GatedInputs {
            dh: &dh.data,
            g: &g.data,
            u: &u.data,
        };
        self.install(|| {
            pointwise::gated_activation_backward(inputs, act, &mut dg.data, &mut du.data)
        });
        Ok((dg, du))
    }

    fn dropout(&self, x: &CpuTensor, p: f32, seed: u64) -> Result<CpuTensor> {
        Self::dense(&[x], "dropout")?;
        let mut y = x.clone();
        if p > 0.0 {
            let keep = 1.0 / (1.0 - p);
            self.install(|| {
                y.data.par_iter_mut().enumerate().for_each(|(i, a)| {
                    *a *= if crate::rng::unit_f32(seed, i as u64) >= p {
                        keep
                    } else {
                        0.0
                    };
                })
            });
        }
        Ok(y)
    }

    fn lm_head_cross_entropy(
        &self,
        h: &CpuTensor,
        w: &CpuTensor,
        labels: &Vec<i32>,
        scale: &CpuTensor,
        row_loss: &mut CpuTensor,
    ) -> Result<CpuTensor> {
        Self::dense(&[h, w, scale, row_loss], "lm head")?;
        if h.cols != w.cols || labels.len() != h.rows || row_loss.data.len() != h.rows {
            return Err(Error::InvalidArgument(format!(
                "lm head: hidden [{}, {}], weight [{}, {}], {} labels, {} row losses",
                h.rows,
                h.cols,
                w.rows,
                w.cols,
                labels.len(),
                row_loss.data.len()
            )));
        }
        self.install(|| {
            let scale = scalar(scale, "lm head scale")?;
            loss::lm_head_cross_entropy(
                h,
                w,
                labels,
                scale,
                &mut row_loss.data,
                self.threads,
                &self.buffers,
            )
        })
    }

    fn adamw(&self, slots: &mut [AdamWSlot<'_, CpuTensor>], h: AdamWStep) -> Result<()> {
        for s in slots {
            Self::same_shape(s.param, s.grad, "adamw")?;
            Self::same_shape(s.param, s.m, "adamw")?;
            Self::same_shape(s.param, s.v, "adamw")?;
            Self::dense(&[s.param, s.grad, s.m, s.v], "adamw")?;
            pointwise::adamw(
                &mut s.param.data,
                &s.grad.data,
                &mut s.m.data,
                &mut s.v.data,
                h,
            );
        }
        Ok(())
    }

    fn replay(&self, recording: &std::convert::Infallible) -> Result<()> {
        match *recording {}
    }
}
