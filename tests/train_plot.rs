//! The curves PNG decodes, has the curves where they belong, and its legend lists the colours.

use vla_finetune::train::plot::{validation_color, write_curves, Curve, TrainingCurves, TRAIN_COLOR};

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

#[test]
fn curves_png_has_curves_in_their_panels() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("curves.png");
    // Decreasing loss; one rising and one falling validation series; a NaN that must be skipped.
    let mut train_loss: Vec<(f64, f64)> = (0..200).map(|s| (s as f64, 2.0 * (-(s as f64) / 50.0).exp() + 0.1)).collect();
    train_loss[50].1 = f64::NAN;
    let curves = TrainingCurves {
        train_loss,
        validation: vec![
            Curve { name: "val_loss".into(), points: (0..5).map(|e| (e as f64, 1.0 - 0.2 * e as f64)).collect() },
            Curve { name: "val_action_error_mm".into(), points: (0..5).map(|e| (e as f64, 0.2 * e as f64)).collect() },
        ],
    };
    write_curves(&png, &curves, 640, 320).unwrap();
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (640, 320));

    let (w, half) = (img.width(), img.width() / 2);
    let train = pixels_of(&img, TRAIN_COLOR, 0..half);
    assert!(train.len() > 200, "training curve pixels: {}", train.len());
    assert!(pixels_of(&img, TRAIN_COLOR, half..w).is_empty(), "training curve leaked into the right panel");
    // Decreasing loss: high (small row) at the left end of the panel, low at the right end.
    let early = pixels_of(&img, TRAIN_COLOR, 12..60);
    let late = pixels_of(&img, TRAIN_COLOR, half - 60..half - 12);
    assert!(!early.is_empty() && !late.is_empty());
    assert!(mean_row(&early) + 100.0 < mean_row(&late), "early {} late {}", mean_row(&early), mean_row(&late));

    let falling = pixels_of(&img, validation_color(0), half..w);
    let rising = pixels_of(&img, validation_color(1), half..w);
    assert!(falling.len() > 100 && rising.len() > 100);
    assert!(pixels_of(&img, validation_color(0), 0..half).is_empty());
    let left = |px: &[(u32, u32)]| mean_row(&px.iter().copied().filter(|p| p.0 < half + 80).collect::<Vec<_>>());
    let right = |px: &[(u32, u32)]| mean_row(&px.iter().copied().filter(|p| p.0 > w - 80).collect::<Vec<_>>());
    assert!(left(&falling) < right(&falling), "falling series must go down");
    assert!(left(&rising) > right(&rising), "rising series must go up");

    let legend: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("curves.json")).unwrap()).unwrap();
    assert_eq!(legend["train_loss_color"], "#1f77b4");
    assert_eq!(legend["validation_colors"][1][0], "val_action_error_mm");
    assert_eq!(legend["data"]["validation"][0]["points"][1][1], 0.8);
}

#[test]
fn empty_and_single_point_curves_still_draw() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("e.png");
    let curves = TrainingCurves {
        train_loss: vec![],
        validation: vec![Curve { name: "val".into(), points: vec![(0.0, 3.0)] }],
    };
    write_curves(&png, &curves, 200, 100).unwrap();
    let img = image::open(&png).unwrap().to_rgb8();
    assert!(!pixels_of(&img, validation_color(0), 100..200).is_empty(), "a single point is drawn as a dot");
    assert!(write_curves(&png, &curves, 10, 10).is_err());
}
