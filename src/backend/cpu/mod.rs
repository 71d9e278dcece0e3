//! The f32 CPU backend: the reference every other backend is checked against, and the fallback
//! where no GPU exists. Matrix products use the `gemm` crate; row-wise ops run on a private rayon
//! pool so an embedding application's own pool is left alone.

mod attention;
mod decode;
pub mod gemm;
mod loss;
mod pointwise;

use super::{AdamWStep, AttentionShape, Backend};
use crate::error::{Error, Result};
use crate::model::config::Activation;
use gemm::{parallelism, MatRef};
use rayon::prelude::*;

/// A row-major f32 matrix in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuTensor {
    fn view(&self) -> MatRef<'_> {
        MatRef::new(&self.data, self.rows, self.cols)
    }
}

/// The CPU backend and its thread pool.
pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
}

impl CpuBackend {
    /// A backend with `threads` worker threads (0: one per available core).
    pub fn new(threads: usize) -> Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("finetune-cpu-{i}"))
            .build()
            .map_err(|e| {
                Error::InvalidArgument(format!("cannot start {threads} CPU threads: {e}"))
            })?;
        Ok(CpuBackend { pool, threads })
    }

    /// Runs `f` on this backend's pool, so nested parallel work uses its threads.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    fn check_attention(
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        segments: &[i32],
        shape: AttentionShape,
    ) -> Result<()> {
        let dims = |t: &CpuTensor| (t.rows, t.cols);
        super::check_attention_shapes(dims(q), dims(k), dims(v), segments.len(), shape, None)
    }

    fn same_shape(a: &CpuTensor, b: &CpuTensor, what: &str) -> Result<()> {
        super::check_same_shape((a.rows, a.cols), (b.rows, b.cols), what)
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Ints = Vec<i32>;

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
        Ok(CpuTensor {
            rows,
            cols,
            data: data.to_vec(),
        })
    }

    fn upload_ints(&self, data: &[i32]) -> Result<Vec<i32>> {
        Ok(data.to_vec())
    }

    fn download(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        })
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
        let av = if trans_a { a.view().t() } else { a.view() };
        let bv = if trans_b { b.view().t() } else { b.view() };
        if av.cols != bv.rows || (c.rows, c.cols) != (av.rows, bv.cols) {
            return Err(Error::InvalidArgument(format!(
                "matmul shapes: [{}, {}]·[{}, {}] into [{}, {}]",
                av.rows, av.cols, bv.rows, bv.cols, c.rows, c.cols
            )));
        }
        let par = parallelism(av.rows, bv.cols, av.cols, self.threads);
        let cols = c.cols;
        self.install(|| gemm::gemm(av, bv, alpha, &mut c.data, cols, accumulate, par));
        Ok(())
    }

    fn add_row_vector(&self, x: &mut CpuTensor, bias: &CpuTensor) -> Result<()> {
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
        self.install(|| pointwise::zip_apply(&mut x.data, &y.data, |a, b| *a += b));
        Ok(())
    }

    fn scale(&self, x: &mut CpuTensor, s: f32) -> Result<()> {
        x.data.iter_mut().for_each(|a| *a *= s);
        Ok(())
    }

    fn sum_squares(&self, xs: &[&CpuTensor]) -> Result<f64> {
        Ok(xs
            .iter()
            .flat_map(|x| &x.data)
            .map(|&a| (a as f64) * (a as f64))
            .sum())
    }

    fn has_non_finite(&self, x: &CpuTensor) -> Result<bool> {
        Ok(x.data.iter().any(|a| !a.is_finite()))
    }

    fn embedding(&self, table: &CpuTensor, ids: &Vec<i32>, scale: f32) -> Result<CpuTensor> {
        let d = table.cols;
        let mut out = vec![0.0f32; ids.len() * d];
        for (t, (row, &id)) in out.chunks_mut(d).zip(ids).enumerate() {
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
        Ok(CpuTensor {
            rows: ids.len(),
            cols: d,
            data: out,
        })
    }

    fn rmsnorm(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        eps: f32,
        unit_offset: bool,
    ) -> Result<(CpuTensor, CpuTensor)> {
        if w.data.len() != x.cols {
            return Err(Error::InvalidArgument(format!(
                "norm weight of {} values for rows of {}",
                w.data.len(),
                x.cols
            )));
        }
        let (y, r) = self.install(|| pointwise::rmsnorm(x, &w.data, eps, unit_offset));
        Ok((y, r))
    }

    fn rmsnorm_backward(
        &self,
        dy: &CpuTensor,
        x: &CpuTensor,
        w: &CpuTensor,
        r: &CpuTensor,
        unit_offset: bool,
    ) -> Result<CpuTensor> {
        Self::same_shape(dy, x, "rmsnorm backward")?;
        Ok(self.install(|| pointwise::rmsnorm_backward(dy, x, &w.data, &r.data, unit_offset)))
    }

    fn rope(
        &self,
        x: &mut CpuTensor,
        positions: &Vec<i32>,
        inv_freq: &[f32],
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
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
        Ok(self.install(|| attention::forward(q, k, v, segments, shape)))
    }

    fn attention_backward(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        out: &CpuTensor,
        lse: &CpuTensor,
        d_out: &CpuTensor,
        segments: &Vec<i32>,
        shape: AttentionShape,
    ) -> Result<(CpuTensor, CpuTensor, CpuTensor)> {
        Self::check_attention(q, k, v, segments, shape)?;
        Self::same_shape(out, d_out, "attention backward")?;
        Ok(self.install(|| attention::backward(q, k, v, out, lse, d_out, segments, shape)))
    }

    fn attention_decode(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        heads: (usize, usize, usize),
    ) -> Result<(CpuTensor, CpuTensor)> {
        decode::check_shapes(q, k, v, heads)?;
        Ok(self.install(|| decode::attention(q, k, v, heads)))
    }

    fn append_rows(&self, dst: &mut CpuTensor, src: &CpuTensor) -> Result<()> {
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
        let (dg, du) =
            self.install(|| pointwise::gated_activation_backward(&dh.data, &g.data, &u.data, act));
        let shaped = |data| CpuTensor {
            rows: dh.rows,
            cols: dh.cols,
            data,
        };
        Ok((shaped(dg), shaped(du)))
    }

    fn dropout(&self, x: &CpuTensor, p: f32, seed: u64) -> Result<CpuTensor> {
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
        normalizer: f32,
    ) -> Result<(f64, CpuTensor)> {
        if h.cols != w.cols || labels.len() != h.rows {
            return Err(Error::InvalidArgument(format!(
                "lm head: hidden [{}, {}], weight [{}, {}], {} labels",
                h.rows,
                h.cols,
                w.rows,
                w.cols,
                labels.len()
            )));
        }
        self.install(|| loss::lm_head_cross_entropy(h, w, labels, normalizer, self.threads))
    }

    fn adamw(
        &self,
        p: &mut CpuTensor,
        g: &CpuTensor,
        m: &mut CpuTensor,
        v: &mut CpuTensor,
        h: AdamWStep,
    ) -> Result<()> {
        Self::same_shape(p, g, "adamw")?;
        Self::same_shape(p, m, "adamw")?;
        Self::same_shape(p, v, "adamw")?;
        pointwise::adamw(&mut p.data, &g.data, &mut m.data, &mut v.data, h);
        Ok(())
    }
}
