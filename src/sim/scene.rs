//! [`Scene`]: the disks of one episode and the instruction that names the target.

use rand::rngs::StdRng;
use rand::Rng;

use crate::dataset::align::wrap_deg;

/// Target colours and their RGB values.
pub const COLORS: [(&str, [u8; 3]); 4] =
    [("red", [220, 40, 40]), ("green", [40, 190, 60]), ("blue", [40, 80, 230]), ("yellow", [230, 210, 40])];

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
    pub(super) fn draw(rng: &mut StdRng) -> Scene {
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
        let others = vec![
            Disk { color: COLORS[ti].0, mm: twin_mm, yaw_deg: twin_yaw },
            Disk { color: COLORS[di].0, mm: distractor_mm, yaw_deg: distractor_yaw },
        ];
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
