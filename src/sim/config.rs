//! [`SimConfig`]: the simulator's settings, topics and stream mapping.

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::dataset::cdr::MsgType;
use crate::dataset::streams::{Reliability, StreamConfig, StreamQos, StreamSpec};

use super::*;

/// Simulator settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Seed; episode `i` uses a seed derived from it and `i`.
    pub seed: u64,
    /// Number of camera views.
    pub cameras: usize,
    /// Image width.
    pub width: u32,
    /// Image height.
    pub height: u32,
    /// Camera rate.
    pub camera_hz: f64,
    /// Sensor rate.
    pub sensor_hz: f64,
    /// Sensor channels: 1 force + the A-scan.
    pub sensor_channels: usize,
    /// Pose rate.
    pub pose_hz: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 0,
            cameras: 2,
            width: 640,
            height: 360,
            camera_hz: 10.0,
            sensor_hz: 650.0,
            sensor_channels: 1026,
            pose_hz: 100.0,
        }
    }
}

/// Topic of camera `i`.
pub fn camera_topic(i: usize) -> String {
    format!("/sim/camera{i}/image_raw")
}
/// Topic of the sensor.
pub const SENSOR_TOPIC: &str = "/sim/oct/frame";
/// Topic of the tool pose.
pub const POSE_TOPIC: &str = "/sim/robot/pose";

/// QoS of the simulated cameras: best effort, as camera drivers publish.
fn best_effort(depth: usize) -> StreamQos {
    StreamQos { reliability: Reliability::BestEffort, depth }
}

/// QoS of the simulated sensor and pose: reliable.
fn reliable(depth: usize) -> StreamQos {
    StreamQos { reliability: Reliability::Reliable, depth }
}

impl SimConfig {
    /// The stream mapping of what the simulator publishes, with the QoS it publishes with.
    pub fn streams(&self) -> StreamConfig {
        let camera_age = 1500.0 / self.camera_hz;
        let mut c = StreamConfig {
            cameras: (0..self.cameras)
                .map(|i| StreamSpec {
                    name: format!("camera{i}"),
                    topic: camera_topic(i),
                    msg_type: MsgType::Image.name().into(),
                    max_age_ms: Some(camera_age),
                    channels: None,
                    rate_hz: Some(self.camera_hz),
                    qos: Some(best_effort(10)),
                })
                .collect(),
            sensors: vec![StreamSpec {
                name: "oct".into(),
                topic: SENSOR_TOPIC.into(),
                msg_type: MsgType::SensorFrame.name().into(),
                max_age_ms: Some(10.0),
                channels: Some(self.sensor_channels),
                rate_hz: Some(self.sensor_hz),
                qos: Some(reliable(1000)),
            }],
            state: StreamSpec {
                name: "pose".into(),
                topic: POSE_TOPIC.into(),
                msg_type: MsgType::PoseStamped.name().into(),
                max_age_ms: Some(30.0),
                channels: None,
                rate_hz: Some(self.pose_hz),
                qos: Some(reliable(1000)),
            },
            command: None,
        };
        c.validate("simulator").expect("simulator mapping is valid");
        c
    }

    /// The scene of episode `index`.
    pub fn scene(&self, index: u64) -> Scene {
        Scene::draw(&mut StdRng::seed_from_u64(self.episode_seed(index)))
    }

    pub(super) fn episode_seed(&self, index: u64) -> u64 {
        self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_add(1).wrapping_mul(0xBF58_476D_1CE4_E5B9)
    }
}
