//! Stage 2 training: loop, feature cache, optimizer groups, schedule, checkpoints, publication, progress.

pub mod cache;
pub mod config;
pub mod controller;
pub mod drift;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod publish;
pub mod runner;
pub mod state;
pub mod tensor_io;
