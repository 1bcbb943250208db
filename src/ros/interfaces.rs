//! The `vla_finetune_msgs` interfaces as Rust types.
//!
//! On a ROS 2 machine r2r generates them from the sourced `vla_finetune_msgs` package. r2r's
//! `doc-only` bindings (used by CI, which has no ROS 2) hold only standard packages, so under the
//! `ros-doc-only` feature hand-written stand-ins with the same fields take their place; a test
//! (`tests/ros_interfaces.rs`) fails when they drift from the `.msg`/`.srv` files.

#[cfg(not(feature = "ros-doc-only"))]
pub use r2r::vla_finetune_msgs::{msg, srv};

#[cfg(feature = "ros-doc-only")]
#[path = "interfaces_standin.rs"]
mod standin;
#[cfg(feature = "ros-doc-only")]
pub use standin::{msg, srv};
