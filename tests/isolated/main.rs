//! Tests that need the process to themselves (benchmarks, memory peaks, the real-time
//! control loop): each holds `support::serial()`.

#[path = "../support/mod.rs"]
mod support;

mod dataset_bench;
mod lora_memory;
mod policy_bench;
mod recorder_bench;
mod runtime_bench;
mod runtime_realtime;
mod train_validation;
