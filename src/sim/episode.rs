//! [`SimEpisode`]: one episode's messages, as CDR bytes in stamp order.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::dataset::cdr::{Header, Image, MsgType, PoseStamped, RosMessage, SensorFrame, Time};

use super::*;

impl SimConfig {
    /// The messages of episode `index`: `seconds` of data starting at `start_ns` on the sim clock.
    pub fn episode(&self, index: u64, start_ns: i64, seconds: f64) -> SimEpisode {
        let seed = self.episode_seed(index);
        let mut rng = StdRng::seed_from_u64(seed);
        let scene = Scene::draw(&mut rng);
        let robot = Robot::new(&scene, &mut rng);
        let views = (0..self.cameras).map(|i| CameraView::new(i, self.width, self.height, &scene)).collect();
        let period = |hz: f64| 1e9 / hz;
        let mut streams = Vec::new();
        for i in 0..self.cameras {
            streams.push(Stream { kind: Kind::Camera(i), period_ns: period(self.camera_hz), n: 0 });
        }
        streams.push(Stream { kind: Kind::Sensor, period_ns: period(self.sensor_hz), n: 0 });
        streams.push(Stream { kind: Kind::Pose, period_ns: period(self.pose_hz), n: 0 });
        SimEpisode {
            cfg: self.clone(),
            scene,
            robot,
            views,
            streams,
            start_ns,
            end_ns: start_ns + (seconds * 1e9) as i64,
            robot_ns: start_ns,
            rng: StdRng::seed_from_u64(seed ^ 0x5555),
            sensor: sensor::SensorModel::new(self.sensor_channels),
            camera_topics: (0..self.cameras).map(camera_topic).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Camera(usize),
    Sensor,
    Pose,
}

#[derive(Debug, Clone)]
struct Stream {
    kind: Kind,
    period_ns: f64,
    n: u64,
}

/// One simulated message.
#[derive(Debug, Clone, PartialEq)]
pub struct SimMessage {
    /// Topic.
    pub topic: String,
    /// ROS type.
    pub type_name: &'static str,
    /// CDR bytes.
    pub cdr: Vec<u8>,
    /// Header stamp, ns.
    pub stamp_ns: i64,
    /// Simulated receive time (stamp + transport latency), ns.
    pub recv_ns: i64,
}

/// The message stream of one simulated episode, in stamp order.
pub struct SimEpisode {
    cfg: SimConfig,
    scene: Scene,
    robot: Robot,
    views: Vec<CameraView>,
    streams: Vec<Stream>,
    start_ns: i64,
    end_ns: i64,
    robot_ns: i64,
    rng: StdRng,
    sensor: sensor::SensorModel,
    camera_topics: Vec<String>,
}

impl SimEpisode {
    /// The scene.
    pub fn scene(&self) -> &Scene {
        &self.scene
    }

    /// The tool pose at the current simulated time.
    pub fn tool(&self) -> ToolPose {
        self.robot.pose()
    }

    fn advance_robot(&mut self, t_ns: i64) {
        // The robot integrates at 1 kHz regardless of what is published.
        const DT_NS: i64 = 1_000_000;
        while self.robot_ns + DT_NS <= t_ns {
            self.robot.step(1e-3, &mut self.rng);
            self.robot_ns += DT_NS;
        }
    }
}

impl Iterator for SimEpisode {
    type Item = SimMessage;

    fn next(&mut self) -> Option<SimMessage> {
        let (si, t) = self
            .streams
            .iter()
            .enumerate()
            .map(|(i, s)| (i, self.start_ns + (s.n as f64 * s.period_ns).round() as i64))
            .min_by_key(|&(i, t)| (t, i))?;
        if t >= self.end_ns {
            return None;
        }
        self.streams[si].n += 1;
        self.advance_robot(t);
        let header = Header { stamp: Time::from_ns(t), frame_id: String::new() };
        let tool = self.robot.pose();
        let msg = match self.streams[si].kind {
            Kind::Camera(i) => {
                let latency = self.rng.gen_range(4_000_000..12_000_000);
                let data = self.views[i].render(&tool);
                let img = Image {
                    header: Header { frame_id: format!("camera{i}"), ..header },
                    height: self.cfg.height,
                    width: self.cfg.width,
                    encoding: "rgb8".into(),
                    is_bigendian: 0,
                    step: self.cfg.width * 3,
                    data,
                };
                SimMessage {
                    topic: self.camera_topics[i].clone(),
                    type_name: MsgType::Image.name(),
                    cdr: img.encode(),
                    stamp_ns: t,
                    recv_ns: t + latency,
                }
            }
            Kind::Sensor => {
                let latency = self.rng.gen_range(200_000..1_000_000);
                let values = self.sensor.sample(&self.scene, &tool, &mut self.rng);
                let f = SensorFrame {
                    header: Header { frame_id: "oct".into(), ..header },
                    channels: values.len() as u32,
                    values,
                    layout: format!("force,ascan[{}]", self.cfg.sensor_channels - 1),
                };
                SimMessage {
                    topic: SENSOR_TOPIC.into(),
                    type_name: MsgType::SensorFrame.name(),
                    cdr: f.encode(),
                    stamp_ns: t,
                    recv_ns: t + latency,
                }
            }
            Kind::Pose => {
                let latency = self.rng.gen_range(500_000..2_000_000);
                let measured = tool.measured(&mut self.rng);
                let p = PoseStamped {
                    header: Header { frame_id: "base".into(), ..header },
                    position: measured.position_m(),
                    orientation: measured.quaternion(),
                };
                SimMessage {
                    topic: POSE_TOPIC.into(),
                    type_name: MsgType::PoseStamped.name(),
                    cdr: p.encode(),
                    stamp_ns: t,
                    recv_ns: t + latency,
                }
            }
        };
        Some(msg)
    }
}
