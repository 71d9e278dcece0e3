//! Data-parallel sums over NCCL, loaded at run time like the rest of CUDA: [`NcclRank`] is one
//! GPU's member of a group and implements [`Collective`].
//!
//! Communicators are created non-blocking (`blocking = 0` in their config): every NCCL call
//! returns at once, and this module polls `ncclCommGetAsyncError` and the sums' completion
//! against a deadline. A rank that returned an error, died or stalls therefore becomes an
//! [`Error::Collective`] on the others within the group's timeout, and `ncclCommAbort` releases
//! them: the host application never hangs in a collective.

use super::lock;
use super::{wants_f32, CudaBackend, CudaTensor};
use crate::backend::collective::Collective;
use crate::error::{Error, Result};
use cudarc::driver::{CudaEvent, CudaStream};
use cudarc::nccl::sys;
use std::ffi::{c_int, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes of an NCCL unique id, the token the ranks of a group meet by.
pub const UNIQUE_ID_BYTES: usize = 128;

/// Pause between two polls of a pending NCCL operation.
const POLL: Duration = Duration::from_micros(50);

/// `NCCL_VERSION(2, 30, 0)`: the layout of `ncclConfig_t` this crate's bindings describe. NCCL
/// reads the fields that layout has and defaults the others.
const CONFIG_LAYOUT_VERSION: u32 = 23000;

/// `NCCL_CONFIG_UNDEF_INT`: "let NCCL choose".
const UNDEF: c_int = c_int::MIN;

/// True when the NCCL library (libnccl.so.2) can be loaded.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to open the shared library.
    unsafe { sys::is_culib_present() }
}

fn require_nccl() -> Result<()> {
    if nccl_present() {
        Ok(())
    } else {
        Err(Error::Device(
            "training on several GPUs needs NCCL (libnccl.so.2), which was not found; install \
             NCCL or train on one GPU"
                .into(),
        ))
    }
}

/// A fresh unique id. One rank makes it and hands the bytes to the others by any means (a file,
/// an environment variable, the application's own messages); it also hosts the group's
/// rendezvous, so it must stay alive until every rank has joined.
pub fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
    require_nccl()?;
    let mut id = sys::ncclUniqueId {
        internal: [0; UNIQUE_ID_BYTES],
    };
    // SAFETY: `id` is a valid out-pointer for the call.
    check(
        unsafe { sys::ncclGetUniqueId(&mut id) },
        "creating an NCCL unique id",
        None,
    )?;
    Ok(id.internal.map(|c| c as u8))
}

