//! The curves PNG decodes, has the curves where they belong, is labelled (titles, axis names, tick
//! labels, a legend row per series naming it) with the bundled font, and its JSON lists the colours.

use vla_finetune::train::plot::{
    validation_color, write_curves, Curve, TrainingCurves, MIN_SIZE, PALETTE, SWATCH, TRAIN_COLOR,
};

fn pixels_of(img: &image::RgbImage, rgb: (u8, u8, u8), xs: std::ops::Range<u32>) -> Vec<(u32, u32)> {
    let mut v = Vec::new();
    for x in xs {
        for y in 0..img.height() {
            let p = img.get_pixel(x, y).0;
            if (p[0], p[1], p[2]) == rgb {
                v.push((x, y));
            }
        }
    }
    v
}

fn mean_row(px: &[(u32, u32)]) -> f64 {
    px.iter().map(|p| p.1 as f64).sum::<f64>() / px.len() as f64
}

/// Top-left corners of the solid `SWATCH x SWATCH` squares of colour `rgb` within columns `xs`
/// (a 2-pixel curve never fills such a square), one per square.
fn swatches(img: &image::RgbImage, rgb: (u8, u8, u8), xs: std::ops::Range<u32>) -> Vec<(u32, u32)> {
    let is = |x: u32, y: u32| {
        let p = img.get_pixel(x, y).0;
        (p[0], p[1], p[2]) == rgb
    };
    let mut found: Vec<(u32, u32)> = Vec::new();
    for y in 0..img.height() - SWATCH {
        for x in xs.start..xs.end - SWATCH {
            let inside_found = found.iter().any(|&(fx, fy)| x >= fx && x <= fx + SWATCH && y >= fy && y <= fy + SWATCH);
            if !inside_found && (0..SWATCH).all(|dy| (0..SWATCH).all(|dx| is(x + dx, y + dy))) {
                found.push((x, y));
            }
        }
    }
    found
}

/// Text pixels: anti-aliased black glyphs on white are dark.
fn is_ink(img: &image::RgbImage, x: u32, y: u32) -> bool {
    img.get_pixel(x, y).0.iter().all(|&c| c < 110)
}

/// Columns in `xs` that hold ink in rows `ys`.
fn ink_columns(img: &image::RgbImage, xs: std::ops::Range<u32>, ys: std::ops::Range<u32>) -> Vec<u32> {
    xs.filter(|&x| ys.clone().any(|y| is_ink(img, x, y))).collect()
}

/// Groups of adjacent columns separated by at least `gap` ink-free columns (words, tick labels).
fn clusters(cols: &[u32], gap: u32) -> usize {
    cols.windows(2).filter(|w| w[1] - w[0] > gap).count() + usize::from(!cols.is_empty())
}

fn sample_curves(names: [&str; 2]) -> TrainingCurves {
    // Decreasing loss; one falling and one rising validation series; a NaN that must be skipped.
    let mut train_loss: Vec<(f64, f64)> =
        (0..200).map(|s| (s as f64, 2.0 * (-(s as f64) / 50.0).exp() + 0.1)).collect();
    train_loss[50].1 = f64::NAN;
    TrainingCurves {
        train_loss,
        validation: vec![
            Curve { name: names[0].into(), points: (0..5).map(|e| (e as f64, 1.0 - 0.2 * e as f64)).collect() },
            Curve { name: names[1].into(), points: (0..5).map(|e| (e as f64, 0.2 * e as f64)).collect() },
        ],
    }
}

fn draw(curves: &TrainingCurves, size: (u32, u32)) -> image::RgbImage {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("curves.png");
    write_curves(&png, curves, size.0, size.1).unwrap();
    image::open(&png).unwrap().to_rgb8()
}

