//! Training: optimizer, resumable state, the generic loop, controller, cache, Stage 2, data-parallel runs.

#[path = "../support/mod.rs"]
mod support;

mod cache;
mod config;
mod controller;
mod distributed;
mod drift;
mod optim;
mod plot;
mod progress;
mod publish;
mod runner;
mod stage2;
mod state;
