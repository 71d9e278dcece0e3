//! NF4 projection matrices on the GPU (kernels/nf4.cu): quantized on the device at upload, kept
//! packed (codes and double-quantized absmax, ~0.52 bytes a value), and dequantized to bf16 into
//! one scratch buffer right before each product that reads them, which then runs as the bf16
//! product of a bf16 weight. The scratch is sized for the largest NF4 matrix uploaded (2 bytes a
//! value of that one matrix) and reused by every product; it stays locked from the dequantization
//! to the queuing of the product, so concurrent products cannot overwrite each other's values.

use super::launch::{Arg, Shape};
use super::tensor::{DeviceAbsmax, Nf4Storage, Storage};
use super::{count, CudaBackend, CudaTensor};
use crate::error::Result;
use crate::quant::nf4::{check_quantizable, dynamic_map, BLOCK, NESTED_BLOCK};
use crate::quant::{Absmax, DoubleQuant, Nf4Tensor};
use std::sync::MutexGuard;

/// The locked NF4 scratch.
pub(super) type ScratchGuard<'a> = MutexGuard<'a, Option<super::DeviceBuffer<u16>>>;

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
            blocks.div_ceil(BLOCKS_PER_CUDA_BLOCK).min(65535),
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
        self.nf4_tensor(rows, cols, Nf4Storage { packed, absmax })
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
        self.nf4_tensor(q.rows(), q.cols(), Nf4Storage { packed, absmax })
    }

    /// The tensor of `storage`, with the scratch grown to hold its values in bf16 (so that the
    /// memory account knows at load time what the products will need).
    fn nf4_tensor(&self, rows: usize, cols: usize, storage: Nf4Storage) -> Result<CudaTensor> {
        drop(self.nf4_scratch(rows * cols)?);
        Ok(CudaTensor {
            rows,
            cols,
            storage: Storage::Nf4(Box::new(storage)),
        })
    }

    /// The scratch, locked, holding at least `elements` bf16 values, and its address.
    fn nf4_scratch(&self, elements: usize) -> Result<(ScratchGuard<'_>, u64)> {
        let mut scratch = self.nf4_scratch.lock().expect("no panic holds it");
        let ptr = match scratch.as_ref() {
            Some(b) if b.elements() >= elements => self.buffer_ptr(b),
            _ => {
                // The smaller buffer leaves the memory account before the larger one enters.
                *scratch = None;
                let b = self
                    .gpu
                    .alloc::<u16>(elements, "the NF4 dequantization scratch")?;
                let ptr = self.buffer_ptr(&b);
                *scratch = Some(b);
                ptr
            }
        };
        Ok((scratch, ptr))
    }

    /// Queues the dequantization of the first `elements` values of `s` to bf16 into the scratch;
    /// returns the scratch's address and its lock, to hold until the product reading it is queued.
    pub(super) fn dequantize_nf4(
        &self,
        s: &Nf4Storage,
        elements: usize,
    ) -> Result<(u64, ScratchGuard<'_>)> {
        let (scratch, out) = self.nf4_scratch(elements)?;
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
            Arg::Ptr(self.buffer_ptr(&s.packed)),
            Arg::Ptr(absmax),
            Arg::Ptr(codes),
            Arg::Ptr(nested),
            Arg::Ptr(map),
            Arg::Ptr(offset),
            Arg::Ptr(out),
            count(elements),
        ];
        let shape = Shape::elementwise(elements.div_ceil(2));
        self.run("nf4", "nf4_dequantize_bf16", shape, &args)?;
        Ok((out, scratch))
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
        Ok(Nf4Storage {
            packed: self.copy_buffer(&s.packed, what)?,
            absmax,
        })
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
        let packed = self.gpu.download(&s.packed.slice, what)?;
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
