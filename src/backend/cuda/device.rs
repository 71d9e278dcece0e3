//! One GPU: its context and stream, found through the driver loaded at run time, and the
//! accounting of every byte this library holds on it.

use super::arena::Arena;
use super::lock;
use crate::error::{Error, Result};
use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DeviceRepr, DriverError};
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};

/// Live and peak bytes of the device buffers this library allocated, and an optional cap.
#[derive(Debug, Default)]
pub struct MemoryAccount {
    live: AtomicUsize,
    peak: AtomicUsize,
    /// Allocations that would take `live` past this many bytes fail (0: no cap).
    limit: AtomicUsize,
    /// What the bytes are held for, now and at the peak. Updated with `live` and `peak` under
    /// its lock, so a snapshot adds up to the peak.
    purposes: Mutex<Purposes>,
}

/// Bytes held per purpose (the `what` an allocation names, as in out-of-memory errors).
#[derive(Debug, Default)]
struct Purposes {
    live: HashMap<Arc<str>, usize>,
    /// `live` when the peak was reached (plus memory noted beside it), and what reached it.
    at_peak: Vec<(Arc<str>, usize)>,
    peak_set_by: String,
}

impl Purposes {
    /// Counts `bytes` more for the purpose named `what`, interned (one string per purpose,
    /// however many buffers), and returns it.
    fn add(&mut self, what: &str, bytes: usize) -> Arc<str> {
        let k = match self.live.get_key_value(what) {
            Some((k, _)) => k.clone(),
            None => Arc::from(what),
        };
        *self.live.entry(k.clone()).or_insert(0) += bytes;
        k
    }

    /// Takes what is held now (and `beside`, held outside the account) as the peak's makeup.
    fn mark_peak(&mut self, set_by: &str, beside: Option<(&str, usize)>) {
        self.at_peak.clear();
        let held = self.live.iter().filter(|(_, &b)| b > 0);
        self.at_peak.extend(held.map(|(k, &b)| (k.clone(), b)));
        if let Some((what, bytes)) = beside {
            self.at_peak.push((Arc::from(what), bytes));
        }
        self.peak_set_by = set_by.to_string();
    }
}

const MIB: f64 = (1 << 20) as f64;

