//! The policy runtime (ROS-free): control loop at a fixed rate, latest inputs with staleness
//! guards, background VL refresh, verified hot-swap with roll-back.
//!
//! A node feeds [`InputBuffers`] (frames, sensor samples, state), announces checkpoints through an
//! [`Announcer`] (or lets the runtime watch a checkpoints folder), and forwards [`ActionEvent`]s and
//! [`PolicyStatus`] from the [`RuntimeHandle`]. A model plugs in through [`ModelLoader`],
//! [`VlEncoder`] and [`ActionModel`].

pub mod clock;
pub mod control;
pub mod error;
pub mod hotswap;
pub mod inputs;
pub mod model;
pub mod operator;
pub mod output;
mod refresh;
pub mod runner;
pub mod schedule;
pub mod settings;
pub mod types;
pub mod vla;

pub use clock::{Clock, ManualClock, SystemClock};
pub use control::{ActionEvent, ControlConfig, ControlCore, PolicyStatus, RuntimeNotice, StaleBehavior};
pub use error::RuntimeError;
pub use hotswap::{Announcement, Announcer};
pub use inputs::{CameraInput, InputBuffers, InputConfig, SensorInput, Snapshot, StaleInput, StateInput};
pub use model::{ActionModel, LoadedModel, ModelLoader, VlEncoder};
pub use operator::{Operator, OperatorCommand, OperatorReply};
pub use runner::{build, start, RuntimeConfig, RuntimeHandle, WatchConfig};
pub use schedule::{TickScheduler, TickSlot};
pub use settings::{RuntimeSettings, Shapes};
pub use types::{ActionChunk, CameraFrame, CheckpointMeta, IoSpec, Observation, RobotState, SensorWindow, VlFeatures};
pub use vla::{action_seed, VlaLoader};
