//! Stream mapping: which topics are cameras, sensors, robot state and commands, with their message
//! types and the maximum age a sample may have when aligned. Loaded from YAML
//! (see `config/streams_sim.yaml`).

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::cdr::MsgType;

/// Errors loading or validating a stream mapping.
#[derive(Debug, Error)]
pub enum StreamsError {
    /// The file could not be read.
    #[error("cannot read stream mapping {path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The YAML does not parse into the expected shape.
    #[error("stream mapping {path}: {source}")]
    Yaml {
        /// File.
        path: String,
        /// Cause.
        source: serde_yaml::Error,
    },
    /// A stream has a type its role does not accept, a duplicate, or an unknown type.
    #[error("stream mapping {path}: {message}")]
    Invalid {
        /// File.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The role a topic plays in an episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// An image stream.
    Camera,
    /// A multi-channel sensor stream.
    Sensor,
    /// The robot state.
    State,
    /// The recorded commands.
    Command,
}

/// One mapped topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    /// Stream name used by alignment (defaults to the topic without its leading `/`).
    #[serde(default)]
    pub name: String,
    /// ROS topic.
    pub topic: String,
    /// Message type, `pkg/msg/Type` or `pkg/Type`.
    #[serde(rename = "type")]
    pub msg_type: String,
    /// Maximum age (ms) of the latest sample at a sample time before the sample is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<f64>,
    /// Expected channel count (sensors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    /// Nominal publish rate; with it a live recorder counts messages missing between stamps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_hz: Option<f64>,
    /// Subscription QoS of a live recorder (default: best effort, depth 100, which matches
    /// reliable and best-effort publishers alike).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<StreamQos>,
}

/// Delivery guarantee of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reliability {
    /// Retransmit lost samples (the publisher must offer it).
    Reliable,
    /// Take what arrives; matches every publisher.
    BestEffort,
}

/// Quality of service of one stream's subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQos {
    /// Delivery guarantee.
    pub reliability: Reliability,
    /// Samples kept by the middleware before the oldest is discarded.
    #[serde(default = "default_qos_depth")]
    pub depth: usize,
}

fn default_qos_depth() -> usize {
    100
}

impl Default for StreamQos {
    fn default() -> Self {
        Self { reliability: Reliability::BestEffort, depth: default_qos_depth() }
    }
}

impl StreamSpec {
    /// The stream's subscription QoS (its `qos`, or [`StreamQos::default`]).
    pub fn qos(&self) -> StreamQos {
        self.qos.unwrap_or_default()
    }

    /// The parsed message type (validated at load).
    pub fn kind(&self) -> MsgType {
        MsgType::parse(&self.msg_type).expect("validated when the mapping was loaded")
    }
}

/// The whole mapping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Image streams, in order.
    #[serde(default)]
    pub cameras: Vec<StreamSpec>,
    /// Sensor streams.
    #[serde(default)]
    pub sensors: Vec<StreamSpec>,
    /// Robot state.
    pub state: StreamSpec,
    /// Optional command stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<StreamSpec>,
}

