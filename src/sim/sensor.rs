//! The tactile/OCT-like sensor: channel 0 is the axial force (N), the rest an A-scan whose surface
//! reflection moves with the tip's distance to the surface and changes shape on contact.

use rand::rngs::StdRng;
use rand::Rng;

use super::{Scene, ToolPose};

/// A-scan samples per mm of distance.
const PX_PER_MM: f64 = 20.0;
/// Contact stiffness, N/mm.
const STIFFNESS: f64 = 0.35;

/// Sensor model with its precomputed background profile.
pub struct SensorModel {
    background: Vec<f32>,
}

impl SensorModel {
    /// A model for `channels` channels (1 force + `channels - 1` A-scan samples).
    pub fn new(channels: usize) -> SensorModel {
        let n = channels.saturating_sub(1);
        SensorModel { background: (0..n).map(|i| 0.15 * (-(i as f32) / 300.0).exp()).collect() }
    }

    /// One sample for the tip at `tool`.
    pub fn sample(&self, scene: &Scene, tool: &ToolPose, rng: &mut StdRng) -> Vec<f32> {
        let gap = tool.position_mm[2] - scene.target_mm[2];
        let depth = (-gap).max(0.0);
        let mut out = Vec::with_capacity(self.background.len() + 1);
        out.push((STIFFNESS * depth + rng.gen_range(-0.005..0.005)) as f32);
        let n = self.background.len() as f64;
        // Surface echo: at the gap distance while approaching, pinned near the probe on contact,
        // where a second (tissue layer) echo appears deeper with the penetration depth.
        let echo_at = if depth > 0.0 { 40.0 } else { (40.0 + gap * PX_PER_MM).min(n + 50.0) };
        let layer_at = 40.0 + 60.0 + depth * PX_PER_MM;
        let contact = depth > 0.0;
        for (i, b) in self.background.iter().enumerate() {
            let x = i as f64;
            let mut v = *b as f64 + rng.gen_range(-0.01..0.01);
            v += (if contact { 1.6 } else { 1.0 }) * (-((x - echo_at) / 4.0).powi(2)).exp();
            if contact {
                v += 0.7 * (-((x - layer_at) / 6.0).powi(2)).exp();
            }
            out.push(v as f32);
        }
        out
    }
}
