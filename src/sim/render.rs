//! Camera rendering: a tinted work surface with the scene's disks and their notches (drawn once
//! per episode, under the episode's lighting and camera offset) and the tool tip drawn per frame.
//! Even views look straight down and show the tool's yaw; odd views look obliquely so the tip's
//! height shows.

use super::{Scene, ToolPose, COLORS};

/// Disk radius, mm.
const DISK_MM: f64 = 10.0;
/// Half size of the tool marker, mm.
const TOOL_MM: f64 = 2.5;

/// One camera with its static background.
#[derive(Debug, Clone)]
pub struct CameraView {
    index: usize,
    width: u32,
    height: u32,
    /// The episode's camera offset, mm.
    offset_mm: [f64; 2],
    light: [f64; 3],
    background: Vec<u8>,
}

/// Colour of the tool marker and of the notches.
const TOOL_RGB: [u8; 3] = [25, 25, 25];
const NOTCH_RGB: [u8; 3] = [255, 255, 255];

impl CameraView {
    /// Prepares view `index` of `scene`.
    pub fn new(index: usize, width: u32, height: u32, scene: &Scene) -> CameraView {
        let mut v = CameraView {
            index,
            width,
            height,
            offset_mm: scene.camera_offset_mm[index % 4],
            light: scene.light,
            background: Vec::new(),
        };
        let (w, h) = (width as usize, height as usize);
        let tint = [(index * 37 % 60) as u8, (index * 23 % 40) as u8, (index * 53 % 50) as u8];
        let mut bg = vec![0u8; w * h * 3];
        for y in 0..h {
            let shade = 120 + (60 * y / h.max(1)) as u8;
            for x in 0..w {
                let o = (y * w + x) * 3;
                bg[o] = shade.saturating_sub(tint[0]);
                bg[o + 1] = shade.saturating_sub(tint[1]);
                bg[o + 2] = shade.saturating_sub(tint[2]);
            }
        }
        v.background = bg;
        let color = |name: &str| COLORS.iter().find(|(n, _)| *n == name).map(|(_, c)| *c).expect("known colour");
        let r = DISK_MM * v.scale();
        for d in scene.others.iter().chain([&scene.target()]) {
            v.disk(d.mm, r, color(d.color));
            if index % 2 == 0 {
                // A white notch shows the disk's yaw; the target's is the yaw the tool must reach.
                let a = d.yaw_deg.to_radians();
                v.disk(
                    [d.mm[0] + 0.6 * DISK_MM * a.cos(), d.mm[1] + 0.6 * DISK_MM * a.sin(), d.mm[2]],
                    0.25 * r,
                    NOTCH_RGB,
                );
            }
        }
        let light = v.light;
        for px in v.background.chunks_exact_mut(3) {
            for (c, g) in px.iter_mut().zip(light) {
                *c = lit(*c, g);
            }
        }
        v
    }

    /// Pixels per mm.
    fn scale(&self) -> f64 {
        self.width as f64 / (240.0 + 10.0 * (self.index / 2) as f64)
    }

    /// Projects a point (mm) to pixel coordinates.
    pub fn project(&self, p: [f64; 3]) -> (f64, f64) {
        let s = self.scale();
        let p = [p[0] + self.offset_mm[0], p[1] + self.offset_mm[1], p[2]];
        let shift = 5.0 * (self.index / 2) as f64;
        let (w, h) = (self.width as f64, self.height as f64);
        if self.index % 2 == 0 {
            (w / 2.0 + (p[0] + shift) * s, h / 2.0 + p[1] * s)
        } else {
            (w / 2.0 + (p[0] - shift) * s, h * 0.6 + p[1] * s * 0.5 - p[2] * s)
        }
    }

    fn disk(&mut self, center: [f64; 3], r: f64, rgb: [u8; 3]) {
        let (cx, cy) = self.project(center);
        let ry = if self.index % 2 == 0 { r } else { r * 0.5 };
        let (w, h) = (self.width as i64, self.height as i64);
        let (x0, x1) = (((cx - r).floor() as i64).max(0), ((cx + r).ceil() as i64).min(w - 1));
        let (y0, y1) = (((cy - ry).floor() as i64).max(0), ((cy + ry).ceil() as i64).min(h - 1));
        for y in y0..=y1 {
            for x in x0..=x1 {
                let (dx, dy) = ((x as f64 + 0.5 - cx) / r, (y as f64 + 0.5 - cy) / ry);
                if dx * dx + dy * dy <= 1.0 {
                    let o = ((y * w + x) * 3) as usize;
                    self.background[o..o + 3].copy_from_slice(&rgb);
                }
            }
        }
    }

    /// Renders one RGB8 frame with the tool at `tool`.
    pub fn render(&self, tool: &ToolPose) -> Vec<u8> {
        let mut img = self.background.clone();
        let tool_rgb = [0, 1, 2].map(|k| lit(TOOL_RGB[k], self.light[k]));
        let half = (TOOL_MM * self.scale()).max(1.0);
        let (cx, cy) = self.project(tool.position_mm);
        self.fill(&mut img, (cx - half, cy - half), (cx + half, cy + half), tool_rgb);
        if self.index % 2 == 0 {
            // A light bar from the tip along the tool's yaw.
            let a = tool.yaw_deg.to_radians();
            let notch = [0, 1, 2].map(|k| lit(NOTCH_RGB[k], self.light[k]));
            let steps = (3.0 * TOOL_MM * self.scale()).ceil() as usize;
            for i in 0..=steps {
                let d = i as f64 / self.scale();
                let (x, y) = self.project([
                    tool.position_mm[0] + d * a.cos(),
                    tool.position_mm[1] + d * a.sin(),
                    tool.position_mm[2],
                ]);
                self.fill(&mut img, (x - 0.5, y - 0.5), (x + 0.5, y + 0.5), notch);
            }
        }
        img
    }

    /// Fills the pixels of `img` whose cells overlap the box `[lo, hi)`, clipped to the image.
    fn fill(&self, img: &mut [u8], lo: (f64, f64), hi: (f64, f64), rgb: [u8; 3]) {
        let (w, h) = (self.width as i64, self.height as i64);
        let (x0, x1) = ((lo.0.floor() as i64).max(0), (hi.0.ceil() as i64).min(w));
        let (y0, y1) = ((lo.1.floor() as i64).max(0), (hi.1.ceil() as i64).min(h));
        for y in y0..y1 {
            for x in x0..x1 {
                let o = ((y * w + x) * 3) as usize;
                img[o..o + 3].copy_from_slice(&rgb);
            }
        }
    }
}

/// A channel value under lighting gain `g`.
pub fn lit(c: u8, g: f64) -> u8 {
    (c as f64 * g).round().clamp(0.0, 255.0) as u8
}
