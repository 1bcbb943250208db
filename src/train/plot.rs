//! Loss and validation-error curves as a PNG, written at the end of each epoch.
//!
//! Drawn with `plotters` (bitmap backend, encoded to PNG by the `image` crate) and labelled in
//! DejaVu Sans, whose bytes are compiled into the binary (the `dejavu` crate, registered in
//! plotters' `ab_glyph` font table), so no system font is needed (CI machines have none). Two
//! panels side by side, each a titled chart with named axes, tick labels and light grid lines,
//! with its legend (a [`SWATCH`]-pixel colour square and the series name per row) in a column to
//! the right of the chart: left = training loss per optimizer step, right = each validation
//! series per epoch on a shared y range, in [`PALETTE`] order. The numbers and the colour of each
//! series are also written beside the image as `<name>.json` (see [`write_curves`]), and every
//! value is in the JSON-lines progress log.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;
use serde::Serialize;

use crate::atomic_file::{write as write_atomic, WriteError};

/// Colour of the training-loss curve.
pub const TRAIN_COLOR: (u8, u8, u8) = (31, 119, 180);
/// Colours of validation series, in order (repeats after the last).
pub const PALETTE: [(u8, u8, u8); 9] = [
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (23, 190, 207),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
];
/// Colour of all text: titles, axis names, tick labels and legend entries.
pub const TEXT_COLOR: (u8, u8, u8) = (0, 0, 0);
/// Side in pixels of the filled colour square in front of each legend entry.
pub const SWATCH: u32 = 10;
/// The smallest image [`write_curves`] draws, `(width, height)`: room for the labels.
pub const MIN_SIZE: (u32, u32) = (480, 240);
const GRID: RGBColor = RGBColor(225, 225, 225);
/// The family the bundled font is registered under (plotters' name for sans-serif).
const FONT: &str = "sans-serif";
const TITLE_PX: f64 = 16.0;
const AXIS_NAME_PX: f64 = 13.0;
const TICK_PX: f64 = 12.0;
const LEGEND_PX: f64 = 12.0;
const LEGEND_ROW_PX: i32 = 18;
/// Top of the first legend row: level with the top of the plotting area, below the title.
const LEGEND_TOP_PX: i32 = 34;

/// Errors of plotting.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Drawing failed.
    #[error("plot `{path}`: {reason}")]
    Draw { path: PathBuf, reason: String },
    /// Writing the image or its legend failed.
    #[error(transparent)]
    Write(#[from] WriteError),
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
    if width < MIN_SIZE.0 || height < MIN_SIZE.1 {
        return Err(draw_err(format!("size {width}x{height} is too small (at least {}x{})", MIN_SIZE.0, MIN_SIZE.1)));
    }
    register_bundled_font().map_err(draw_err)?;
    let mut buf = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(e.to_string()))?;
        let panels = root.split_evenly((1, 2));
        let train = [Curve { name: "train_loss".into(), points: curves.train_loss.clone() }];
        let left =
            PanelSpec { title: "Loss per optimizer step", x_name: "optimizer step", y_name: "loss", curves: &train };
        draw_panel(&panels[0], &left, |_| TRAIN_COLOR).map_err(draw_err)?;
        let right =
            PanelSpec { title: "Validation per epoch", x_name: "epoch", y_name: "value", curves: &curves.validation };
        draw_panel(&panels[1], &right, validation_color).map_err(draw_err)?;
        root.present().map_err(|e| draw_err(e.to_string()))?;
    }
    write_png(png_path, width, height, buf)?;

    let legend = Legend {
        image: png_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        left_panel: "training loss (y) per optimizer step (x), linear axes",
        right_panel: "validation series (y) per epoch (x), linear axes, shared y range",
        train_loss_color: hex(TRAIN_COLOR),
        validation_colors: curves
            .validation
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), hex(validation_color(i))))
            .collect(),
        data: curves,
    };
    let json = serde_json::to_vec_pretty(&legend).map_err(|e| draw_err(e.to_string()))?;
    write_atomic(&png_path.with_extension("json"), &json)?;
    Ok(())
}