/// (purpose, bytes) pairs sorted by bytes, largest first, then by name.
fn largest_first<'a>(pairs: impl Iterator<Item = (&'a Arc<str>, usize)>) -> Vec<(String, usize)> {
    let mut v: Vec<(String, usize)> = pairs.map(|(k, b)| (k.to_string(), b)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

impl MemoryAccount {
    /// Bytes held now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Whether `bytes` more would stay within the cap (always, with none).
    pub fn fits(&self, bytes: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        limit == 0 || self.live() + bytes <= limit
    }

    /// The most bytes held at once since the start or the last [`MemoryAccount::reset_peak`].
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// What the allocation that reached [`MemoryAccount::peak`] was for.
    pub fn peak_set_by(&self) -> String {
        self.purposes().peak_set_by.clone()
    }

    /// The bytes held per purpose when [`MemoryAccount::peak`] was reached, largest first
    /// (they add up to the peak).
    pub fn peak_purposes(&self) -> Vec<(String, usize)> {
        largest_first(self.purposes().at_peak.iter().map(|(k, b)| (k, *b)))
    }

    pub fn reset_peak(&self) {
        let mut purposes = self.purposes();
        self.peak.store(self.live(), Ordering::Relaxed);
        purposes.mark_peak("what was held at the reset", None);
    }

    /// Caps the bytes held at once (0 removes the cap).
    pub fn set_limit(&self, bytes: usize) {
        self.limit.store(bytes, Ordering::Relaxed);
    }

    fn purposes(&self) -> std::sync::MutexGuard<'_, Purposes> {
        lock(&self.purposes)
    }

    /// Counts `bytes` for `what`; returns the purpose to release them under.
    fn reserve(&self, bytes: usize, what: &str) -> Result<Arc<str>> {
        let mut purposes = self.purposes();
        if !self.fits(bytes) {
            let held = largest_first(purposes.live.iter().map(|(k, b)| (k, *b)));
            let held: Vec<String> = (held.iter().filter(|(_, b)| *b > 0))
                .map(|(k, b)| format!("{k} {:.1} MiB", *b as f64 / MIB))
                .collect();
            return Err(Error::OutOfMemory {
                requested: bytes,
                what: what.to_string(),
                detail: format!(
                    "{} bytes held, the device-memory cap is {}; held for: {}",
                    self.live(),
                    self.limit.load(Ordering::Relaxed),
                    held.join(", ")
                ),
            });
        }
        let live = self.live() + bytes;
        self.live.store(live, Ordering::Relaxed);
        let purpose = purposes.add(what, bytes);
        if live > self.peak() {
            self.peak.store(live, Ordering::Relaxed);
            purposes.mark_peak(what, None);
        }
        Ok(purpose)
    }

    /// Counts `bytes` held outside this account's allocations (recorded work's own memory) on
    /// top of what is live now, for the peak.
    pub fn note_held_beside(&self, bytes: usize, what: &str) {
        let mut purposes = self.purposes();
        let total = self.live() + bytes;
        if total > self.peak() {
            self.peak.store(total, Ordering::Relaxed);
            purposes.mark_peak(what, Some((what, bytes)));
        }
    }

    fn release(&self, bytes: usize, purpose: &Arc<str>) {
        let mut purposes = self.purposes();
        self.live.fetch_sub(bytes, Ordering::Relaxed);
        if let Some(held) = purposes.live.get_mut(purpose) {
            *held -= bytes;
        }
    }
}

/// A device array whose bytes are counted in a [`MemoryAccount`] while it lives, or a place
/// in a recording's block (arena.rs), which the block's own buffer counts.
#[derive(Debug)]
pub struct DeviceBuffer<T> {
    pub slice: ManuallyDrop<CudaSlice<T>>,
    account: Arc<MemoryAccount>,
    /// What its bytes are counted for (None: a place in an arena's block, counted there).
    purpose: Option<Arc<str>>,
    /// Its place in a recording's arena (boxed: most buffers have none).
    placed: Option<Box<Place>>,
}

/// Where a buffer allocated while recording goes in the recording's arena.
#[derive(Debug)]
struct Place {
    arena: Arc<Arena>,
    at: usize,
    /// Whether the buffer lies in the arena's block (else it is an allocation of its own whose
    /// place is only planned).
    in_block: bool,
}

impl<T> DeviceBuffer<T> {
    pub fn elements(&self) -> usize {
        self.slice.len()
    }
}

impl<T> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: `slice` is not touched again.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        let bytes = slice.num_bytes();
        if let Some(place) = self.placed.take() {
            place.arena.release(place.at);
            if place.in_block {
                // The block owns the memory.
                slice.leak();
                return;
            }
        }
        if let Some(purpose) = &self.purpose {
            self.account.release(bytes, purpose);
        }
    }
}

/// High-water marks of recorded work's own device memory (bytes).
#[derive(Debug, Clone, Copy)]
pub struct GraphMemoryPeak {
    /// Backing allocations in use.
    pub used: usize,
    /// Held by the graph memory pool, in use or cached.
    pub reserved: usize,
}

