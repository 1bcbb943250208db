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

mod render;
mod robot;
mod sensor;
pub mod truth;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::dataset::align::wrap_deg;
use crate::dataset::cdr::{Header, Image, MsgType, PoseStamped, RosMessage, SensorFrame, Time};
use crate::dataset::streams::{Reliability, StreamConfig, StreamQos, StreamSpec};

pub use render::{lit, CameraView};
pub use robot::{Robot, ToolPose};

/// Target colours and their RGB values.
pub const COLORS: [(&str, [u8; 3]); 4] = [("red", [220, 40, 40]), ("green", [40, 190, 60]), ("blue", [40, 80, 230]), ("yellow", [230, 210, 40])];

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
        SimConfig { seed: 0, cameras: 2, width: 640, height: 360, camera_hz: 10.0, sensor_hz: 650.0, sensor_channels: 1026, pose_hz: 100.0 }
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
                .map(|i| StreamSpec { name: format!("camera{i}"), topic: camera_topic(i), msg_type: MsgType::Image.name().into(), max_age_ms: Some(camera_age), channels: None, rate_hz: Some(self.camera_hz), qos: Some(best_effort(10)) })
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
            state: StreamSpec { name: "pose".into(), topic: POSE_TOPIC.into(), msg_type: MsgType::PoseStamped.name().into(), max_age_ms: Some(30.0), channels: None, rate_hz: Some(self.pose_hz), qos: Some(reliable(1000)) },
            command: None,
        };
        c.validate("simulator").expect("simulator mapping is valid");
        c
    }

    /// The scene of episode `index`.
    pub fn scene(&self, index: u64) -> Scene {
        Scene::draw(&mut StdRng::seed_from_u64(self.episode_seed(index)))
    }

    fn episode_seed(&self, index: u64) -> u64 {
        self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_add(1).wrapping_mul(0xBF58_476D_1CE4_E5B9)
    }

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

/// A notched disk on the work surface.
#[derive(Debug, Clone, PartialEq)]
pub struct Disk {
    /// Colour name (one of [`COLORS`]).
    pub color: &'static str,
    /// Centre, mm (`z` is the surface height).
    pub mm: [f64; 3],
    /// Direction of the disk's notch, degrees.
    pub yaw_deg: f64,
}

/// What an episode is about.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// Colour name of the target.
    pub target_color: &'static str,
    /// Target centre on the surface, mm (`z` is the surface height).
    pub target_mm: [f64; 3],
    /// Yaw the tool must reach (the target's notch), degrees in (-180, 180].
    pub target_yaw_deg: f64,
    /// Where the target lies relative to its twin: "left", "right", "upper" or "lower" (image
    /// directions of the top view: x grows to the right, y downwards).
    pub relation: &'static str,
    /// The other disks: the twin (same colour as the target) first, then the distractor.
    pub others: Vec<Disk>,
    /// Per-episode lighting: gain per RGB channel applied to the whole picture.
    pub light: [f64; 3],
    /// Per-episode camera offsets, mm on the surface, for views `i % 4`.
    pub camera_offset_mm: [[f64; 2]; 4],
}

/// Half extents of the area the disks are drawn in, mm.
const AREA_MM: [f64; 2] = [60.0, 40.0];
/// Minimum distance between disk centres, mm.
const CLEARANCE_MM: f64 = 30.0;

impl Scene {
    fn draw(rng: &mut StdRng) -> Scene {
        let ti = rng.gen_range(0..COLORS.len());
        let di = (ti + rng.gen_range(1..COLORS.len())) % COLORS.len();
        let point = |placed: &[[f64; 3]], rng: &mut StdRng| loop {
            let p = [rng.gen_range(-AREA_MM[0]..AREA_MM[0]), rng.gen_range(-AREA_MM[1]..AREA_MM[1]), 0.0];
            if placed.iter().all(|q: &[f64; 3]| (p[0] - q[0]).hypot(p[1] - q[1]) > CLEARANCE_MM) {
                break p;
            }
        };
        let target_mm = point(&[], rng);
        // The twin lies clearly to one side of the target along the axis that names the relation.
        let twin_mm = loop {
            let q = point(&[target_mm], rng);
            let (dx, dy) = (target_mm[0] - q[0], target_mm[1] - q[1]);
            if dx.abs().max(dy.abs()) > 1.5 * dx.abs().min(dy.abs()) {
                break q;
            }
        };
        let distractor_mm = point(&[target_mm, twin_mm], rng);
        let (dx, dy) = (target_mm[0] - twin_mm[0], target_mm[1] - twin_mm[1]);
        let relation = match (dx.abs() >= dy.abs(), dx < 0.0, dy < 0.0) {
            (true, true, _) => "left",
            (true, false, _) => "right",
            (false, _, true) => "upper",
            (false, _, false) => "lower",
        };
        let mut yaw = || wrap_deg(rng.gen_range(-180.0..180.0));
        let (target_yaw_deg, twin_yaw, distractor_yaw) = (yaw(), yaw(), yaw());
        let others = vec![Disk { color: COLORS[ti].0, mm: twin_mm, yaw_deg: twin_yaw }, Disk { color: COLORS[di].0, mm: distractor_mm, yaw_deg: distractor_yaw }];
        let brightness = rng.gen_range(0.7..1.2);
        let light = [0; 3].map(|_| brightness * rng.gen_range(0.9..1.1));
        let camera_offset_mm = [[0.0; 2]; 4].map(|_| [rng.gen_range(-6.0..6.0), rng.gen_range(-6.0..6.0)]);
        Scene { target_color: COLORS[ti].0, target_mm, target_yaw_deg, relation, others, light, camera_offset_mm }
    }

    /// The target as a disk.
    pub fn target(&self) -> Disk {
        Disk { color: self.target_color, mm: self.target_mm, yaw_deg: self.target_yaw_deg }
    }

    /// The instruction given for this scene.
    pub fn instruction(&self) -> String {
        format!("insert the needle into the {} {} target", self.relation, self.target_color)
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
                SimMessage { topic: self.camera_topics[i].clone(), type_name: MsgType::Image.name(), cdr: img.encode(), stamp_ns: t, recv_ns: t + latency }
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
                SimMessage { topic: SENSOR_TOPIC.into(), type_name: MsgType::SensorFrame.name(), cdr: f.encode(), stamp_ns: t, recv_ns: t + latency }
            }
            Kind::Pose => {
                let latency = self.rng.gen_range(500_000..2_000_000);
                let measured = tool.measured(&mut self.rng);
                let p = PoseStamped { header: Header { frame_id: "base".into(), ..header }, position: measured.position_m(), orientation: measured.quaternion() };
                SimMessage { topic: POSE_TOPIC.into(), type_name: MsgType::PoseStamped.name(), cdr: p.encode(), stamp_ns: t, recv_ns: t + latency }
            }
        };
        Some(msg)
    }
}
