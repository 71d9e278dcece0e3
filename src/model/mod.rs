//! The decoder: its configuration, weights, and forward/backward pass written against
//! [`crate::backend::Backend`].

pub mod adapters;
pub mod config;
pub mod decoder;
pub mod host_layers;
pub mod presets;
pub mod weights;

pub use host_layers::host_layer_indices;
