//! Optional timeline of training passes on the GPU, for reading where a step waits: with
//! `FINETUNE_CUDA_TIMELINE=FILE`, an event is recorded where each decoder layer's forward and
//! backward pass and the loss begin and where the pass ends (on the compute stream), and
//! around every copy between host and device memory (on its copy stream). Inside a recorded
//! pass they are the graph's own event nodes (external records), timed again at each replay.
//! When the backend is dropped, FILE (FILE.N for GPU N > 0 of a process driving several)
//! receives the last pass's events, one CSV line each:
//! `ms,stream,what,index` with ms since the pass began; `what` is start, forward, loss,
//! backward or end (`index` the layer) on stream `compute`, or a copy's out-begin, out-end,
//! in-begin or in-end (`index` its bytes) on stream `activations` or `tables`.
//! scripts/timeline.py summarizes them.
//! Off by default: the events cost a little, and the report waits for the GPU. Only the last
//! unrecorded pass and the recorded ones (re-timed by each replay) keep their events.

use super::device::{driver_error, Gpu};
use super::lock;
use crate::backend::PassPoint;
use crate::error::{Error, Result};
use cudarc::driver::{sys, CudaEvent, CudaStream};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Mutex;

/// One recorded point: the pass it belongs to, where it was recorded, what it marks, and
/// whether it is a node of a recorded pass.
struct Point {
    pass: usize,
    stream: &'static str,
    what: &'static str,
    index: usize,
    event: CudaEvent,
    recorded: bool,
}

/// The points kept, in the order they were queued, and the passes begun so far.
#[derive(Default)]
struct Points {
    passes: usize,
    list: Vec<Point>,
}

/// The events of the passes so far, and where their report goes.
pub(super) struct Timeline {
    path: PathBuf,
    points: Mutex<Points>,
}

impl Timeline {
    /// A timeline of GPU `ordinal`'s passes when `FINETUNE_CUDA_TIMELINE` names a file.
    pub(super) fn from_env(ordinal: usize) -> Option<Self> {
        let mut path = std::env::var_os("FINETUNE_CUDA_TIMELINE")?;
        if ordinal > 0 {
            path.push(format!(".{ordinal}"));
        }
        Some(Timeline {
            path: path.into(),
            points: Mutex::default(),
        })
    }

    /// Records a point of the pass on the compute stream.
    pub(super) fn mark(&self, gpu: &Gpu, point: PassPoint) -> Result<()> {
        let (what, index) = match point {
            PassPoint::Start => ("start", 0),
            PassPoint::Forward(layer) => ("forward", layer),
            PassPoint::Loss => ("loss", 0),
            PassPoint::Backward(layer) => ("backward", layer),
            PassPoint::End => ("end", 0),
        };
        if point == PassPoint::Start {
            // A new pass: the unrecorded ones before it are older than it will be.
            let mut points = lock(&self.points);
            points.list.retain(|p| p.recorded);
            points.passes += 1;
        }
        self.record(gpu, gpu.stream(), "compute", what, index)
    }

    /// Records an event on `stream` (`name` in the report): an external record while this
    /// thread records a pass, so that the graph holds it as a node of its own.
    pub(super) fn record(
        &self,
        gpu: &Gpu,
        stream: &CudaStream,
        name: &'static str,
        what: &'static str,
        index: usize,
    ) -> Result<()> {
        let event = gpu
            .ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver_error("creating a timeline event"))?;
        let recorded = gpu.records_here();
        let flags = match recorded {
            true => sys::CUevent_record_flags_enum::CU_EVENT_RECORD_EXTERNAL,
            false => sys::CUevent_record_flags_enum::CU_EVENT_RECORD_DEFAULT,
        };
        // SAFETY: both handles are live (the event is owned here, the stream borrowed).
        unsafe { sys::cuEventRecordWithFlags(event.cu_event(), stream.cu_stream(), flags as u32) }
            .result()
            .map_err(driver_error("recording a timeline event"))?;
        let mut points = lock(&self.points);
        let pass = points.passes;
        points.list.push(Point {
            pass,
            stream: name,
            what,
            index,
            event,
            recorded,
        });
        Ok(())
    }

    /// The CSV lines of the pass that ran last (the one whose start is latest: a recorded
    /// pass's events hold its last replay), times from its start. Events that never ran (those
    /// of a recording made only to plan its memory) cannot be timed and are left out.
    fn report(&self) -> String {
        let points = lock(&self.points);
        let starts = points.list.iter().filter(|p| p.what == "start");
        let mut out = String::from("ms,stream,what,index\n");
        let Some(origin) = starts
            .clone()
            .find(|p| p.event.elapsed_ms(&p.event).is_ok())
        else {
            return out;
        };
        let since = |p: &Point| origin.event.elapsed_ms(&p.event).ok();
        let last = starts
            .filter_map(|p| Some((since(p)?, p)))
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .expect("the origin itself");
        for p in points.list.iter().filter(|p| p.pass == last.1.pass) {
            let Some(ms) = since(p) else { continue };
            let ms = ms - last.0;
            writeln!(out, "{ms:.4},{},{},{}", p.stream, p.what, p.index).expect("a String");
        }
        out
    }

    /// Writes the report to the file (errors go to standard error: this runs at drop).
    pub(super) fn write(&self) {
        if let Err(e) = std::fs::write(&self.path, self.report()) {
            eprintln!("FINETUNE_CUDA_TIMELINE: {}", Error::io(&self.path, e));
        }
    }
}
