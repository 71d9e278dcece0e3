//! Copies between host and device memory beside the compute.
//!
//! Activation offload: layer inputs saved for the backward pass wait in pinned host memory
//! instead of device memory. Each is copied out on a stream of its own while the next layer
//! computes (its device memory freed in stream order after the copy) and copied back ahead of
//! the backward that reads it, overlapping the layer after it.
//!
//! Host tables (host_table.rs), whole or a range of rows, are copied to fresh device buffers on
//! streams of their own, ahead of the products that read them ([`Offload::fetch_table`]).
//!
//! A pass being recorded (graph.rs) copies on a stream of its own with plain driver copies
//! (cudarc's pinned buffers record events of their own, which a recording must not hold), from
//! pinned buffers an unrecorded pass of the same shape left spare: the recording takes them
//! ([`Offload::end_recording`]), as its replays copy to and from the same host addresses.

use super::device::{driver_error, DeviceBuffer, Gpu};
use super::host_table::HostTable;
use super::lock;
use super::tensor::{Arrival, Arriving, CudaTensor, Offloaded, StashedLayout, Storage};
use super::timeline::Timeline;
use crate::error::{Error, Result};
use cudarc::driver::{
    sys, CudaEvent, CudaStream, CudaView, DevicePtr, DeviceRepr, DriverError, PinnedHostSlice,
};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A pinned host buffer of bytes (an offloaded tensor's values) and its address. The address is
/// read once, when the buffer is made: cudarc's accessors wait for the buffer's last copy on the
/// host, which is not allowed while a stream is being captured.
#[derive(Debug)]
pub struct HostBuffer {
    pub bytes: PinnedHostSlice<u8>,
    addr: usize,
}

/// A list of pinned buffers shared with the tensors that hold one (they return it when dropped).
pub type HostBuffers = Arc<Mutex<Vec<HostBuffer>>>;

/// Device values being copied out, each with the event marking its copy's end.
type Leaving = Mutex<Vec<(CudaEvent, Storage)>>;

/// A copy stream for unrecorded work and one for the thread recording (`Gpu::records_here`),
/// and what they carry (the name timeline.rs reports them under).
struct CopyStreams {
    queued: Arc<CudaStream>,
    recording: Arc<CudaStream>,
    name: &'static str,
}

impl CopyStreams {
    fn new(gpu: &Gpu, name: &'static str) -> Result<Self> {
        let new_stream = || {
            gpu.ctx
                .new_stream()
                .map_err(driver_error("creating a copy stream"))
        };
        Ok(CopyStreams {
            queued: new_stream()?,
            recording: new_stream()?,
            name,
        })
    }

    /// The copy stream of this thread's work.
    fn of_thread(&self, gpu: &Gpu) -> &Arc<CudaStream> {
        match gpu.records_here() {
            true => &self.recording,
            false => &self.queued,
        }
    }
}

/// The copy streams and the buffers they move.
pub(super) struct Offload {
    /// Copies of activations, out and back.
    activations: CopyStreams,
    /// Copies of host tables to the device, on streams of their own: they run beside the copies
    /// out of the forward pass (in a seq-8192 step on the H200 of bench/NOTES.md both directions
    /// ran at ~45 GB/s at once; queued on the activations' stream instead, host layers arrived
    /// late and the step was 5 % slower).
    tables: CopyStreams,
    /// Pinned buffers no tensor holds, kept for the next step: allocating pinned memory is slow.
    spare: HostBuffers,
    /// The pinned buffers the pass being recorded used, for the recording to keep.
    recorded: HostBuffers,
    /// Set when the pass being recorded found no spare buffer (another pass holds them).
    short: AtomicBool,
    /// Device buffers being copied out, freed (in stream order) at the next stash or fetch: those
    /// of unrecorded work and those of the pass being recorded.
    leaving: [Leaving; 2],
    /// Where each copy's start and end are recorded, when the backend keeps a timeline.
    timeline: Option<Arc<Timeline>>,
}

impl Offload {
    pub(super) fn new(gpu: &Gpu, timeline: Option<Arc<Timeline>>) -> Result<Self> {
        Ok(Offload {
            activations: CopyStreams::new(gpu, "activations")?,
            tables: CopyStreams::new(gpu, "tables")?,
            spare: HostBuffers::default(),
            recorded: HostBuffers::default(),
            short: AtomicBool::new(false),
            leaving: Default::default(),
            timeline,
        })
    }

    /// The device buffers this thread's copies out are freeing.
    fn leaving(&self, gpu: &Gpu) -> &Leaving {
        &self.leaving[gpu.records_here() as usize]
    }

    /// Where this thread's offloaded tensors return their pinned buffers when dropped: the spare
    /// ones, or, while recording, the recording's (a buffer freed during a capture would fail).
    fn home(&self, gpu: &Gpu) -> &HostBuffers {
        match gpu.records_here() {
            true => &self.recorded,
            false => &self.spare,
        }
    }

    /// Waits on the host until the unrecorded activation copies queued so far have finished: a
    /// recording about to be captured may take their pinned buffers, and its copies wait for
    /// nothing. (Table copies hold no such buffer: the tables outlive every copy.)
    pub(super) fn finish_copies(&self) -> Result<()> {
        self.activations
            .queued
            .synchronize()
            .map_err(driver_error("finishing the offload copies"))
    }

    /// The bytes of an offloaded tensor in host memory, once the copies out queued so far have
    /// finished (the context records no per-buffer events for the host read to wait on:
    /// `Gpu::open`).
    pub(super) fn host_bytes<'a>(&self, o: &'a Offloaded) -> Result<&'a [u8]> {
        let host = o.host.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "downloading an offloaded activation that was handed back".into(),
            )
        })?;
        self.finish_copies()?;
        host.bytes
            .as_slice()
            .map_err(driver_error("reading an offloaded activation"))
    }

    /// Hands over the pinned buffers the pass just recorded used: the recording keeps them
    /// (`keep`), or they go back to the spare ones (a capture that only planned, or failed).
    /// Also says whether the pass found no spare buffer it needed (then it failed for that
    /// reason only, and can run unrecorded).
    pub(super) fn end_recording(&self, keep: bool) -> (Vec<HostBuffer>, bool) {
        let short = self.short.swap(false, Ordering::AcqRel);
        let used = std::mem::take(&mut *lock(&self.recorded));
        if keep {
            return (used, short);
        }
        lock(&self.spare).extend(used);
        (Vec::new(), short)
    }

    /// Frees the device buffers of earlier copies out, in stream order: the compute stream
    /// waits for each copy's end, then the buffer goes back to the pool, usable by the work
    /// queued after. Called at the next stash or fetch, with other work queued in between (the
    /// decoder stashes a layer's attention output before its MLP and its input after it), so
    /// that the copy has finished and the compute stream does not stall; the host never waits.
    /// A recorded pass also calls it at its end (graph.rs): a failed capture leaves no copy of
    /// its own behind.
    pub(super) fn release_copied(&self, gpu: &Gpu) -> Result<()> {
        let leaving = std::mem::take(&mut *lock(self.leaving(gpu)));
        for (done, buf) in leaving {
            gpu.stream()
                .wait(&done)
                .map_err(driver_error("ordering an offload"))?;
            drop(buf);
        }
        Ok(())
    }

    /// A pinned buffer of exactly `len` bytes, reused when one is spare. When none is, the
    /// spare buffers of other lengths are freed first: the activations changed size (another
    /// sequence length), and keeping every size seen would let host memory grow without bound.
    fn pinned(&self, gpu: &Gpu, len: usize) -> Result<HostBuffer> {
        let mut spare = lock(&self.spare);
        if let Some(i) = spare.iter().position(|p| p.bytes.len() == len) {
            return Ok(spare.swap_remove(i));
        }
        if gpu.records_here() {
            self.short.store(true, Ordering::Release);
            return Err(Error::Device(
                "recording offloaded activations needs the pinned buffers of an unrecorded pass \
                 of the same shape, and another pass took them"
                    .into(),
            ));
        }
        spare.clear();
        // SAFETY: the buffer is written by the copy out before anything reads it.
        let mut bytes = unsafe { gpu.ctx.alloc_pinned_with_flags::<u8>(len, 0) }.map_err(|e| {
            Error::OutOfMemory {
                requested: len,
                what: "pinned host memory for an offloaded activation".into(),
                detail: e.to_string(),
            }
        })?;
        let addr = bytes
            .as_mut_ptr()
            .map_err(driver_error("reading a pinned buffer's address"))?
            as usize;
        Ok(HostBuffer { bytes, addr })
    }

    /// Starts copying each of `ts` (f32 or bf16) to pinned host memory behind the work queued so
    /// far, after freeing the device buffers of the earlier copies out (`release_copied`, once
    /// for all of them: stashed one by one, each would make the compute stream wait for the
    /// copy of the one before).
    pub(super) fn stash_all<const N: usize>(
        &self,
        gpu: &Gpu,
        ts: [CudaTensor; N],
    ) -> Result<[CudaTensor; N]> {
        self.release_copied(gpu)?;
        let mut stashed = ts
            .into_iter()
            .map(|t| self.copy_out(gpu, t))
            .collect::<Result<Vec<_>>>()?
            .into_iter();
        Ok(std::array::from_fn(|_| {
            stashed.next().expect("one per tensor")
        }))
    }

    /// Starts copying `t` to pinned host memory (tensors of other storage stay as they are).
    fn copy_out(&self, gpu: &Gpu, t: CudaTensor) -> Result<CudaTensor> {
        let CudaTensor {
            rows,
            cols,
            storage,
        } = t;
        let Some((layout, values)) = stashable(&storage) else {
            return Ok(CudaTensor {
                rows,
                cols,
                storage,
            });
        };
        let mut host = self.pinned(gpu, values.len())?;
        let addr = host.addr;
        let done = self.copy(
            gpu,
            &self.activations,
            Direction::Out(values.len()),
            "copying an activation to host memory",
            // SAFETY: both ranges hold the values' bytes and outlive the copy: the device
            // buffer is freed behind it (`release_copied`), the host one belongs to the
            // recording.
            |s| unsafe {
                sys::cuMemcpyDtoHAsync_v2(
                    addr as *mut _,
                    values.device_ptr(s).0,
                    values.len(),
                    s.cu_stream(),
                )
            },
            |s| s.memcpy_dtoh(&values, &mut host.bytes),
        )?;
        lock(self.leaving(gpu)).push((done, storage));
        Ok(CudaTensor {
            rows,
            cols,
            storage: Storage::Offloaded(Box::new(Offloaded {
                host: Some(host),
                layout,
                arriving: None,
                home: self.home(gpu).clone(),
            })),
        })
    }

    /// Starts copying a stashed tensor back to a fresh device buffer; the copy overlaps the
    /// work queued after it until [`Offload::settle`]. Any fetch, even of a tensor that never
    /// left the device (the last layer's input), first frees the device buffers of the copies
    /// out queued so far (`release_copied`): the backward's first fetch comes after the loss,
    /// when the forward's last copies are long done.
    pub(super) fn fetch(&self, gpu: &Gpu, t: &mut CudaTensor) -> Result<()> {
        self.release_copied(gpu)?;
        let Storage::Offloaded(o) = &mut t.storage else {
            return Ok(());
        };
        let (Some(host), None) = (&o.host, &o.arriving) else {
            return Ok(());
        };
        o.arriving = Some(match o.layout {
            StashedLayout::F32 => Arriving::F32(self.fetch_values(gpu, host)?),
            StashedLayout::Bf16 | StashedLayout::Bf16Pitched(_) => {
                Arriving::Bf16(self.fetch_values(gpu, host)?)
            }
        });
        Ok(())
    }

    /// Starts copying `host`'s bytes to a fresh device buffer of `T` values.
    fn fetch_values<T: DeviceRepr>(&self, gpu: &Gpu, host: &HostBuffer) -> Result<Arrival<T>> {
        let bytes = host.bytes.len();
        // The copy is ordered after the allocation, which is ordered on the compute stream.
        let mut buf = gpu.alloc::<T>(
            bytes / std::mem::size_of::<T>(),
            "an offloaded activation coming back",
        )?;
        let dst = buf.slice.device_ptr(gpu.stream()).0;
        let ready = self.copy(
            gpu,
            &self.activations,
            Direction::In(bytes),
            "copying an activation back",
            // SAFETY: as in `stash`; the device buffer is freed only after the compute stream
            // has waited for `ready`.
            |s| unsafe {
                sys::cuMemcpyHtoDAsync_v2(dst, host.addr as *const _, bytes, s.cu_stream())
            },
            // SAFETY: the view covers the buffer's own bytes (the host ones came from such a
            // buffer), read back as `T` values.
            |s| match unsafe { buf.slice.transmute_mut::<u8>(bytes) } {
                Some(mut view) => s.memcpy_htod(&host.bytes, &mut view),
                None => Err(DriverError(sys::cudaError_enum::CUDA_ERROR_INVALID_VALUE)),
            },
        )?;
        Ok(Arrival::new(buf, ready, gpu.stream().clone()))
    }

    /// Starts copying the values `range` of a host table to a fresh device buffer (held for
    /// `what`); the copy overlaps the work queued after it until the returned [`Arrival`] is
    /// settled.
    pub(super) fn fetch_table(
        &self,
        gpu: &Gpu,
        table: &HostTable,
        range: Range<usize>,
        what: &'static str,
    ) -> Result<Arrival<u16>> {
        if range.end > table.len() {
            return Err(Error::InvalidArgument(format!(
                "{what}: values {range:?} of a host table of {}",
                table.len()
            )));
        }
        // The copy is ordered after the allocation, which is ordered on the compute stream.
        let buf = gpu.alloc::<u16>(range.len(), what)?;
        let dst = buf.slice.device_ptr(gpu.stream()).0;
        // SAFETY: `range` lies within the table (checked above); `buf` holds its values and is
        // freed only after the compute stream has waited for the copy (`Arrival`); the table is
        // read-only and outlives the work and the recordings that read it (the model's weights
        // outlive its steps), so the plain driver copy serves both kinds of work.
        let copy = |s: &Arc<CudaStream>| unsafe { table.copy_to_device(dst, range.clone(), s) };
        let ready = self.copy(
            gpu,
            &self.tables,
            Direction::In(2 * range.len()),
            "copying a host table to the device",
            copy,
            |s| copy(s).result(),
        )?;
        Ok(Arrival::new(buf, ready, gpu.stream().clone()))
    }

    /// Queues a copy on this thread's copy stream behind the work queued on its compute stream
    /// and returns the event marking the copy's end: `recorded`, a plain driver copy, while this
    /// thread records (cudarc's copies record the pinned buffer's own event, which a recording
    /// must not hold; the unrecorded copies of its buffers finished before the capture began,
    /// `finish_copies`), else `queued`.
    fn copy(
        &self,
        gpu: &Gpu,
        streams: &CopyStreams,
        direction: Direction,
        what: &'static str,
        recorded: impl FnOnce(&Arc<CudaStream>) -> sys::CUresult,
        queued: impl FnOnce(&Arc<CudaStream>) -> std::result::Result<(), DriverError>,
    ) -> Result<CudaEvent> {
        let stream = streams.of_thread(gpu);
        let order = || driver_error("ordering an offload copy");
        stream.join(gpu.stream()).map_err(order())?;
        let (begin, end, bytes) = match direction {
            Direction::Out(bytes) => ("out-begin", "out-end", bytes),
            Direction::In(bytes) => ("in-begin", "in-end", bytes),
        };
        let mark = |edge| match &self.timeline {
            Some(t) => t.record(gpu, stream, streams.name, edge, bytes),
            None => Ok(()),
        };
        mark(begin)?;
        match gpu.records_here() {
            true => recorded(stream).result(),
            false => queued(stream),
        }
        .map_err(driver_error(what))?;
        mark(end)?;
        stream.record_event(None).map_err(order())
    }

    /// Makes the compute stream wait for a fetched tensor (fetching it first if that was not
    /// started) or a host table's copy, and returns it as a device tensor.
    pub(super) fn settle(&self, gpu: &Gpu, mut t: CudaTensor) -> Result<CudaTensor> {
        self.fetch(gpu, &mut t)?;
        let CudaTensor {
            rows,
            cols,
            storage,
        } = t;
        let storage = match storage {
            // The pinned buffer goes home as `o` drops.
            Storage::Offloaded(mut o) => {
                match (o.arriving.take().expect("fetched above"), o.layout) {
                    (Arriving::F32(values), _) => Storage::F32(values.settle()?),
                    (Arriving::Bf16(values), StashedLayout::Bf16Pitched(pitch)) => {
                        Storage::Bf16Pitched {
                            values: values.settle()?,
                            pitch,
                        }
                    }
                    (Arriving::Bf16(values), _) => Storage::Bf16(values.settle()?),
                }
            }
            other => other,
        };
        Ok(CudaTensor {
            rows,
            cols,
            storage,
        })
    }
}

/// Which way a copy goes, and its bytes.
#[derive(Clone, Copy)]
enum Direction {
    /// Device to host.
    Out(usize),
    /// Host to device.
    In(usize),
}

/// How `Offload::stash` keeps `storage`, with the bytes of its device values; `None` for
/// storage it leaves where it is.
fn stashable(storage: &Storage) -> Option<(StashedLayout, CudaView<'_, u8>)> {
    fn bytes_of<T>(b: &DeviceBuffer<T>) -> Option<CudaView<'_, u8>> {
        // SAFETY: the view covers the buffer's own bytes, read as bytes by a copy.
        unsafe { b.slice.transmute::<u8>(b.slice.num_bytes()) }
    }
    match storage {
        Storage::F32(b) => Some((StashedLayout::F32, bytes_of(b)?)),
        Storage::Bf16(b) => Some((StashedLayout::Bf16, bytes_of(b)?)),
        Storage::Bf16Pitched { values, pitch } => {
            Some((StashedLayout::Bf16Pitched(*pitch), bytes_of(values)?))
        }
        _ => None,
    }
}
