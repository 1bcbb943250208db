//! Camera rendering: a tinted work surface with the two disks (drawn once per episode) and the
//! tool tip drawn per frame. Even views look straight down; odd views look obliquely so the
//! tip's height shows.

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
    background: Vec<u8>,
}

impl CameraView {
    /// Prepares view `index` of `scene`.
    pub fn new(index: usize, width: u32, height: u32, scene: &Scene) -> CameraView {
        let mut v = CameraView { index, width, height, background: Vec::new() };
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
        v.disk(scene.distractor_mm, r, color(scene.distractor_color));
        v.disk(scene.target_mm, r, color(scene.target_color));
        if index % 2 == 0 {
            // A white notch shows the yaw the tool must reach.
            let a = scene.target_yaw_deg.to_radians();
            let c = [scene.target_mm[0] + 0.6 * DISK_MM * a.cos(), scene.target_mm[1] + 0.6 * DISK_MM * a.sin(), scene.target_mm[2]];
            v.disk(c, 0.25 * r, [255, 255, 255]);
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
        let (cx, cy) = self.project(tool.position_mm);
        let half = (TOOL_MM * self.scale()).max(1.0);
        let (w, h) = (self.width as i64, self.height as i64);
        let (x0, x1) = (((cx - half).floor() as i64).max(0), ((cx + half).ceil() as i64).min(w));
        let (y0, y1) = (((cy - half).floor() as i64).max(0), ((cy + half).ceil() as i64).min(h));
        for y in y0..y1 {
            for x in x0..x1 {
                let o = ((y * w + x) * 3) as usize;
                img[o..o + 3].copy_from_slice(&[25, 25, 25]);
            }
        }
        img
    }
}