/// NCCL's description of `r`, with the communicator's last error message when there is one.
fn describe(r: sys::ncclResult_t, comm: Option<sys::ncclComm_t>) -> String {
    // SAFETY: NCCL returns static NUL-terminated strings (or NULL) for these queries.
    let text = |p: *const std::ffi::c_char| {
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    let mut s = text(unsafe { sys::ncclGetErrorString(r) }).unwrap_or_else(|| format!("{r:?}"));
    if let Some(last) = comm.and_then(|c| text(unsafe { sys::ncclGetLastError(c) })) {
        if !last.is_empty() {
            s = format!("{s}: {last}");
        }
    }
    s
}

/// Accepts success and "in progress" (a non-blocking communicator's normal answer).
fn check(r: sys::ncclResult_t, what: &str, comm: Option<sys::ncclComm_t>) -> Result<()> {
    match r {
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
        _ => Err(Error::Collective(format!("{what}: {}", describe(r, comm)))),
    }
}

/// A communicator whose calls return at once (NCCL_CONFIG_INITIALIZER with `blocking = 0`).
fn non_blocking_config() -> sys::ncclConfig_t {
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: CONFIG_LAYOUT_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// The raw communicator handle. NCCL allows its use from any thread, one call at a time
/// ([`NcclRank`] serialises them).
struct Comm(sys::ncclComm_t);
// SAFETY: see above; every use goes through NcclRank's lock or happens in drop.
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

/// One GPU's member of a data-parallel group.
pub struct NcclRank {
    comm: Comm,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// The stream the sums run on, beside the backend's compute stream.
    stream: Arc<CudaStream>,
    /// Set once the communicator was aborted after a failure: every later call fails.
    aborted: AtomicBool,
    /// Serialises the calls on the communicator, and holds the end of the last queued sums.
    pending: Mutex<Option<CudaEvent>>,
}

impl NcclRank {
    /// Joins group `id` as `rank` of `world_size` on `be`'s GPU (one process per rank). Fails
    /// when the others have not all joined within `timeout`.
    pub fn join(
        be: &CudaBackend,
        rank: usize,
        world_size: usize,
        id: &[u8; UNIQUE_ID_BYTES],
        timeout: Duration,
    ) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::InvalidArgument(format!(
                "rank {rank} is outside a data-parallel group of {world_size}"
            )));
        }
        require_nccl()?;
        let comm = init_rank(be, rank, world_size, id)?;
        let me = Self::new(be, comm, rank, world_size, timeout)?;
        me.settle(&format!("joining the group as rank {rank} of {world_size}"))?;
        Ok(me)
    }

    /// A group of the GPUs of `backends`, rank i on `backends[i]`, all driven by this process.
    pub fn group(backends: &[&CudaBackend], timeout: Duration) -> Result<Vec<Self>> {
        let id = unique_id()?;
        let world_size = backends.len();
        // The ranks must start joining together (one thread calls every init inside a group).
        // SAFETY: plain NCCL calls; every init's out-pointer is a live element of `comms`.
        check(
            unsafe { sys::ncclGroupStart() },
            "starting NCCL group",
            None,
        )?;
        let inits: Vec<Result<sys::ncclComm_t>> = backends
            .iter()
            .enumerate()
            .map(|(rank, be)| init_rank(be, rank, world_size, &id))
            .collect();
        let ended = check(
            unsafe { sys::ncclGroupEnd() },
            "creating the NCCL communicators",
            None,
        );
        // Every communicator made is wrapped, so a failure aborts (drops) all of them.
        let mut failure = ended.err();
        let mut ranks = Vec::with_capacity(world_size);
        for (rank, comm) in inits.into_iter().enumerate() {
            match comm.and_then(|c| Self::new(backends[rank], c, rank, world_size, timeout)) {
                Ok(r) => ranks.push(r),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        for r in &ranks {
            r.settle(&format!(
                "creating the communicator of rank {} of {world_size}",
                r.rank
            ))?;
        }
        Ok(ranks)
    }

    /// Wraps a communicator being created; aborts it when the sum stream cannot be made.
    fn new(
        be: &CudaBackend,
        comm: sys::ncclComm_t,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let stream = be.gpu().ctx.new_stream().map_err(|e| {
            // SAFETY: the handle was just created and is used nowhere else.
            unsafe { sys::ncclCommAbort(comm) };
            Error::Device(format!("creating the stream for gradient sums: {e}"))
        })?;
        Ok(NcclRank {
            comm: Comm(comm),
            rank,
            world_size,
            timeout,
            stream,
            aborted: AtomicBool::new(false),
            pending: Mutex::new(None),
        })
    }

    fn who(&self) -> String {
        format!("rank {} of {}", self.rank, self.world_size)
    }

    /// Aborts the communicator (once): pending operations end, later calls fail.
    fn abort(&self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: the handle is live until this first abort.
            unsafe { sys::ncclCommAbort(self.comm.0) };
        }
    }

    fn usable(&self) -> Result<()> {
        if self.aborted.load(Ordering::SeqCst) {
            Err(Error::Collective(format!(
                "{}: the group was aborted after an earlier failure; load the model again to \
                 train together",
                self.who()
            )))
        } else {
            Ok(())
        }
    }

    /// The communicator's asynchronous state: Ok(true) when idle, Ok(false) while an operation
    /// is still being set up, an error (after aborting) when NCCL reports one.
    fn poll_state(&self, what: &str) -> Result<bool> {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: live handle, valid out-pointer.
        let r = unsafe { sys::ncclCommGetAsyncError(self.comm.0, &mut state) };
        let failure = match (r, state) {
            (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclSuccess) => return Ok(true),
            (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclInProgress) => {
                return Ok(false)
            }
            (sys::ncclResult_t::ncclSuccess, s) => s,
            (r, _) => r,
        };
        let message = format!(
            "{}: {what}: {}",
            self.who(),
            describe(failure, Some(self.comm.0))
        );
        self.abort();
        Err(Error::Collective(message))
    }

    /// Polls `done` (and the communicator's errors) until it answers true or the timeout
    /// passes; aborts the communicator on failure.
    fn wait_until(&self, what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let idle = self.poll_state(what)?;
            if idle && done()? {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.abort();
                return Err(Error::Collective(format!(
                    "{}: {what} did not finish within {:.1} s: another rank failed, died or \
                     stalled; the group is aborted",
                    self.who(),
                    self.timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the communicator has finished setting up the last call.
    fn settle(&self, what: &str) -> Result<()> {
        self.wait_until(what, || Ok(true))
    }

    /// Queues the sum over all ranks of each `(address, count, type)` buffer, in place, on the
    /// sum stream behind the compute stream's work so far.
    fn queue_sums(
        &self,
        be: &CudaBackend,
        buffers: &[(u64, usize, sys::ncclDataType_t)],
    ) -> Result<()> {
        let mut pending = lock(&self.pending);
        self.usable()?;
        let driver = |e| Error::Device(format!("{}: ordering the gradient sums: {e}", self.who()));
        be.gpu().ctx.bind_to_thread().map_err(driver)?;
        self.stream.join(be.gpu().stream()).map_err(driver)?;
        let cu_stream = self.stream.cu_stream() as sys::cudaStream_t;
        // SAFETY: each address is a live device buffer of `count` elements of its type, which
        // the caller leaves untouched until `wait`; the stream and communicator are live.
        unsafe {
            check(sys::ncclGroupStart(), "starting NCCL group", None)?;
            let mut first_error = Ok(());
            for &(ptr, count, ty) in buffers {
                let r = sys::ncclAllReduce(
                    ptr as *const _,
                    ptr as *mut _,
                    count,
                    ty,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm.0,
                    cu_stream,
                );
                if first_error.is_ok() {
                    first_error = check(r, "queueing a sum", Some(self.comm.0));
                }
            }
            let ended = check(sys::ncclGroupEnd(), "queueing sums", Some(self.comm.0));
            if let Err(e) = first_error.and(ended) {
                self.abort();
                return Err(e);
            }
        }
        self.settle("queueing the sums")?;
        *pending = Some(self.stream.record_event(None).map_err(driver)?);
        Ok(())
    }
}

/// Starts joining a group: `ncclCommInitRankConfig` on `be`'s GPU, non-blocking.
fn init_rank(
    be: &CudaBackend,
    rank: usize,
    world_size: usize,
    id: &[u8; UNIQUE_ID_BYTES],
) -> Result<sys::ncclComm_t> {
    be.gpu()
        .ctx
        .bind_to_thread()
        .map_err(|e| Error::Device(format!("selecting cuda:{}: {e}", be.gpu().ordinal)))?;
    let mut comm = std::ptr::null_mut();
    let mut config = non_blocking_config();
    let id = sys::ncclUniqueId {
        internal: id.map(|b| b as std::ffi::c_char),
    };
    // SAFETY: valid out-pointer and config; NCCL copies the id.
    let r = unsafe {
        sys::ncclCommInitRankConfig(
            &mut comm,
            world_size as c_int,
            id,
            rank as c_int,
            &mut config,
        )
    };
    check(
        r,
        &format!(
            "joining as rank {rank} of {world_size} on cuda:{}",
            be.gpu().ordinal
        ),
        None,
    )?;
    Ok(comm)
}

impl Drop for NcclRank {
    fn drop(&mut self) {
        // Every sum was waited for (or the group already failed): abort only frees.
        self.abort();
    }
}

impl Collective<CudaBackend> for NcclRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn start_sum(&self, be: &CudaBackend, tensors: &mut [&mut CudaTensor]) -> Result<()> {
        let buffers = tensors
            .iter()
            .map(|t| {
                wants_f32(t, "a gradient sum")?;
                Ok((be.ptr(t)?, t.elements(), sys::ncclDataType_t::ncclFloat32))
            })
            .collect::<Result<Vec<_>>>()?;
        self.queue_sums(be, &buffers)
    }

    fn wait(&self, be: &CudaBackend) -> Result<()> {
        let pending = lock(&self.pending).take();
        let Some(done) = pending else {
            return Ok(());
        };
        self.usable()?;
        self.wait_until("the gradient sum", || {
            done.try_is_complete()
                .map_err(|e| Error::Device(format!("{}: waiting for the sums: {e}", self.who())))
        })?;
        // Later work on the compute stream reads the sums.
        be.gpu()
            .stream()
            .wait(&done)
            .map_err(|e| Error::Device(format!("{}: ordering after the sums: {e}", self.who())))
    }

    fn sum_host(&self, be: &CudaBackend, values: &mut [f64]) -> Result<()> {
        let gpu = be.gpu();
        let buf = gpu.upload(values, "host values to sum")?;
        let ptr = be.buffer_ptr(&buf);
        self.queue_sums(be, &[(ptr, values.len(), sys::ncclDataType_t::ncclFloat64)])?;
        self.wait(be)?;
        values.copy_from_slice(&gpu.download(&buf.slice, "summed host values")?);
        Ok(())
    }
}
