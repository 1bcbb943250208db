//! The policy heads: shapes, fusion, diffusion sampling, checkpoints, conversion from the PyTorch reference.

#[path = "../support/mod.rs"]
mod support;

mod convert;
mod diffusion;
mod heads;
mod heads_file;
