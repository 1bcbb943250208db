//! The data the runtime passes to and from models: observations, VL features, action chunks and
//! checkpoint metadata.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use crate::dataset::episode::RgbImage;

use super::error::RuntimeError;

/// The latest frame of one camera.
#[derive(Debug, Clone)]
pub struct CameraFrame {
    /// Camera name (as configured).
    pub name: String,
    /// RGB8 image.
    pub image: Arc<RgbImage>,
    /// Header stamp, ns.
    pub stamp_ns: i64,
}

/// The last `samples()` samples of the sensor, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorWindow {
    /// Values per sample (1026 = force + A-scan).
    pub channels: usize,
    /// `samples x channels` values, row-major (sample-major).
    pub values: Vec<f32>,
    /// Stamp of each sample, ns.
    pub stamps_ns: Vec<i64>,
}

impl SensorWindow {
    /// Number of samples.
    pub fn samples(&self) -> usize {
        self.stamps_ns.len()
    }

    /// Sample `i` (oldest = 0).
    pub fn sample(&self, i: usize) -> &[f32] {
        &self.values[i * self.channels..(i + 1) * self.channels]
    }
}

/// The latest robot state.
#[derive(Debug, Clone, PartialEq)]
pub struct RobotState {
    /// State values (pose `[x y z]` mm, `[roll pitch yaw]` deg, or joints).
    pub values: Vec<f64>,
    /// Header stamp, ns.
    pub stamp_ns: i64,
}

/// Everything a model sees at one control tick.
#[derive(Debug, Clone)]
pub struct Observation {
    /// Latest frame per camera, in configured order.
    pub frames: Vec<CameraFrame>,
    /// Sensor window (the configured number of samples).
    pub sensor: SensorWindow,
    /// Robot state, when an input for it is configured.
    pub state: Option<RobotState>,
    /// Language instruction.
    pub instruction: String,
    /// Runtime clock time at which the snapshot was taken.
    pub taken_at: Duration,
}

/// VL features computed by a [`VlEncoder`](super::model::VlEncoder), opaque to the runtime. The
/// encoder stores whatever its action model needs (e.g. a pooled feature tensor) and the model
/// reads it back with [`VlFeatures::get`].
pub struct VlFeatures {
    /// Version of the encoder that computed them (set by the runtime).
    pub version: String,
    /// `taken_at` of the observation they were computed from (set by the runtime).
    pub obs_taken_at: Duration,
    data: Box<dyn Any + Send>,
}

impl std::fmt::Debug for VlFeatures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VlFeatures").field("version", &self.version).field("obs_taken_at", &self.obs_taken_at).finish()
    }
}

impl VlFeatures {
    /// Wraps an encoder's output.
    pub fn new<T: Any + Send>(data: T) -> Self {
        Self { version: String::new(), obs_taken_at: Duration::ZERO, data: Box::new(data) }
    }

    /// The encoder's output, if it is a `T`.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.data.downcast_ref::<T>()
    }
}

/// An action chunk in physical units.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionChunk {
    /// Checkpoint version that produced it (set by the runtime from the active model).
    pub version: String,
    /// Steps in the chunk.
    pub horizon: usize,
    /// Values per step.
    pub action_dim: usize,
    /// Seconds between consecutive steps.
    pub step_period_s: f32,
    /// `horizon x action_dim` values, row-major.
    pub values: Vec<f32>,
}

impl ActionChunk {
    /// Step `i` of the chunk.
    pub fn step(&self, i: usize) -> &[f32] {
        &self.values[i * self.action_dim..(i + 1) * self.action_dim]
    }

    /// Checks the size against `io` and that every value is finite.
    pub fn validate(&self, version: &str, io: &IoSpec) -> Result<(), RuntimeError> {
        if self.horizon != io.horizon
            || self.action_dim != io.action_dim
            || self.values.len() != io.horizon * io.action_dim
        {
            return Err(RuntimeError::ActionShape {
                version: version.to_string(),
                actual: self.values.len(),
                horizon: io.horizon,
                action_dim: io.action_dim,
            });
        }
        if let Some(i) = self.values.iter().position(|v| !v.is_finite()) {
            return Err(RuntimeError::NonFinite {
                version: version.to_string(),
                step: i / io.action_dim,
                dim: i % io.action_dim,
                value: self.values[i],
            });
        }
        Ok(())
    }
}

/// The input and output shapes a checkpoint is built for; the runtime is configured with the
/// shapes it feeds and expects, and refuses checkpoints that differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoSpec {
    /// Camera views, in order.
    pub cameras: Vec<String>,
    /// Sensor channels per sample.
    pub sensor_channels: usize,
    /// Sensor samples per window.
    pub sensor_window: usize,
    /// Robot state values (0 = no state input).
    pub state_dim: usize,
    /// Action steps per chunk.
    pub horizon: usize,
    /// Values per action step.
    pub action_dim: usize,
}

impl IoSpec {
    /// `Ok` when a checkpoint declaring `actual` fits a runtime expecting `self`; otherwise the
    /// first mismatching field.
    pub fn check_compatible(&self, version: &str, actual: &IoSpec) -> Result<(), RuntimeError> {
        let fields: [(&str, String, String); 6] = [
            ("cameras", self.cameras.join(","), actual.cameras.join(",")),
            ("sensor_channels", self.sensor_channels.to_string(), actual.sensor_channels.to_string()),
            ("sensor_window", self.sensor_window.to_string(), actual.sensor_window.to_string()),
            ("state_dim", self.state_dim.to_string(), actual.state_dim.to_string()),
            ("horizon", self.horizon.to_string(), actual.horizon.to_string()),
            ("action_dim", self.action_dim.to_string(), actual.action_dim.to_string()),
        ];
        for (field, expected, got) in fields {
            if expected != got {
                return Err(RuntimeError::Incompatible {
                    version: version.to_string(),
                    field: field.to_string(),
                    expected,
                    actual: got,
                });
            }
        }
        Ok(())
    }
}

/// What a loader's verification learned about a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointMeta {
    /// Version (`v0001`, ...), as the manifest says.
    pub version: String,
    /// Identity of the base VL model the checkpoint belongs to.
    pub base_model_id: String,
    /// Shapes it is built for.
    pub io: IoSpec,
    /// sha256 of `manifest.json` (hex), to report which exact checkpoint is running.
    pub manifest_sha256: String,
}
