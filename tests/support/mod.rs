//! Helpers shared by the test binaries (each includes this module with `#[path]`): fixtures and
//! models of the LoRA, VLM, runtime and Stage 2 tests, and the locks that keep tests of one
//! binary, which run as parallel threads of one process, off each other's process-wide state.
// Each binary uses a different part of these helpers.
#![allow(dead_code)]

pub mod lora;
pub mod runtime;
pub mod stage2;
pub mod vlm;

use std::sync::{Mutex, MutexGuard};

/// Serialises the tests that draw from libtorch's random generator, depend on its seeded draws or
/// set its thread count: `tch::manual_seed` and `tch::set_num_threads` are process-wide.
pub fn rng_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the tests of a binary one at a time (those that measure the process: time, memory).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