impl StreamConfig {
    /// Loads and validates a YAML mapping.
    pub fn load(path: &Path) -> Result<StreamConfig, StreamsError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| StreamsError::Io { path: p.clone(), source })?;
        Self::from_yaml(&text, &p)
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<StreamConfig, StreamsError> {
        let mut c: StreamConfig =
            serde_yaml::from_str(text).map_err(|source| StreamsError::Yaml { path: origin.to_string(), source })?;
        c.validate(origin)?;
        Ok(c)
    }

    /// Serializes to YAML.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("stream mapping serializes")
    }

    /// Checks types per role, fills default names, rejects duplicates.
    pub fn validate(&mut self, origin: &str) -> Result<(), StreamsError> {
        let invalid = |message: String| StreamsError::Invalid { path: origin.to_string(), message };
        let mut topics = BTreeSet::new();
        let mut names = BTreeSet::new();
        let groups: Vec<(Role, &mut StreamSpec)> = self
            .cameras
            .iter_mut()
            .map(|s| (Role::Camera, s))
            .chain(self.sensors.iter_mut().map(|s| (Role::Sensor, s)))
            .chain(std::iter::once((Role::State, &mut self.state)))
            .chain(self.command.iter_mut().map(|s| (Role::Command, s)))
            .collect();
        for (role, s) in groups {
            let t = MsgType::parse(&s.msg_type).map_err(|e| invalid(format!("topic `{}`: {e}", s.topic)))?;
            let ok = match role {
                Role::Camera => matches!(t, MsgType::Image | MsgType::CompressedImage),
                Role::Sensor => matches!(t, MsgType::SensorFrame | MsgType::Float32MultiArray | MsgType::WrenchStamped),
                Role::State | Role::Command => matches!(t, MsgType::PoseStamped | MsgType::JointState),
            };
            if !ok {
                return Err(invalid(format!(
                    "topic `{}` has type {} which a {role:?} stream cannot have",
                    s.topic,
                    t.name()
                )));
            }
            s.msg_type = t.name().to_string();
            if !s.topic.starts_with('/') {
                return Err(invalid(format!("topic `{}` must start with `/`", s.topic)));
            }
            if s.name.is_empty() {
                s.name = s.topic.trim_start_matches('/').to_string();
            }
            if let Some(a) = s.max_age_ms {
                if !(a.is_finite() && a > 0.0) {
                    return Err(invalid(format!("topic `{}`: max_age_ms must be a positive number, got {a}", s.topic)));
                }
            }
            if let Some(r) = s.rate_hz {
                if !(r.is_finite() && r > 0.0) {
                    return Err(invalid(format!("topic `{}`: rate_hz must be a positive number, got {r}", s.topic)));
                }
            }
            if s.qos.is_some_and(|q| q.depth == 0) {
                return Err(invalid(format!("topic `{}`: qos.depth must be at least 1", s.topic)));
            }
            if !topics.insert(s.topic.clone()) {
                return Err(invalid(format!("topic `{}` is mapped twice", s.topic)));
            }
            if !names.insert(s.name.clone()) {
                return Err(invalid(format!("stream name `{}` is used twice", s.name)));
            }
        }
        Ok(())
    }

    /// Every mapped stream with its role, cameras first.
    pub fn all(&self) -> Vec<(Role, &StreamSpec)> {
        self.cameras
            .iter()
            .map(|s| (Role::Camera, s))
            .chain(self.sensors.iter().map(|s| (Role::Sensor, s)))
            .chain(std::iter::once((Role::State, &self.state)))
            .chain(self.command.iter().map(|s| (Role::Command, s)))
            .collect()
    }

    /// The stream mapped to `topic`.
    pub fn find_topic(&self, topic: &str) -> Option<(Role, &StreamSpec)> {
        self.all().into_iter().find(|(_, s)| s.topic == topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_wrong_role_type_and_duplicates() {
        let bad = "cameras:\n  - {topic: /cam, type: geometry_msgs/PoseStamped}\nstate: {topic: /pose, type: geometry_msgs/PoseStamped}\n";
        let e = StreamConfig::from_yaml(bad, "x.yaml").unwrap_err().to_string();
        assert!(e.contains("/cam") && e.contains("Camera"), "{e}");
        let dup = "cameras:\n  - {topic: /pose, type: sensor_msgs/Image}\nstate: {topic: /pose, type: geometry_msgs/PoseStamped}\n";
        assert!(StreamConfig::from_yaml(dup, "x.yaml").unwrap_err().to_string().contains("twice"));
        let unknown = "state: {topic: /pose, type: foo/Bar}\n";
        assert!(StreamConfig::from_yaml(unknown, "x.yaml").unwrap_err().to_string().contains("foo/Bar"));
        let ok =
            StreamConfig::from_yaml("state: {topic: /robot/pose, type: geometry_msgs/PoseStamped}\n", "x").unwrap();
        assert_eq!(ok.state.name, "robot/pose");
        assert_eq!(ok.state.msg_type, "geometry_msgs/msg/PoseStamped");
    }
}
