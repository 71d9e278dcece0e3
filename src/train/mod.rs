//! Training: batches, the optimizer step, schedules and the trainer that ties them to a model.

pub mod batch;
pub mod checkpoint;
pub mod memory;
pub mod metrics;
mod replay;
pub mod run;
pub mod schedule;
pub mod trainer;