#[test]
fn curves_png_has_curves_in_their_panels() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("curves.png");
    let curves = sample_curves(["val_loss", "val_action_error/dim0"]);
    write_curves(&png, &curves, 960, 400).unwrap();
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (960, 400));
    let (w, half) = (img.width(), img.width() / 2);

    // One legend swatch per series, in the right part of its own panel; the curves lie left of it.
    let train_swatch = swatches(&img, TRAIN_COLOR, 0..half);
    assert_eq!(train_swatch.len(), 1, "train legend swatch: {train_swatch:?}");
    let legend_x = train_swatch[0].0;
    assert!(legend_x > half * 2 / 3, "legend column at x={legend_x}");
    let train: Vec<(u32, u32)> = pixels_of(&img, TRAIN_COLOR, 0..legend_x);
    assert!(train.len() > 200, "training curve pixels: {}", train.len());
    assert!(pixels_of(&img, TRAIN_COLOR, half..w).is_empty(), "training curve leaked into the right panel");
    // Decreasing loss: high (small row) at the left end of the curve, low at the right end.
    let (first, last) = (train.iter().map(|p| p.0).min().unwrap(), train.iter().map(|p| p.0).max().unwrap());
    assert!(last - first > 200, "curve spans columns {first}..{last}");
    let early: Vec<_> = train.iter().copied().filter(|p| p.0 < first + 40).collect();
    let late: Vec<_> = train.iter().copied().filter(|p| p.0 > last - 40).collect();
    assert!(mean_row(&early) + 100.0 < mean_row(&late), "early {} late {}", mean_row(&early), mean_row(&late));

    let (s0, s1) = (swatches(&img, validation_color(0), half..w), swatches(&img, validation_color(1), half..w));
    assert!(s0.len() == 1 && s1.len() == 1, "validation swatches {s0:?} {s1:?}");
    assert_eq!(s0[0].0, s1[0].0, "legend rows share a column");
    assert!(s1[0].1 > s0[0].1, "legend rows in series order");
    let val_x = s0[0].0;
    let falling = pixels_of(&img, validation_color(0), half..val_x);
    let rising = pixels_of(&img, validation_color(1), half..val_x);
    assert!(falling.len() > 100 && rising.len() > 100);
    assert!(pixels_of(&img, validation_color(0), 0..half).is_empty());
    let (v0, v1) = (falling.iter().map(|p| p.0).min().unwrap(), falling.iter().map(|p| p.0).max().unwrap());
    let left = |px: &[(u32, u32)]| mean_row(&px.iter().copied().filter(|p| p.0 < v0 + 40).collect::<Vec<_>>());
    let right = |px: &[(u32, u32)]| mean_row(&px.iter().copied().filter(|p| p.0 > v1 - 40).collect::<Vec<_>>());
    assert!(left(&falling) + 100.0 < right(&falling), "falling series must go down");
    assert!(left(&rising) > right(&rising) + 100.0, "rising series must go up");

    let legend: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("curves.json")).unwrap()).unwrap();
    assert_eq!(legend["train_loss_color"], "#1f77b4");
    assert_eq!(legend["validation_colors"][1][0], "val_action_error/dim0");
    assert_eq!(legend["validation_colors"][1][1], "#2ca02c");
    assert_eq!(legend["data"]["validation"][0]["points"][1][1], 0.8);
}

#[test]
fn legend_rows_show_the_series_names() {
    // The same curves under a one-letter and a 21-letter name: the legend text beside the swatch
    // is present and its width follows the name.
    let ink_beside_swatch = |names: [&str; 2]| {
        let img = draw(&sample_curves(names), (960, 400));
        let half = img.width() / 2;
        let (x, y) = swatches(&img, validation_color(0), half..img.width())[0];
        let cols = ink_columns(&img, x + SWATCH + 1..img.width(), y.saturating_sub(3)..y + SWATCH + 3);
        let span = cols.last().map_or(0, |l| l - cols[0] + 1);
        // Nothing but the name: no ink in the gap before the next row's swatch.
        let (_, y1) = swatches(&img, validation_color(1), half..img.width())[0];
        assert!(y1 > y + SWATCH + 3);
        (cols.len(), span)
    };
    let (short_cols, short_span) = ink_beside_swatch(["a", "b"]);
    let (long_cols, long_span) = ink_beside_swatch(["val_action_error/dim0", "b"]);
    assert!((3..=12).contains(&short_span), "`a` is {short_span} px wide");
    assert!(long_span > 100, "`val_action_error/dim0` is {long_span} px wide");
    assert!(long_cols > 8 * short_cols, "ink columns: {long_cols} vs {short_cols}");

    // The training panel's legend names `train_loss`.
    let img = draw(&sample_curves(["a", "b"]), (960, 400));
    let (x, y) = swatches(&img, TRAIN_COLOR, 0..img.width() / 2)[0];
    let cols = ink_columns(&img, x + SWATCH + 1..img.width() / 2, y.saturating_sub(3)..y + SWATCH + 3);
    let span = cols.last().unwrap() - cols[0] + 1;
    assert!((45..=100).contains(&span), "`train_loss` is {span} px wide");
}