/// The context, the one stream all work runs on in order, and the memory account.
pub struct Gpu {
    pub ordinal: usize,
    pub ctx: Arc<CudaContext>,
    /// The stream all work runs on, in order.
    main: Arc<CudaStream>,
    /// The stream a thread recording work (graph.rs) queues it on instead, so that other
    /// threads' work on `main` meanwhile is not recorded with it.
    recording_stream: Arc<CudaStream>,
    /// The stream adapter gradients run on beside the work on `main` (aside.rs; never while
    /// recording).
    side: Arc<CudaStream>,
    /// The thread recording now, if one is.
    recorder: Mutex<Option<ThreadId>>,
    /// Held by the thread recording (see [`Gpu::recording_here`]).
    recording_turn: Mutex<()>,
    /// Where the recording thread's allocations are placed (arena.rs).
    arena: Mutex<Option<Arc<Arena>>>,
    /// Whether one is (read before taking the lock: the common case needs no lock).
    recording_somewhere: AtomicBool,
    pub memory: Arc<MemoryAccount>,
    pub name: String,
    /// `(major, minor)` compute capability.
    pub capability: (i32, i32),
    /// Streaming multiprocessors: how many blocks run at once, for launch-shape choices.
    pub multiprocessors: usize,
}

/// Maps a driver failure during `what` to the library's error.
pub fn driver_error(what: &str) -> impl FnOnce(DriverError) -> Error + '_ {
    move |e| Error::Device(format!("{what}: {e}"))
}

/// True when the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the shared library; no CUDA call is made.
    unsafe { sys::is_culib_present() }
}

/// The error for `wanted` (a device name) on a machine without the CUDA driver.
fn no_driver(wanted: &str) -> Error {
    Error::Device(format!(
        "{wanted} was asked for, but the NVIDIA driver library (libcuda.so) was not found; use \
         \"cpu\" or install the driver"
    ))
}

/// The number of CUDA GPUs on this machine; a clear error when the driver is absent.
pub fn gpu_count() -> Result<usize> {
    if !driver_present() {
        return Err(no_driver("a CUDA GPU"));
    }
    let count = CudaContext::device_count().map_err(driver_error("counting GPUs"))?;
    Ok(count.max(0) as usize)
}

