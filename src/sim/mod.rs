//! Simulated robot: cameras, a 650 Hz tactile/OCT-like sensor and a pose stream, deterministic from a seed.
