//! Activation offload: layer inputs saved for the backward pass wait in pinned host memory
//! instead of device memory. Each is copied out on a stream of its own while the next layer
//! computes (its device memory freed in stream order after the copy) and copied back ahead of
//! the backward that reads it, overlapping the layer after it.

use super::device::{driver_error, DeviceBuffer, Gpu};
use super::tensor::{CudaTensor, Offloaded, Storage};
use crate::error::{Error, Result};
use cudarc::driver::{CudaEvent, CudaStream, PinnedHostSlice};
use std::sync::{Arc, Mutex};

/// The copy stream and the buffers it moves.
pub(super) struct Offload {
    stream: Arc<CudaStream>,
    /// Pinned buffers no tensor holds, kept for the next step: allocating pinned memory is slow.
    spare: Mutex<Vec<PinnedHostSlice<f32>>>,
    /// Device buffers being copied out, freed (in stream order) at the next stash or fetch.
    leaving: Mutex<Vec<(CudaEvent, DeviceBuffer<f32>)>>,
}

impl Offload {
    pub(super) fn new(gpu: &Gpu) -> Result<Self> {
        Ok(Offload {
            stream: gpu
                .ctx
                .new_stream()
                .map_err(driver_error("creating the offload stream"))?,
            spare: Mutex::new(Vec::new()),
            leaving: Mutex::new(Vec::new()),
        })
    }

    /// Frees the device buffers of earlier copies out, in stream order: the compute stream
    /// waits for each copy's end, then the buffer goes back to the pool, usable by the work
    /// queued after. Called one layer after the copy was queued, when it has long finished, so
    /// the compute stream does not stall and the host never waits.
    fn release_copied(&self, gpu: &Gpu) -> Result<()> {
        let leaving = std::mem::take(&mut *self.leaving.lock().unwrap_or_else(|e| e.into_inner()));
        for (done, buf) in leaving {
            gpu.stream()
                .wait(&done)
                .map_err(driver_error("ordering an offload"))?;
            drop(buf);
        }
        Ok(())
    }

    /// A pinned buffer of exactly `len` values, reused when one is spare. When none is, the
    /// spare buffers of other lengths are freed first: the activations changed size (another
    /// sequence length), and keeping every size seen would let host memory grow without bound.
    fn pinned(&self, gpu: &Gpu, len: usize) -> Result<PinnedHostSlice<f32>> {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = spare.iter().position(|p| p.len() == len) {
            return Ok(spare.swap_remove(i));
        }
        spare.clear();
        // SAFETY: the buffer is written by the copy out before anything reads it.
        unsafe { gpu.ctx.alloc_pinned_with_flags::<f32>(len, 0) }.map_err(|e| Error::OutOfMemory {
            requested: len * 4,
            what: "pinned host memory for an offloaded activation".into(),
            detail: e.to_string(),
        })
    }

    /// Starts copying `t` (f32) to pinned host memory behind the work queued so far.
    pub(super) fn stash(&self, gpu: &Gpu, t: CudaTensor) -> Result<CudaTensor> {
        let CudaTensor {
            rows,
            cols,
            storage,
        } = t;
        let Storage::F32(buf) = storage else {
            return Ok(CudaTensor {
                rows,
                cols,
                storage,
            });
        };
        self.release_copied(gpu)?;
        let mut host = self.pinned(gpu, buf.elements())?;
        let driver = driver_error("copying an activation to host memory");
        self.stream
            .join(gpu.stream())
            .map_err(driver_error("ordering an offload"))?;
        self.stream
            .memcpy_dtoh(&*buf.slice, &mut host)
            .map_err(driver)?;
        let done = self
            .stream
            .record_event(None)
            .map_err(driver_error("ordering an offload"))?;
        self.leaving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((done, buf));
        Ok(CudaTensor {
            rows,
            cols,
            storage: Storage::Offloaded(Box::new(Offloaded {
                host: Some(host),
                arriving: None,
                compute: gpu.stream().clone(),
            })),
        })
    }

    /// Starts copying a stashed tensor back to a fresh device buffer; the copy overlaps the
    /// work queued after it until [`Offload::settle`].
    pub(super) fn fetch(&self, gpu: &Gpu, t: &mut CudaTensor) -> Result<()> {
        let n = t.elements();
        let Storage::Offloaded(o) = &mut t.storage else {
            return Ok(());
        };
        let (Some(host), None) = (&o.host, &o.arriving) else {
            return Ok(());
        };
        self.release_copied(gpu)?;
        let mut buf = gpu.alloc::<f32>(n, "an offloaded activation coming back")?;
        // After the allocation, which is ordered on the compute stream.
        self.stream
            .join(gpu.stream())
            .map_err(driver_error("ordering a fetch"))?;
        self.stream
            .memcpy_htod(host, &mut *buf.slice)
            .map_err(driver_error("copying an activation back"))?;
        let ready = self
            .stream
            .record_event(None)
            .map_err(driver_error("ordering a fetch"))?;
        o.arriving = Some((buf, ready));
        Ok(())
    }

    /// Makes the compute stream wait for a fetched tensor and returns it as a device tensor
    /// (fetching it first if that was not started).
    pub(super) fn settle(&self, gpu: &Gpu, mut t: CudaTensor) -> Result<CudaTensor> {
        self.fetch(gpu, &mut t)?;
        let CudaTensor {
            rows,
            cols,
            storage,
        } = t;
        let Storage::Offloaded(mut o) = storage else {
            return Ok(CudaTensor {
                rows,
                cols,
                storage,
            });
        };
        let (buf, ready) = o.arriving.take().expect("fetched above");
        gpu.stream()
            .wait(&ready)
            .map_err(driver_error("waiting for a fetch"))?;
        if let Some(host) = o.host.take() {
            // Its own event orders a reuse after the copy that reads it.
            self.spare
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(host);
        }
        Ok(CudaTensor {
            rows,
            cols,
            storage: Storage::F32(buf),
        })
    }
}