impl Gpu {
    /// Opens GPU `ordinal`: a clear error when the driver or the GPU is absent.
    pub fn open(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(no_driver(&format!("cuda:{ordinal}")));
        }
        let count = gpu_count()?;
        if ordinal >= count {
            return Err(Error::Device(format!(
                "cuda:{ordinal} was asked for, but this machine has {count} CUDA GPU(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_error("creating the CUDA context"))?;
        // All work runs on one stream in order, so the per-buffer events cudarc would record
        // for cross-stream safety are pure overhead.
        // SAFETY: the buffers used on other streams (copies: offload.rs; adapter gradients:
        // aside.rs) are ordered against the compute stream by events of their own.
        unsafe { ctx.disable_event_tracking() };
        let new_stream = || ctx.new_stream().map_err(driver_error("creating a stream"));
        let (main, recording_stream) = (new_stream()?, new_stream()?);
        let side = new_stream()?;
        keep_freed_memory_pooled(&ctx)?;
        let name = ctx.name().map_err(driver_error("reading the GPU name"))?;
        let capability = ctx
            .compute_capability()
            .map_err(driver_error("reading the compute capability"))?;
        let multiprocessors = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_error("reading the multiprocessor count"))?
            .max(1) as usize;
        Ok(Gpu {
            ordinal,
            ctx,
            main,
            recording_stream,
            side,
            recorder: Mutex::new(None),
            recording_turn: Mutex::new(()),
            arena: Mutex::new(None),
            recording_somewhere: AtomicBool::new(false),
            memory: Arc::new(MemoryAccount::default()),
            name,
            capability,
            multiprocessors,
        })
    }

    /// The stream this thread's work goes to: the main stream, or the recording stream while
    /// this thread records.
    pub fn stream(&self) -> &Arc<CudaStream> {
        if self.records_here() {
            &self.recording_stream
        } else {
            &self.main
        }
    }

    /// The stream adapter gradients go to beside [`Gpu::stream`] (aside.rs), in queued work
    /// only.
    pub fn side_stream(&self) -> &Arc<CudaStream> {
        &self.side
    }

    /// The stream all work runs on (where recorded work is replayed).
    pub fn main_stream(&self) -> &Arc<CudaStream> {
        &self.main
    }

    /// Whether this thread is recording work.
    pub fn records_here(&self) -> bool {
        self.recording_somewhere.load(Ordering::Acquire)
            && *lock(&self.recorder) == Some(thread::current().id())
    }

    /// Runs `f` with this thread's work going to the recording stream; a thread wanting to
    /// record meanwhile waits until `f` returns (one recording at a time).
    pub fn recording_here<T>(&self, f: impl FnOnce() -> T) -> T {
        /// Sets the recorder and clears it when dropped (a panic in `f` included).
        struct Recorder<'a>(&'a Gpu);
        impl Recorder<'_> {
            fn set(&self, who: Option<ThreadId>) {
                *lock(&self.0.recorder) = who;
                self.0
                    .recording_somewhere
                    .store(who.is_some(), Ordering::Release);
            }
        }
        impl Drop for Recorder<'_> {
            fn drop(&mut self) {
                self.set(None);
            }
        }
        let _one_at_a_time = lock(&self.recording_turn);
        let recorder = Recorder(self);
        recorder.set(Some(thread::current().id()));
        f()
    }

    /// Sets (or clears) the arena this thread's allocations are placed in while it records.
    pub fn set_arena(&self, arena: Option<Arc<Arena>>) {
        *lock(&self.arena) = arena;
    }

    /// An uninitialised device array of `len` elements, for `what` (named in errors).
    pub fn alloc<T: DeviceRepr>(&self, len: usize, what: &str) -> Result<DeviceBuffer<T>> {
        let arena = match self.records_here() {
            true => lock(&self.arena).clone(),
            false => None,
        };
        let Some(arena) = arena else {
            return self.alloc_on(self.stream(), len, what);
        };
        let bytes = len * std::mem::size_of::<T>();
        match arena.place(bytes) {
            (at, None) => {
                let mut b = self.alloc_on(self.stream(), len, what)?;
                b.placed = Some(Box::new(Place {
                    arena,
                    at,
                    in_block: false,
                }));
                Ok(b)
            }
            (at, Some(Some(address))) => Ok(DeviceBuffer {
                // SAFETY: the range lies in the arena's block, which outlives the recording
                // and every replay; it is never freed through this slice (see Drop).
                slice: ManuallyDrop::new(unsafe {
                    self.stream().upgrade_device_ptr::<T>(address, len)
                }),
                account: self.memory.clone(),
                purpose: None,
                placed: Some(Box::new(Place {
                    arena,
                    at,
                    in_block: true,
                })),
            }),
            (at, Some(None)) => {
                arena.release(at);
                Err(Error::Device(format!(
                    "recorded work's allocation {at} ({bytes} bytes for {what}) is not the one \
                     its first capture made there; the two captures differ"
                )))
            }
        }
    }

    /// [`Gpu::alloc`] of an allocation of its own, ordered on `stream`.
    pub fn alloc_on<T: DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        len: usize,
        what: &str,
    ) -> Result<DeviceBuffer<T>> {
        let bytes = len * std::mem::size_of::<T>();
        let purpose = self.memory.reserve(bytes, what)?;
        // SAFETY: every caller writes the array (kernel output, copy or memset) before reading it.
        match unsafe { stream.alloc::<T>(len) } {
            Ok(slice) => Ok(DeviceBuffer {
                slice: ManuallyDrop::new(slice),
                account: self.memory.clone(),
                purpose: Some(purpose),
                placed: None,
            }),
            Err(e) => {
                self.memory.release(bytes, &purpose);
                Err(self.allocation_error(bytes, what, e))
            }
        }
    }

    /// A device array of `len` zero elements.
    pub fn alloc_zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
        what: &str,
    ) -> Result<DeviceBuffer<T>> {
        let mut b = self.alloc::<T>(len, what)?;
        self.stream()
            .memset_zeros(&mut *b.slice)
            .map_err(driver_error(what))?;
        Ok(b)
    }

    /// A device copy of `data`.
    pub fn upload<T: DeviceRepr>(&self, data: &[T], what: &str) -> Result<DeviceBuffer<T>> {
        let mut b = self.alloc::<T>(data.len(), what)?;
        self.stream()
            .memcpy_htod(data, &mut *b.slice)
            .map_err(driver_error(what))?;
        Ok(b)
    }

    /// The values of a device array (waits for the work queued before).
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        b: &CudaSlice<T>,
        what: &str,
    ) -> Result<Vec<T>> {
        self.stream().clone_dtoh(b).map_err(driver_error(what))
    }

    /// Waits for all queued work; a failure of any earlier launch surfaces here.
    pub fn synchronize(&self) -> Result<()> {
        self.stream()
            .synchronize()
            .map_err(driver_error("waiting for the GPU"))
    }

    /// Gives the blocks the stream-ordered pool keeps (freed, none in use) back to the system.
    pub fn release_pooled_memory(&self) -> Result<()> {
        let pool = default_pool(&self.ctx)?;
        // SAFETY: a driver call on this device's live default pool; blocks in use are kept.
        unsafe { sys::cuMemPoolTrimTo(pool, 0) }
            .result()
            .map_err(driver_error("releasing pooled device memory"))
    }

    /// The most device memory recorded work (CUDA graphs) has used for its own allocations,
    /// and the most its pool has reserved, since the last [`Gpu::reset_graph_memory_peak`].
    pub fn graph_memory_peak(&self) -> Result<GraphMemoryPeak> {
        use sys::CUgraphMem_attribute::*;
        Ok(GraphMemoryPeak {
            used: self.graph_memory_attribute(CU_GRAPH_MEM_ATTR_USED_MEM_HIGH, None)? as usize,
            reserved: self.graph_memory_attribute(CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH, None)?
                as usize,
        })
    }

    /// Starts a new measurement of [`Gpu::graph_memory_peak`] (from what is held now).
    pub fn reset_graph_memory_peak(&self) -> Result<()> {
        use sys::CUgraphMem_attribute::*;
        for attr in [
            CU_GRAPH_MEM_ATTR_USED_MEM_HIGH,
            CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH,
        ] {
            // 0 is the one value the driver accepts for a high-water mark: a reset.
            self.graph_memory_attribute(attr, Some(0))?;
        }
        Ok(())
    }

    /// Reads a graph-memory attribute of this device, or sets it to `set`.
    fn graph_memory_attribute(
        &self,
        attr: sys::CUgraphMem_attribute,
        set: Option<u64>,
    ) -> Result<u64> {
        let mut value = set.unwrap_or(0);
        let ptr = &mut value as *mut u64 as *mut std::ffi::c_void;
        let device = self.ctx.cu_device();
        // SAFETY: plain driver calls on a live device; `value` outlives them.
        let status = unsafe {
            match set {
                None => sys::cuDeviceGetGraphMemAttribute(device, attr, ptr),
                Some(_) => sys::cuDeviceSetGraphMemAttribute(device, attr, ptr),
            }
        };
        status
            .result()
            .map_err(driver_error("the recorded work's memory figures"))?;
        Ok(value)
    }

    fn allocation_error(&self, bytes: usize, what: &str, e: DriverError) -> Error {
        if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
            let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
            Error::OutOfMemory {
                requested: bytes,
                what: what.to_string(),
                detail: format!(
                    "cuda:{} has {free} of {total} bytes free; this library holds {}",
                    self.ordinal,
                    self.memory.live()
                ),
            }
        } else {
            Error::Device(format!("allocating {bytes} bytes for {what}: {e}"))
        }
    }
}

