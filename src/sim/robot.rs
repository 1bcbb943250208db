//! Tool-tip kinematics: over the target, turn to its yaw, descend into the surface.

use rand::rngs::StdRng;
use rand::Rng;

use super::Scene;
use crate::dataset::align::wrap_deg;

/// Height above the surface where the approach ends and the descent starts, mm.
const HOVER_MM: f64 = 15.0;
/// How deep the tip goes below the surface, mm.
const INSERT_MM: f64 = 3.0;
/// Lateral speed limit, mm/s.
const SPEED_MM_S: f64 = 40.0;
/// Descent speed, mm/s.
const DESCENT_MM_S: f64 = 6.0;
/// Turn rate limit, deg/s.
const TURN_DEG_S: f64 = 60.0;

/// The tool tip pose: position in mm, yaw in degrees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ToolPose {
    /// `[x, y, z]`, mm.
    pub position_mm: [f64; 3],
    /// Yaw, degrees in (-180, 180].
    pub yaw_deg: f64,
}

impl ToolPose {
    /// Position in metres (ROS units).
    pub fn position_m(&self) -> [f64; 3] {
        self.position_mm.map(|v| v / 1000.0)
    }

    /// Orientation `[x, y, z, w]`: a rotation of `yaw_deg` about z.
    pub fn quaternion(&self) -> [f64; 4] {
        let h = self.yaw_deg.to_radians() / 2.0;
        [0.0, 0.0, h.sin(), h.cos()]
    }

    /// The pose as a noisy sensor reports it (0.05 mm, 0.05 deg).
    pub fn measured(&self, rng: &mut StdRng) -> ToolPose {
        let mut p = *self;
        for v in &mut p.position_mm {
            *v += rng.gen_range(-0.05..0.05);
        }
        p.yaw_deg = wrap_deg(p.yaw_deg + rng.gen_range(-0.05..0.05));
        p
    }
}

/// The simulated arm.
#[derive(Debug, Clone)]
pub struct Robot {
    pose: ToolPose,
    target_mm: [f64; 3],
    target_yaw: f64,
}

impl Robot {
    /// Starts at a random pose above the work surface.
    pub fn new(scene: &Scene, rng: &mut StdRng) -> Robot {
        let pose = ToolPose {
            position_mm: [rng.gen_range(-80.0..80.0), rng.gen_range(-50.0..50.0), rng.gen_range(35.0..50.0)],
            yaw_deg: wrap_deg(rng.gen_range(-180.0..180.0)),
        };
        Robot { pose, target_mm: scene.target_mm, target_yaw: scene.target_yaw_deg }
    }

    /// The true pose.
    pub fn pose(&self) -> ToolPose {
        self.pose
    }

    /// Advances by `dt` seconds with small dynamics noise.
    pub fn step(&mut self, dt: f64, rng: &mut StdRng) {
        let p = &mut self.pose.position_mm;
        let dx = self.target_mm[0] - p[0];
        let dy = self.target_mm[1] - p[1];
        let lateral = (dx * dx + dy * dy).sqrt();
        let max = SPEED_MM_S * dt;
        let s = if lateral > max { max / lateral } else { 1.0 };
        p[0] += dx * s + rng.gen_range(-0.002..0.002);
        p[1] += dy * s + rng.gen_range(-0.002..0.002);
        let dyaw = wrap_deg(self.target_yaw - self.pose.yaw_deg);
        let turn = dyaw.clamp(-TURN_DEG_S * dt, TURN_DEG_S * dt);
        self.pose.yaw_deg = wrap_deg(self.pose.yaw_deg + turn);
        let aligned = lateral < 1.0 && dyaw.abs() < 2.0;
        let goal_z = self.target_mm[2] + if aligned { -INSERT_MM } else { HOVER_MM };
        let dz = goal_z - p[2];
        let vz = if aligned { DESCENT_MM_S } else { SPEED_MM_S };
        p[2] += dz.clamp(-vz * dt, vz * dt);
    }
}
