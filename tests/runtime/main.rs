//! The policy runtime: hot-swap, roll-back, operator controls, deadline accounting, the real loader.

#[path = "../support/mod.rs"]
mod support;

mod hotswap;
mod policy_runtime_real;