/// Freed blocks stay in the driver's stream-ordered pool instead of going back to the system at
/// every synchronisation, so a training step's allocations are served from the pool after the
/// first step.
fn keep_freed_memory_pooled(ctx: &CudaContext) -> Result<()> {
    let pool = default_pool(ctx)?;
    // SAFETY: a plain driver call on a live pool; the value outlives the call.
    unsafe {
        let mut threshold: u64 = u64::MAX;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
        .map_err(driver_error("configuring the device memory pool"))?;
    }
    Ok(())
}

/// The device's default stream-ordered memory pool (the one every allocation here uses).
fn default_pool(ctx: &CudaContext) -> Result<sys::CUmemoryPool> {
    let mut pool = std::ptr::null_mut();
    // SAFETY: a plain driver query on a live device; the value outlives the call.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(driver_error("reading the device memory pool"))?;
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The peak's makeup, as (purpose, bytes) largest first, and a check that it adds up.
    fn makeup(a: &MemoryAccount) -> Vec<(String, usize)> {
        let p = a.peak_purposes();
        assert_eq!(p.iter().map(|(_, b)| b).sum::<usize>(), a.peak());
        p
    }

    fn pairs(v: &[(&str, usize)]) -> Vec<(String, usize)> {
        v.iter().map(|(w, b)| (w.to_string(), *b)).collect()
    }

    #[test]
    fn the_peak_is_broken_down_by_purpose() {
        let a = MemoryAccount::default();
        let weights = a.reserve(100, "weights").unwrap();
        let scratch = a.reserve(50, "scratch").unwrap();
        a.release(50, &scratch);
        let logits = a.reserve(30, "logits").unwrap();
        assert_eq!((a.live(), a.peak()), (130, 150));
        assert_eq!(makeup(&a), pairs(&[("weights", 100), ("scratch", 50)]));
        assert_eq!(a.peak_set_by(), "scratch");

        // A second buffer of one purpose adds to it; a new peak replaces the makeup.
        let more = a.reserve(40, "logits").unwrap();
        assert_eq!(makeup(&a), pairs(&[("weights", 100), ("logits", 70)]));
        assert_eq!(a.peak_set_by(), "logits");

        a.note_held_beside(20, "recorded work");
        assert_eq!(a.peak(), 190);
        let expected = [("weights", 100), ("logits", 70), ("recorded work", 20)];
        assert_eq!(makeup(&a), pairs(&expected));

        // Refused by the cap: nothing counted.
        a.set_limit(175);
        assert!(matches!(
            a.reserve(10, "too much"),
            Err(Error::OutOfMemory { requested: 10, .. })
        ));
        assert_eq!(a.live(), 170);
        assert_eq!(makeup(&a), pairs(&expected));

        a.release(40, &more);
        a.release(30, &logits);
        a.reset_peak();
        assert_eq!(makeup(&a), pairs(&[("weights", 100)]));
        assert_eq!(a.peak_set_by(), "what was held at the reset");
        a.release(100, &weights);
        assert_eq!(a.live(), 0);
    }

    #[test]
    fn a_refusal_by_the_cap_says_what_holds_the_memory() {
        let mib = 1 << 20;
        let a = MemoryAccount::default();
        let _logits = a.reserve(3 * mib / 2, "logits").unwrap();
        let _weights = a.reserve(3 * mib, "weights").unwrap();
        let freed = a.reserve(mib, "scratch").unwrap();
        a.release(mib, &freed);
        a.set_limit(5 * mib);
        match a.reserve(mib, "a tensor") {
            Err(e @ Error::OutOfMemory { .. }) => assert_eq!(
                e.to_string(),
                format!(
                    "out of device memory: {mib} bytes asked for a tensor ({} bytes held, the \
                     device-memory cap is {}; held for: weights 3.0 MiB, logits 1.5 MiB)",
                    9 * mib / 2,
                    5 * mib
                )
            ),
            other => panic!("expected out of memory, got {other:?}"),
        }
    }
}
