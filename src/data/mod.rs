//! Datasets: reading JSONL/JSON records, rendering chats with the model's template, tokenizing
//! with per-token loss masks, packing into fixed-length rows, and batching by epoch.

pub mod dataset;
pub mod encode;
pub mod loader;
pub mod pack;
pub mod template;
