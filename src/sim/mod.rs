//! Simulated robot: cameras, a 650 Hz tactile/OCT-like sensor and a pose stream, deterministic from a seed.
//!
//! Each episode draws a scene: three notched disks on a work surface, two of the same colour (the
//! target and its twin) and one of another colour. The instruction names the target by colour and
//! by where it lies relative to its twin ("insert the needle into the left red target"), so only a
//! model that grounds both words in the images finds it. Each episode also draws its lighting and
//! small camera offsets. The tool starts above the surface, moves over the target (with dynamics
//! noise), turns to the yaw of the target's notch and descends into it. Cameras render the disks
//! and the tool; the sensor's force and A-scan change when the tip touches the surface. Messages
//! come out as CDR bytes with header stamps on a simulated clock, in stamp order.

mod config;
mod episode;
mod render;
mod robot;
mod scene;
mod sensor;
pub mod truth;

pub use config::{camera_topic, SimConfig, POSE_TOPIC, SENSOR_TOPIC};
pub use episode::{SimEpisode, SimMessage};
pub use render::{lit, CameraView};
pub use robot::{Robot, ToolPose};
pub use scene::{Disk, Scene, COLORS};