/// Panels of named curves side by side (curves in [`PALETTE`] order) into a `width x height`
/// PNG at `png_path`, replaced atomically; their data go to `png_path` with extension `.json`.
pub fn write_panels(png_path: &Path, panels: &[PanelSpec<'_>], width: u32, height: u32) -> Result<(), PlotError> {
    let draw_err = |reason: String| PlotError::Draw { path: png_path.to_path_buf(), reason };
    if width < MIN_SIZE.0 || height < MIN_SIZE.1 || panels.is_empty() {
        return Err(draw_err(format!(
            "size {width}x{height} with {} panels: at least {}x{} and one panel",
            panels.len(),
            MIN_SIZE.0,
            MIN_SIZE.1
        )));
    }
    register_bundled_font().map_err(draw_err)?;
    let mut buf = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(e.to_string()))?;
        for (area, panel) in root.split_evenly((1, panels.len())).iter().zip(panels) {
            draw_panel(area, panel, validation_color).map_err(draw_err)?;
        }
        root.present().map_err(|e| draw_err(e.to_string()))?;
    }
    write_png(png_path, width, height, buf)?;
    let data: Vec<_> = panels
        .iter()
        .map(|p| serde_json::json!({ "title": p.title, "x": p.x_name, "y": p.y_name, "curves": p.curves }))
        .collect();
    let json = serde_json::to_vec_pretty(&data).map_err(|e| draw_err(e.to_string()))?;
    write_atomic(&png_path.with_extension("json"), &json)?;
    Ok(())
}

/// Encodes an RGB buffer as PNG and writes it atomically.
fn write_png(png_path: &Path, width: u32, height: u32, buf: Vec<u8>) -> Result<(), PlotError> {
    let draw_err = |reason: String| PlotError::Draw { path: png_path.to_path_buf(), reason };
    let img = image::RgbImage::from_raw(width, height, buf).ok_or_else(|| draw_err("buffer size".into()))?;
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).map_err(|e| draw_err(e.to_string()))?;
    Ok(write_atomic(png_path, png.get_ref())?)
}

/// Registers the bundled DejaVu Sans as [`FONT`] once per process.
fn register_bundled_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
                .map_err(|_| "the bundled DejaVu Sans font does not parse as a TrueType font".to_string())
        })
        .clone()
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// What one panel shows.
pub struct PanelSpec<'a> {
    /// Title above the chart.
    pub title: &'a str,
    /// Name of the x axis.
    pub x_name: &'a str,
    /// Name of the y axis.
    pub y_name: &'a str,
    /// The curves.
    pub curves: &'a [Curve],
}

fn text_style(px: f64) -> TextStyle<'static> {
    const INK: RGBColor = RGBColor(TEXT_COLOR.0, TEXT_COLOR.1, TEXT_COLOR.2);
    TextStyle::from((FONT, px).into_font()).color(&INK)
}

