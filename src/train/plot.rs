//! Loss and validation-error curves as a PNG, written at the end of each epoch.
//!
//! Drawn with `plotters` (bitmap backend, encoded to PNG by the `image` crate) WITHOUT any text:
//! plotters needs a system or bundled font for labels, and CI machines have none. So the image is
//! two framed panels with light grid lines and no labels: left = training loss per optimizer step,
//! right = each validation series per epoch, in [`PALETTE`] order. The numbers and the colour of
//! each series are written beside it as `<name>.json` (see [`write_curves`]), and every value is
//! also in the JSON-lines progress log.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

use super::tensor_io::{write_atomic, TensorIoError};

/// Colour of the training-loss curve.
pub const TRAIN_COLOR: (u8, u8, u8) = (31, 119, 180);
/// Colours of validation series, in order (repeats after the last).
pub const PALETTE: [(u8, u8, u8); 5] = [(214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)];
const GRID: RGBColor = RGBColor(225, 225, 225);

/// Errors of plotting.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Drawing failed.
    #[error("plot `{path}`: {reason}")]
    Draw { path: PathBuf, reason: String },
    /// Writing the image or its legend failed.
    #[error(transparent)]
    Write(#[from] TensorIoError),
}

/// One named curve of `(x, y)` points; non-finite points are skipped when drawing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Curve {
    /// Series name, e.g. `val_action_error_mm`.
    pub name: String,
    /// Points in x order.
    pub points: Vec<(f64, f64)>,
}

/// What the plot shows.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct TrainingCurves {
    /// `(global step, loss)`.
    pub train_loss: Vec<(f64, f64)>,
    /// Validation series over epochs `(epoch, value)`.
    pub validation: Vec<Curve>,
}

#[derive(Serialize)]
struct Legend<'a> {
    image: String,
    left_panel: &'static str,
    right_panel: &'static str,
    train_loss_color: String,
    validation_colors: Vec<(String, String)>,
    data: &'a TrainingCurves,
}

fn hex((r, g, b): (u8, u8, u8)) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// The colour of validation series `i`.
pub fn validation_color(i: usize) -> (u8, u8, u8) {
    PALETTE[i % PALETTE.len()]
}

/// Draws `curves` into a `width x height` PNG at `png_path` and writes the legend and data to
/// `png_path` with extension `.json`. Both files are replaced atomically.
pub fn write_curves(png_path: &Path, curves: &TrainingCurves, width: u32, height: u32) -> Result<(), PlotError> {
    let draw_err = |reason: String| PlotError::Draw { path: png_path.to_path_buf(), reason };
    if width < 64 || height < 32 {
        return Err(draw_err(format!("size {width}x{height} is too small (at least 64x32)")));
    }
    let mut buf = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(e.to_string()))?;
        let panels = root.split_evenly((1, 2));
        let train = [Curve { name: "train_loss".into(), points: curves.train_loss.clone() }];
        draw_panel(&panels[0], &train, |_| TRAIN_COLOR).map_err(draw_err)?;
        draw_panel(&panels[1], &curves.validation, validation_color).map_err(draw_err)?;
        root.present().map_err(|e| draw_err(e.to_string()))?;
    }
    let img = image::RgbImage::from_raw(width, height, buf).ok_or_else(|| draw_err("buffer size".into()))?;
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).map_err(|e| draw_err(e.to_string()))?;
    write_atomic(png_path, png.get_ref())?;

    let legend = Legend {
        image: png_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        left_panel: "training loss (y) per optimizer step (x), linear axes",
        right_panel: "validation series (y) per epoch (x), linear axes, shared y range",
        train_loss_color: hex(TRAIN_COLOR),
        validation_colors: curves.validation.iter().enumerate().map(|(i, c)| (c.name.clone(), hex(validation_color(i)))).collect(),
        data: curves,
    };
    let json = serde_json::to_vec_pretty(&legend).map_err(|e| draw_err(e.to_string()))?;
    write_atomic(&png_path.with_extension("json"), &json)?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// One framed panel with a 4x4 grid and the curves scaled to their joint range.
fn draw_panel(area: &Area<'_>, curves: &[Curve], color: impl Fn(usize) -> (u8, u8, u8)) -> Result<(), String> {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let pts = || curves.iter().flat_map(|c| c.points.iter().filter(finite));
    let (x0, x1) = padded_range(pts().map(|p| p.0), 0.0);
    let (y0, y1) = padded_range(pts().map(|p| p.1), 0.05);
    let mut chart = ChartBuilder::on(area).margin(12).build_cartesian_2d(x0..x1, y0..y1).map_err(|e| e.to_string())?;
    let grid = (1..4).flat_map(|i| {
        let fx = x0 + (x1 - x0) * i as f64 / 4.0;
        let fy = y0 + (y1 - y0) * i as f64 / 4.0;
        [vec![(fx, y0), (fx, y1)], vec![(x0, fy), (x1, fy)]]
    });
    chart.draw_series(grid.map(|l| PathElement::new(l, GRID))).map_err(|e| e.to_string())?;
    let frame = vec![(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)];
    chart.draw_series(std::iter::once(PathElement::new(frame, BLACK))).map_err(|e| e.to_string())?;
    for (i, c) in curves.iter().enumerate() {
        let (r, g, b) = color(i);
        let style = RGBColor(r, g, b).stroke_width(2);
        let points: Vec<(f64, f64)> = c.points.iter().filter(finite).copied().collect();
        if points.len() == 1 {
            chart.draw_series(std::iter::once(Circle::new(points[0], 3, style.filled()))).map_err(|e| e.to_string())?;
        } else {
            chart.draw_series(LineSeries::new(points, style)).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// `(min, max)` of `values` widened by `pad` of the span; a unit range around a single value or
/// `(0, 1)` when empty.
fn padded_range(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let p = (hi - lo) * pad;
    (lo - p, hi + p)
}
