//! ROS 2 adapters (r2r): message <-> core type conversion and the nodes. No logic lives here.

pub mod interfaces;