/// A titled chart with named axes and tick labels, the curves scaled to their joint range, and
/// the legend in a column to its right.
fn draw_panel(area: &Area<'_>, panel: &PanelSpec<'_>, color: impl Fn(usize) -> (u8, u8, u8)) -> Result<(), String> {
    let legend_style = text_style(LEGEND_PX);
    let text_width = |t: &str| area.estimate_text_size(t, &legend_style).map(|(w, _)| w).map_err(|e| e.to_string());
    // The legend column takes at most a third of the panel; longer names are shortened with `…`.
    let max_text = area.dim_in_pixel().0 / 3 - SWATCH - 14;
    let mut names = Vec::with_capacity(panel.curves.len());
    for c in panel.curves {
        names.push(fit_text(&c.name, max_text, &text_width)?);
    }
    let mut widest = 0;
    for n in &names {
        widest = widest.max(text_width(n)?);
    }
    let (chart_area, legend_area) = area.split_horizontally(area.dim_in_pixel().0 - (widest + SWATCH + 14));

    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let pts = || panel.curves.iter().flat_map(|c| c.points.iter().filter(finite));
    let (x0, x1) = padded_range(pts().map(|p| p.0), 0.0);
    let (y0, y1) = padded_range(pts().map(|p| p.1), 0.05);
    let mut chart = ChartBuilder::on(&chart_area)
        .margin(8)
        .caption(panel.title, text_style(TITLE_PX))
        .x_label_area_size(38)
        .y_label_area_size(58)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    let x_label = |x: &f64| if (x - x.round()).abs() < 1e-9 { format!("{x:.0}") } else { String::new() };
    let y_label = tick_label(y1 - y0);
    chart
        .configure_mesh()
        .x_desc(panel.x_name)
        .y_desc(panel.y_name)
        .axis_desc_style(text_style(AXIS_NAME_PX))
        .label_style(text_style(TICK_PX))
        .x_labels(((x1 - x0).floor() as usize + 1).clamp(2, 6))
        .y_labels(5)
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(|e| e.to_string())?;
    let frame = vec![(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)];
    chart.draw_series(std::iter::once(PathElement::new(frame, BLACK))).map_err(|e| e.to_string())?;
    for (i, c) in panel.curves.iter().enumerate() {
        let (r, g, b) = color(i);
        let style = RGBColor(r, g, b).stroke_width(2);
        let points: Vec<(f64, f64)> = c.points.iter().filter(finite).copied().collect();
        if points.len() == 1 {
            chart.draw_series(std::iter::once(Circle::new(points[0], 3, style.filled()))).map_err(|e| e.to_string())?;
        } else {
            chart.draw_series(LineSeries::new(points, style)).map_err(|e| e.to_string())?;
        }
    }

    // Legend rows; when they do not all fit, the last row says how many are left out.
    let rows = ((legend_area.dim_in_pixel().1 as i32 - LEGEND_TOP_PX) / LEGEND_ROW_PX).max(1) as usize;
    let shown = if names.len() > rows { rows - 1 } else { names.len() };
    let swatch = SWATCH as i32;
    for (i, name) in names.iter().take(shown).enumerate() {
        let y = LEGEND_TOP_PX + i as i32 * LEGEND_ROW_PX;
        let (r, g, b) = color(i);
        legend_area
            .draw(&Rectangle::new([(2, y), (2 + swatch, y + swatch)], RGBColor(r, g, b).filled()))
            .map_err(|e| e.to_string())?;
        legend_area.draw_text(name, &legend_style, (swatch + 8, y - 1)).map_err(|e| e.to_string())?;
    }
    if shown < names.len() {
        let y = LEGEND_TOP_PX + shown as i32 * LEGEND_ROW_PX;
        let more = format!("+{} more (see .json)", names.len() - shown);
        legend_area
            .draw_text(&fit_text(&more, max_text + SWATCH + 6, &text_width)?, &legend_style, (2, y - 1))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `text`, or its longest prefix followed by `…` that is at most `max_px` wide.
fn fit_text(text: &str, max_px: u32, width: &impl Fn(&str) -> Result<u32, String>) -> Result<String, String> {
    if width(text)? <= max_px {
        return Ok(text.to_string());
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let short: String = chars.iter().chain(std::iter::once(&'…')).collect();
        if width(&short)? <= max_px {
            return Ok(short);
        }
    }
    Ok("…".to_string())
}

/// Formats y tick values of an axis spanning `span` with as many decimals as about five ticks
/// need; scientific notation for very large or very small magnitudes.
fn tick_label(span: f64) -> impl Fn(&f64) -> String {
    let step = span / 5.0;
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    move |v: &f64| {
        let v = if v.abs() < step * 1e-6 { 0.0 } else { *v };
        if decimals > 4 || v.abs() >= 1e5 {
            format!("{v:.1e}")
        } else {
            format!("{v:.decimals$}")
        }
    }
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
