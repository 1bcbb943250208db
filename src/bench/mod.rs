//! Benchmarks of the Stage 2 work against the Python stack (`vla_finetune bench`,
//! scripts/reference_bench.py): the training step under each cache mode, vision-cache building
//! and policy `act()`, with throughput, median step time and peak memory per case.
//!
//! - [`shapes`]: model sizes (tiny / reduced / full 3B), heads sizes, synthetic frames.
//! - [`case`]: a case's parameters and the JSON [`case::Record`] shared with the reference.
//! - [`run`]: runs one case with our implementation.
//! - [`table`]: the stdout table.

pub mod case;
pub mod run;
pub mod shapes;
pub mod table;

pub use case::{BenchPrecision, CaseKind, CaseSpec, Record, StepCache};
pub use shapes::ModelSize;
