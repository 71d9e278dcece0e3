//! The decoder: its configuration, weights, and forward/backward pass written against
//! [`crate::backend::Backend`].

pub mod adapters;
pub mod config;
pub mod decoder;
pub mod presets;
pub mod weights;