#[test]
fn panels_have_titles_axis_names_and_tick_labels() {
    let img = draw(&sample_curves(["val_loss", "val_action_error/dim0"]), (960, 400));
    let (w, h, half) = (img.width(), img.height(), img.width() / 2);
    for panel in [0..half, half..w] {
        // The plotting frame: the longest black row and column of the panel.
        let black = |x: u32, y: u32| img.get_pixel(x, y).0 == [0, 0, 0];
        let row_len = |y: u32| panel.clone().filter(|&x| black(x, y)).count();
        let col_len = |x: u32| (0..h).filter(|&y| black(x, y)).count();
        let rows: Vec<u32> = (0..h).filter(|&y| row_len(y) > 200).collect();
        let (top, bottom) = (*rows.first().unwrap(), *rows.last().unwrap());
        let left = panel.clone().find(|&x| col_len(x) > 200).unwrap();
        assert!(bottom - top > 200 && left > panel.start + 30, "frame rows {top}..{bottom}, left {left}");

        // Title above the frame: one or more words, centred-ish over the chart.
        let title = ink_columns(&img, panel.clone(), 0..top - 2);
        assert!(title.len() > 30, "title ink columns {}", title.len());
        // Tick labels just below the x axis: several separate numbers.
        let ticks = ink_columns(&img, left..panel.end, bottom + 3..bottom + 18);
        assert!(clusters(&ticks, 8) >= 3, "x tick labels: {} clusters", clusters(&ticks, 8));
        // Axis name under the tick labels.
        assert!(!ink_columns(&img, left..panel.end, bottom + 20..h).is_empty(), "x axis name");
        // y tick labels (horizontal numbers) and the rotated y axis name left of the frame.
        let y_ticks = ink_columns(&img, panel.start + 22..left - 2, top..bottom);
        assert!(y_ticks.len() > 10, "y tick label columns {}", y_ticks.len());
        assert!(!ink_columns(&img, panel.start..panel.start + 22, top..bottom).is_empty(), "y axis name");
    }
}

#[test]
fn too_many_series_end_the_legend_with_a_count() {
    // 30 series at the minimum height: the legend column holds fewer rows, the last one text only.
    let validation: Vec<Curve> = (0..30)
        .map(|i| Curve {
            name: format!("val_action_error/dim{i}"),
            points: vec![(0.0, i as f64), (1.0, i as f64 + 1.0)],
        })
        .collect();
    let img = draw(&TrainingCurves { train_loss: vec![(0.0, 1.0), (1.0, 0.5)], validation }, MIN_SIZE);
    let (w, half) = (img.width(), img.width() / 2);
    let mut rows: Vec<(u32, u32)> = PALETTE.iter().flat_map(|&c| swatches(&img, c, half..w)).collect();
    rows.sort_by_key(|p| p.1);
    assert!(rows.len() >= 5 && rows.len() < 30, "{} legend swatches", rows.len());
    assert!(rows.iter().all(|p| p.0 == rows[0].0), "one column: {rows:?}");
    let step = rows[1].1 - rows[0].1;
    let below = rows.last().unwrap().1 + step;
    let count_row = ink_columns(&img, rows[0].0..w, below.saturating_sub(3)..below + SWATCH + 3);
    assert!(count_row.len() > 30, "the `+N more` row has {} ink columns", count_row.len());
    assert!(count_row[0] < rows[0].0 + SWATCH, "the count row starts where the swatches are");
}

#[test]
fn empty_and_single_point_curves_still_draw() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("e.png");
    let curves =
        TrainingCurves { train_loss: vec![], validation: vec![Curve { name: "val".into(), points: vec![(0.0, 3.0)] }] };
    write_curves(&png, &curves, MIN_SIZE.0, MIN_SIZE.1).unwrap();
    let img = image::open(&png).unwrap().to_rgb8();
    let half = MIN_SIZE.0 / 2;
    let legend_x = swatches(&img, validation_color(0), half..MIN_SIZE.0)[0].0;
    assert!(!pixels_of(&img, validation_color(0), half..legend_x).is_empty(), "a single point is drawn as a dot");
    let err = write_curves(&png, &curves, MIN_SIZE.0 - 1, MIN_SIZE.1).unwrap_err().to_string();
    assert!(err.contains("too small") && err.contains(&format!("{}x{}", MIN_SIZE.0, MIN_SIZE.1)), "{err}");
}
