//! LeRobot v3.0 both ways, against lerobot 0.6.1 itself (in `.venv-lerobot`, Python 3.12,
//! `make lerobot-venv`): a dataset we export loads with `LeRobotDataset` with our values and
//! statistics; a dataset lerobot's own writer made imports, compiles and trains a Stage 2 epoch
//! on the tiny model; export -> import gives back the same samples; bad input is refused with
//! what was expected.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use arrow_array::{Array, ArrayRef, BinaryArray, Int64Array, RecordBatch, StructArray};
use safetensors::SafeTensors;
use vla_finetune::dataset::compile::{compile_lazily, CompileConfig};
use vla_finetune::dataset::lerobot::export::{export, ExportOptions, PictureMode, CHUNK_FEATURE};
use vla_finetune::dataset::lerobot::format;
use vla_finetune::dataset::lerobot::import::{import, ImportMapping, ImportOptions, DROP_HORIZON, DROP_WINDOW};
use vla_finetune::dataset::lerobot::LeRobotError;
use vla_finetune::dataset::reader::Dataset;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The lerobot venv's Python; a missing venv fails the test with the command that makes it.
fn lerobot_python() -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv-lerobot/bin/python"));
    assert!(
        p.is_file(),
        "{} is missing: run `make lerobot-venv` (lerobot 0.6.1 in a Python 3.12 venv) before these tests",
        p.display()
    );
    p
}

fn run_script(script: &str, args: &[&str]) {
    let out =
        Command::new(lerobot_python()).arg(Path::new(ROOT).join("scripts").join(script)).args(args).output().unwrap();
    assert!(out.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

struct Fixture {
    _dir: tempfile::TempDir,
    /// The recorded episodes.
    rec: PathBuf,
    /// A compiled dataset of simulated recordings (2 cameras, sensor window 16 x C).
    dataset: PathBuf,
    /// Its LeRobot export.
    exported: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("rec");
        vla_finetune::cli::record::run(vla_finetune::cli::record::RecordArgs {
            sim: true,
            episodes: 3,
            seconds: 1.6,
            out: rec.clone(),
            seed: 5,
            cameras: 2,
            width: 48,
            height: 40,
            camera_hz: 10.0,
            sensor_hz: 650.0,
            pose_hz: 100.0,
            realtime: false,
            queue: 4096,
            queue_mb: 64,
            compression: vla_finetune::dataset::mcap_episode::Compression::Zstd,
            operator: "test".into(),
            json: true,
        })
        .unwrap();
        let eps = vla_finetune::cli::open_recorded_episodes(&rec).unwrap();
        let mut cc = CompileConfig::default();
        cc.align.sensor_window_s = 0.05;
        cc.align.sensor_samples = 16;
        cc.split.val_fraction = 0.34;
        let dataset = dir.path().join("compiled");
        compile_lazily(&eps, &cc, &dataset, false).unwrap();
        let exported = dir.path().join("lerobot");
        export(&dataset, &exported, &ExportOptions::default(), &mut |_, _| {}).unwrap();
        Fixture { _dir: dir, rec, dataset, exported }
    })
}

/// Sample indices in export order: episodes in index order, samples in stored order.
fn export_order(ds: &Dataset) -> Vec<usize> {
    let mut order: Vec<usize> = (0..ds.len()).collect();
    order.sort_by_key(|&i| ds.index.samples[i].episode);
    order
}

fn f32s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    (t.shape().to_vec(), t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
}

fn i64s(st: &SafeTensors, name: &str) -> Vec<i64> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
    t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
}

/// `|a - b| <= 1e-6 |b|` (plus 1e-9 for values at 0).
fn assert_rel(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-6 * y.abs() + 1e-9, "{what}[{i}]: {x} vs {y}");
    }
}

fn json_f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// Per-channel mean/std/min/max over rows of `dims` values, in f64 (numpy's definitions).
fn plain_stats(values: &[f32], dims: usize) -> [Vec<f64>; 4] {
    let n = (values.len() / dims) as f64;
    let col = |c: usize| values.iter().skip(c).step_by(dims).map(|&v| v as f64);
    let mean: Vec<f64> = (0..dims).map(|c| col(c).sum::<f64>() / n).collect();
    let std = (0..dims).map(|c| (col(c).map(|v| (v - mean[c]).powi(2)).sum::<f64>() / n).sqrt()).collect();
    let min = (0..dims).map(|c| col(c).fold(f64::INFINITY, f64::min)).collect();
    let max = (0..dims).map(|c| col(c).fold(f64::NEG_INFINITY, f64::max)).collect();
    [mean, std, min, max]
}

#[test]
fn our_export_loads_in_lerobot_with_our_values_and_statistics() {
    let f = fixture();
    check_in_lerobot(&f.dataset, &f.exported, "image", 2.0 / 255.0);
}

#[test]
fn an_export_in_several_files_and_chunks_loads_in_lerobot() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("small_files");
    let opts = ExportOptions { chunks_size: 2, data_files_size_in_mb: 1, ..Default::default() };
    let r = export(&f.dataset, &out, &opts, &mut |_, _| {}).unwrap();
    assert_eq!(r.data_files, 3, "one episode per file of at most 1 MB");
    assert!(out.join("data/chunk-001/file-000.parquet").is_file());
    check_in_lerobot(&f.dataset, &out, "image", 2.0 / 255.0);
}

/// The ffmpeg binary of the lerobot venv (imageio-ffmpeg; these machines have no system one).
fn ffmpeg() -> PathBuf {
    let out = Command::new(lerobot_python())
        .args(["-c", "import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "imageio-ffmpeg missing from .venv-lerobot: run `make lerobot-venv`\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

#[test]
fn video_export_loads_in_lerobot_and_imports_back() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("video");
    // Files of at most 1 MB, 2 per chunk: an episode per file, the third in chunk-001.
    let opts = ExportOptions {
        pictures: PictureMode::Video,
        ffmpeg: Some(ffmpeg()),
        chunks_size: 2,
        data_files_size_in_mb: 1,
        ..Default::default()
    };
    let r = export(&f.dataset, &out, &opts, &mut |_, _| {}).unwrap();
    assert_eq!(r.data_files, 3);
    assert!(out.join("data/chunk-001/file-000.parquet").is_file());
    assert!(out.join("videos/observation.images.camera1/chunk-001/file-000.mp4").is_file());
    check_in_lerobot(&f.dataset, &out, "video", 4.0 / 255.0);
    // Without ffmpeg the import says so (none on PATH on these machines).
    if vla_finetune::dataset::lerobot::video::find_ffmpeg(None).is_err() {
        let e =
            import(&out, &ImportMapping::default(), &dir.path().join("x"), &ImportOptions::default(), &mut |_, _| {})
                .unwrap_err();
        assert!(e.to_string().contains("ffmpeg was not found on PATH"), "{e}");
    }
    // Back: the same samples, frames within the video tolerance of ours.
    let back = dir.path().join("back");
    let io = ImportOptions { ffmpeg: Some(ffmpeg()), ..Default::default() };
    let ir = import(&out, &ImportMapping::default(), &back, &io, &mut |_, _| {}).unwrap();
    assert_eq!(ir.samples, r.frames);
    let (a, b) = (Dataset::open(&f.dataset).unwrap(), Dataset::open(&back).unwrap());
    let mut worst = 0.0f64;
    for (j, &i) in export_order(&a).iter().enumerate() {
        let (x, y) = (a.sample(i).unwrap(), b.sample(j).unwrap());
        assert_eq!((&x.state, &x.sensor, &x.action, x.t_ns), (&y.state, &y.sensor, &y.action, y.t_ns), "sample {i}");
        for (p, q) in x.images.iter().zip(&y.images) {
            let d: f64 = p.data.iter().zip(&q.data).map(|(u, v)| (*u as f64 - *v as f64).abs()).sum::<f64>()
                / p.data.len() as f64;
            worst = worst.max(d / 255.0);
        }
    }
    // The video's own loss plus one more JPEG encoding.
    eprintln!("video export imported back: worst mean abs image difference {:.2}/255", worst * 255.0);
    assert!(worst <= 6.0 / 255.0, "mean abs image difference {worst}");
}

/// Loads `exported` (an export of the compiled `dataset`) with lerobot and checks every frame
/// and the statistics; pictures (LeRobot `kind` features) within `image_tol` mean abs difference.
fn check_in_lerobot(dataset: &Path, exported: &Path, kind: &str, image_tol: f64) {
    let ds = Dataset::open(dataset).unwrap();
    let prefix = exported.with_file_name(format!("read-{kind}"));
    run_script("lerobot_read.py", &[exported.to_str().unwrap(), prefix.to_str().unwrap()]);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(prefix.with_extension("json")).unwrap()).unwrap();
    let bytes = std::fs::read(prefix.with_extension("safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ix = &ds.index;
    let n = ds.len();
    assert!(n > 20, "fixture has {n} samples");
    assert_eq!(meta["len"], n);
    assert_eq!(meta["num_episodes"], ix.episodes.iter().filter(|e| e.samples > 0).count());
    assert_eq!(meta["fps"], 10);
    assert_lerobot_features(&meta, &ds, kind);
    let [t, c] = ix.sensor_shape;
    let [h, a] = ix.action_shape;
    let s = ix.state_names.len();
    let (shape, state) = f32s(&st, "observation.state");
    assert_eq!(shape, [n, s]);
    let (shape, sensor) = f32s(&st, SENSOR_KEY);
    assert_eq!(shape, [n, t, c]);
    let (shape, action) = f32s(&st, "action");
    assert_eq!(shape, [n, a]);
    let (shape, chunk) = f32s(&st, CHUNK_FEATURE);
    assert_eq!(shape, [n, h, a]);
    let (_, timestamp) = f32s(&st, "timestamp");
    let (frame_index, episode_index) = (i64s(&st, "frame_index"), i64s(&st, "episode_index"));
    let images: Vec<(Vec<usize>, Vec<f32>)> =
        ix.cameras.iter().map(|cam| f32s(&st, &format!("observation.images.{}", cam.name))).collect();
    let tasks = meta["tasks"].as_array().unwrap();
    let order = export_order(&ds);
    let mut worst_image = 0.0f64;
    let (mut ep, mut frame, mut prev_episode) = (-1i64, 0i64, usize::MAX);
    for (j, &i) in order.iter().enumerate() {
        let smp = ds.sample(i).unwrap();
        let entry = &ix.samples[i];
        if entry.episode != prev_episode {
            (ep, frame, prev_episode) = (ep + 1, 0, entry.episode);
        }
        assert_eq!((episode_index[j], frame_index[j]), (ep, frame), "frame {j}");
        assert_eq!(state[j * s..(j + 1) * s], smp.state[..], "state of frame {j}");
        assert_eq!(sensor[j * t * c..(j + 1) * t * c], smp.sensor[..], "sensor of frame {j}");
        assert_eq!(chunk[j * h * a..(j + 1) * h * a], smp.action[..], "chunk of frame {j}");
        assert_eq!(action[j * a..(j + 1) * a], smp.action[..a], "action of frame {j}");
        assert!((timestamp[j] as f64 - frame as f64 / 10.0).abs() < 1e-6, "timestamp of frame {j}");
        assert_eq!(tasks[j], smp.instruction.as_str());
        for ((shape, px), img) in images.iter().zip(&smp.images) {
            let (hh, ww) = (shape[2], shape[3]);
            assert_eq!((hh, ww), (img.height as usize, img.width as usize));
            let planes = &px[j * 3 * hh * ww..(j + 1) * 3 * hh * ww];
            worst_image = worst_image.max(mean_abs_image_diff(planes, &img.data, hh, ww));
        }
        frame += 1;
    }
    eprintln!("lerobot reads our {kind} export: worst mean abs image difference {:.2}/255", worst_image * 255.0);
    assert!(worst_image <= image_tol, "{kind}: mean abs image difference {worst_image}");
    let features = [
        ("observation.state", &state[..], s),
        ("action", &action[..], a),
        (SENSOR_KEY, &sensor[..], c),
        (CHUNK_FEATURE, &chunk[..], a),
    ];
    check_stats(&meta, n, &features);
    check_image_stats(&meta, &ds);
}

/// The LeRobot key of the sensor window feature.
const SENSOR_KEY: &str = "observation.oct";

/// The dtype and shape lerobot loaded for each feature of `ds`'s export (pictures as `kind`).
fn assert_lerobot_features(meta: &serde_json::Value, ds: &Dataset, kind: &str) {
    let ix = &ds.index;
    let feat =
        |k: &str| (meta["features"][k]["dtype"].as_str().unwrap().to_string(), meta["features"][k]["shape"].clone());
    let [t, c] = ix.sensor_shape;
    let [h, a] = ix.action_shape;
    let s = ix.state_names.len();
    assert_eq!(feat("observation.state"), ("float32".into(), serde_json::json!([s])));
    assert_eq!(feat(SENSOR_KEY), ("float32".into(), serde_json::json!([t, c])));
    assert_eq!(feat("action"), ("float32".into(), serde_json::json!([a])));
    assert_eq!(feat(CHUNK_FEATURE), ("float32".into(), serde_json::json!([h, a])));
    for cam in &ix.cameras {
        assert_eq!(
            feat(&format!("observation.images.{}", cam.name)),
            (kind.into(), serde_json::json!([cam.height, cam.width, 3]))
        );
    }
}

/// Each camera's statistics as lerobot loaded them: 3 channel means, the first positive, its max at most 1.
fn check_image_stats(meta: &serde_json::Value, ds: &Dataset) {
    for cam in &ds.index.cameras {
        let s = &meta["stats"][format!("observation.images.{}", cam.name)];
        assert_eq!(s["mean"].as_array().unwrap().len(), 3);
        assert!(s["mean"][0][0][0].as_f64().unwrap() > 0.0 && s["max"][0][0][0].as_f64().unwrap() <= 1.0);
    }
}

/// The statistics of each `(key, values, dims)` as lerobot loaded them: equal to ours over the
/// exported frames, and to lerobot's own get_feature_stats over the frames it loaded.
fn check_stats(meta: &serde_json::Value, n: usize, features: &[(&str, &[f32], usize)]) {
    for &(key, values, dims) in features {
        let ours = plain_stats(values, dims);
        for (k, stat) in ["mean", "std", "min", "max"].iter().enumerate() {
            assert_rel(&json_f64s(&meta["stats"][key][stat]), &ours[k], &format!("{key} {stat}"));
            assert_rel(
                &json_f64s(&meta["stats"][key][stat]),
                &json_f64s(&meta["recomputed_stats"][key][stat]),
                &format!("{key} {stat} vs lerobot"),
            );
        }
        assert_eq!(meta["stats"][key]["count"], serde_json::json!([n]));
        for q in ["q01", "q10", "q50", "q90", "q99"] {
            let (ql, mn, mx) = (json_f64s(&meta["stats"][key][q]), &ours[2], &ours[3]);
            assert!(ql.iter().enumerate().all(|(d, v)| *v >= mn[d] && *v <= mx[d]), "{key} {q} outside [min, max]");
        }
    }
}

/// Mean absolute difference of a CHW float picture (0..1) and an HWC RGB8 one.
fn mean_abs_image_diff(planes: &[f32], rgb: &[u8], hh: usize, ww: usize) -> f64 {
    let mut sum = 0.0;
    for y in 0..hh {
        for x in 0..ww {
            for ch in 0..3 {
                sum += (planes[ch * hh * ww + y * ww + x] as f64 - rgb[(y * ww + x) * 3 + ch] as f64 / 255.0).abs();
            }
        }
    }
    sum / (3 * hh * ww) as f64
}

#[test]
fn recorded_episodes_export_at_the_chosen_fps() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("compile.yaml");
    std::fs::write(&cfg, "align: {sensor_window_s: 0.05, sensor_samples: 16}\n").unwrap();
    let out = dir.path().join("lr20");
    let args = vla_finetune::cli::lerobot::ExportLeRobotArgs {
        dataset: f.rec.clone(),
        out: out.clone(),
        images: false,
        video: false,
        ffmpeg: None,
        fps: Some(20),
        config: Some(cfg.clone()),
        robot_type: Some("sim".into()),
        chunks_size: 1000,
        data_files_size_mb: 100,
        overwrite: false,
    };
    vla_finetune::cli::lerobot::run_export(&args, &vla_finetune::cli::open_recorded_episodes).unwrap();
    // The same as compiling at 20 Hz and exporting that.
    let mut cc = CompileConfig::from_yaml_file(&cfg).unwrap();
    cc.align.control_hz = 20.0;
    let eps = vla_finetune::cli::open_recorded_episodes(&f.rec).unwrap();
    let compiled = compile_lazily(&eps, &cc, &dir.path().join("c20"), false).unwrap();
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(format::INFO_PATH)).unwrap()).unwrap();
    assert_eq!((info["fps"].as_u64(), info["robot_type"].as_str()), (Some(20), Some("sim")));
    assert_eq!(info["total_frames"], compiled.index.samples.len());
    let back = dir.path().join("back");
    import(&out, &ImportMapping::default(), &back, &ImportOptions::default(), &mut |_, _| {}).unwrap();
    let (a, b) = (Dataset::open(&dir.path().join("c20")).unwrap(), Dataset::open(&back).unwrap());
    for (j, &i) in export_order(&a).iter().enumerate() {
        assert_eq!(a.sample(i).unwrap().action, b.sample(j).unwrap().action, "sample {i}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "the temporary compile is removed: {leftovers:?}");
}

#[test]
fn round_trip_export_import_gives_back_the_samples() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("back");
    let r = import(&f.exported, &ImportMapping::default(), &out, &ImportOptions::default(), &mut |_, _| {}).unwrap();
    let (a, b) = (Dataset::open(&f.dataset).unwrap(), Dataset::open(&out).unwrap());
    assert_eq!(r.samples, a.len());
    assert!(r.dropped.is_empty() && r.ignored_features == ["action"], "{r:?}");
    let (ia, ib) = (&a.index, &b.index);
    assert_eq!(
        (&ia.cameras, ia.sensor_shape, &ia.state_names, ia.action_shape, ia.control_hz),
        (&ib.cameras, ib.sensor_shape, &ib.state_names, ib.action_shape, ib.control_hz)
    );
    let with_samples: Vec<_> = ia.episodes.iter().filter(|e| e.samples > 0).cloned().collect();
    assert_eq!(with_samples, ib.episodes);
    let order = export_order(&a);
    for (j, &i) in order.iter().enumerate() {
        let (sa, sb) = (&ia.samples[i], &ib.samples[j]);
        assert_eq!(
            (sa.t_ns, sa.split, &ia.episodes[sa.episode].id),
            (sb.t_ns, sb.split, &ib.episodes[sb.episode].id),
            "sample {i}"
        );
        let (x, y) = (a.sample(i).unwrap(), b.sample(j).unwrap());
        assert_eq!(
            (&x.state, &x.sensor, &x.action, &x.instruction),
            (&y.state, &y.sensor, &y.action, &y.instruction),
            "sample {i}"
        );
        for cam in 0..ia.cameras.len() {
            assert_eq!(a.jpeg(i, cam).unwrap(), b.jpeg(j, cam).unwrap(), "JPEG of sample {i}, camera {cam}");
        }
    }
    for (fa, fb) in
        [(&a.stats.sensor, &b.stats.sensor), (&a.stats.state, &b.stats.state), (&a.stats.action, &b.stats.action)]
    {
        assert_eq!(fa.count, fb.count);
        for (va, vb) in [
            (&fa.mean, &fb.mean),
            (&fa.std, &fb.std),
            (&fa.min, &fb.min),
            (&fa.max, &fb.max),
            (&fa.q01, &fb.q01),
            (&fa.q99, &fb.q99),
        ] {
            assert_rel(vb, va, "stats");
        }
    }
}

#[test]
fn a_dataset_written_by_lerobot_imports_compiles_and_trains_a_stage2_epoch() {
    let dir = tempfile::tempdir().unwrap();
    // PNG frames re-encoded as JPEG.
    let data = import_written(dir.path(), "image", &ImportOptions::default(), 2.0 / 255.0);
    stage2_epoch(&data, dir.path());
}

#[test]
fn a_video_dataset_written_by_lerobot_imports_and_a_broken_video_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ImportOptions { ffmpeg: Some(ffmpeg()), ..Default::default() };
    // lerobot's AV1 video (crf 30), decoded and encoded as JPEG.
    import_written(dir.path(), "video", &opts, 6.0 / 255.0);
    let mp4 = dir.path().join("written/videos/observation.images.wrist/chunk-000/file-000.mp4");
    let bytes = std::fs::read(&mp4).unwrap();
    std::fs::write(&mp4, &bytes[..bytes.len() / 3]).unwrap();
    let out = dir.path().join("broken");
    let e = import(&dir.path().join("written"), &written_mapping(), &out, &opts, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, LeRobotError::Video(_)) && e.to_string().contains("file-000.mp4"), "{e}");
    assert!(!out.exists());
}

fn written_mapping() -> ImportMapping {
    serde_yaml::from_str(
        "cameras: [{name: wrist, feature: observation.images.wrist}]\n\
         state: observation.state\n\
         sensor: {feature: observation.tactile, name: tactile, window_frames: 4}\n\
         action: {feature: action, horizon: 4}\n\
         split: {val_fraction: 0.34, seed: 1}\n",
    )
    .unwrap()
}

/// Has lerobot write a dataset with `kind` pictures under `dir/written`, imports it into
/// `dir/data` and checks every sample against the values lerobot was given (pictures within
/// `image_tol` mean abs difference); returns the compiled dataset.
fn import_written(dir: &Path, kind: &str, opts: &ImportOptions, image_tol: f64) -> PathBuf {
    let src = dir.join("written");
    let values = dir.join("values.safetensors");
    let (episodes, frames, size) = (3usize, 12usize, 56usize);
    run_script(
        "lerobot_write.py",
        &[
            src.to_str().unwrap(),
            values.to_str().unwrap(),
            &episodes.to_string(),
            &frames.to_string(),
            &size.to_string(),
            kind,
        ],
    );
    let data = dir.join("data");
    let r = import(&src, &written_mapping(), &data, opts, &mut |_, _| {}).unwrap();
    // Frames 0..3 lack a full window, frames 9..12 a full horizon.
    assert_eq!((r.episodes, r.frames, r.samples), (episodes, episodes * frames, episodes * (frames - 6)));
    assert_eq!(r.dropped.get(DROP_WINDOW), Some(&(3 * episodes as u64)));
    assert_eq!(r.dropped.get(DROP_HORIZON), Some(&(3 * episodes as u64)));
    let bytes = std::fs::read(&values).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, state) = f32s(&st, "observation.state");
    let (_, tactile) = f32s(&st, "observation.tactile");
    let (_, action) = f32s(&st, "action");
    let pictures = st.tensor("observation.images.wrist").unwrap().data().to_vec();
    let ds = Dataset::open(&data).unwrap();
    assert_eq!((ds.index.sensor_shape, ds.index.action_shape, ds.index.state_names.len()), ([4, 6], [4, 7], 7));
    assert_eq!(ds.index.state_names[3], "joint3");
    let mut worst = 0.0f64;
    for i in 0..ds.len() {
        let entry = &ds.index.samples[i];
        let e = ds.index.episodes[entry.episode].id.trim_start_matches("lerobot_").parse::<usize>().unwrap();
        let k = (entry.t_ns as f64 / 1e8).round() as usize;
        let g = e * frames + k;
        let smp = ds.sample(i).unwrap();
        assert_eq!(smp.instruction, format!("push the block {}", if e % 2 == 1 { "left" } else { "right" }));
        assert_eq!(smp.state[..], state[g * 7..(g + 1) * 7], "state of sample {i}");
        assert_eq!(smp.sensor[..], tactile[(g - 3) * 6..(g + 1) * 6], "sensor window of sample {i}");
        assert_eq!(smp.action[..], action[g * 7..(g + 4) * 7], "action chunk of sample {i}");
        let px = &pictures[g * size * size * 3..(g + 1) * size * size * 3];
        let diff: f64 = smp.images[0].data.iter().zip(px).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>()
            / px.len() as f64;
        worst = worst.max(diff / 255.0);
    }
    eprintln!("import of lerobot's {kind} dataset: worst mean abs image difference {:.2}/255", worst * 255.0);
    assert!(worst <= image_tol, "{kind}: mean abs image difference {worst}");
    data
}

/// Stage 1 then one Stage 2 epoch on the tiny model, CPU.
fn stage2_epoch(dataset: &Path, dir: &Path) {
    use vla_finetune::train::config::{Override, TrainConfig};
    use vla_finetune::train::controller::JobContext;
    use vla_finetune::train::heads_job::{self, small_heads, HeadsJob, HeadsTrainConfig};
    use vla_finetune::train::progress::ProgressHub;
    use vla_finetune::train::stage2::{self, Stage2Job};
    tch::set_num_threads(1);
    let ctx = || JobContext { job_id: "t".into(), cancel: Default::default(), progress: ProgressHub::new(1024) };
    let base = Path::new(ROOT).join("tests/fixtures/vlm/tiny_a");
    let mut heads = small_heads();
    heads.sensor.conv_channels = vec![16, 16];
    (heads.sensor.d_model, heads.sensor.ff_dim, heads.sensor.out_dim, heads.sensor.dropout) = (16, 32, 16, 0.0);
    (heads.expert.d_model, heads.expert.ff_dim, heads.expert.n_layers, heads.expert.dropout) = (32, 64, 1, 0.0);
    let job = HeadsJob {
        dataset: dataset.to_path_buf(),
        base_model: base.clone(),
        checkpoints: dir.join("ck1"),
        work_dir: dir.join("heads_job"),
        train: HeadsTrainConfig { epochs: 1, batch_size: 4, lr: 1e-3, seed: 3, ..HeadsTrainConfig::default() },
        heads,
        resume: false,
        group: None,
    };
    let stage1 = heads_job::run(&job, &ctx(), &mut |_| {}).unwrap().published.unwrap().dir;
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let out = dir.join("stage2");
    let sets = [
        format!("data.dataset_dir={}", q(dataset)),
        format!("model.base_model_dir={}", q(&base)),
        format!("model.stage1_checkpoint={}", q(&stage1)),
        format!("run.output_dir={}", q(&out)),
        format!("cache.dir={}", q(&out.join("cache"))),
        format!("checkpoint.state_dir={}", q(&out.join("state"))),
        format!("checkpoint.publish_dir={}", q(&out.join("ck"))),
        format!("progress.log_file={}", q(&out.join("log.jsonl"))),
        format!("progress.plot_file={}", q(&out.join("curves.png"))),
        "run.device=cpu".into(),
        "run.epochs=1".into(),
        "model.compute_dtype=f32".into(),
        "memory.preset=manual".into(),
        "memory.micro_batch=4".into(),
        "memory.accum_steps=1".into(),
        "lora.rank=4".into(),
        "cache.mode=off".into(),
        "optim.warmup_ratio=0.0".into(),
    ];
    let sets: Vec<Override> = sets.iter().map(|s| s.parse().unwrap()).collect();
    let cfg = TrainConfig::from_yaml(include_str!("../../config/train.yaml"), "train.yaml", &sets).unwrap();
    let r = stage2::run(&Stage2Job { config: cfg, resume: false, group: None }, &ctx(), &mut |_| {}).unwrap();
    assert!(r.lora_params_changed, "one Stage 2 epoch trains the LoRA weights");
    assert!(r.val_action_error.is_some_and(f64::is_finite), "{:?}", r.val_action_error);
    assert_eq!(r.published.len(), 1, "{:?}", r.published);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A copy of the fixture's export with `damage` applied; the import's error.
fn import_damaged(damage: impl FnOnce(&Path)) -> (LeRobotError, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    copy_dir(&fixture().exported, &src);
    damage(&src);
    let out = dir.path().join("out");
    let e = import(&src, &ImportMapping::default(), &out, &ImportOptions::default(), &mut |_, _| {}).unwrap_err();
    assert!(!out.exists(), "nothing is written on error");
    (e, src, dir)
}

/// Rewrites a parquet file with one column replaced.
fn replace_column(path: &Path, name: &str, f: impl Fn(&ArrayRef) -> ArrayRef) {
    let batches = format::read_parquet(path).unwrap();
    let schema = batches[0].schema();
    let new: Vec<RecordBatch> = batches
        .iter()
        .map(|b| {
            let cols = schema
                .fields()
                .iter()
                .map(|fl| {
                    if fl.name() == name {
                        f(b.column_by_name(name).unwrap())
                    } else {
                        b.column_by_name(fl.name()).unwrap().clone()
                    }
                })
                .collect();
            RecordBatch::try_new(schema.clone(), cols).unwrap()
        })
        .collect();
    let mut w = format::create_writer(path, schema.clone()).unwrap();
    for b in &new {
        w.write(b).unwrap();
    }
    w.close().unwrap();
}

#[test]
fn bad_input_is_refused_with_what_was_expected() {
    // A v2.1 dataset.
    let (e, _, _d) = import_damaged(|src| {
        let p = src.join(format::INFO_PATH);
        let text = std::fs::read_to_string(&p).unwrap().replace("\"v3.0\"", "\"v2.1\"");
        std::fs::write(p, text).unwrap();
    });
    assert!(matches!(e, LeRobotError::Version { ref found, .. } if found == "v2.1"), "{e}");
    assert!(e.to_string().contains("expected `v3.0`"), "{e}");
    // Missing meta files.
    for (file, words) in [(format::INFO_PATH, "meta/info.json"), (format::TASKS_PATH, "meta/tasks.parquet")] {
        let (e, _, _d) = import_damaged(|src| std::fs::remove_file(src.join(file)).unwrap());
        assert!(matches!(e, LeRobotError::Missing { .. }) && e.to_string().contains(words), "{e}");
    }
    let (e, _, _d) = import_damaged(|src| std::fs::remove_dir_all(src.join(format::EPISODES_DIR)).unwrap());
    assert!(matches!(e, LeRobotError::Missing { .. }) && e.to_string().contains("meta/episodes"), "{e}");
    // An episode whose length does not match its frames.
    let (e, _, _d) = import_damaged(|src| {
        replace_column(&src.join(format::chunk_file(format::EPISODES_DIR, 0, 0, "parquet")), "length", |c| {
            let v: &Int64Array = c.as_any().downcast_ref().unwrap();
            Arc::new(Int64Array::from_iter_values(v.values().iter().map(|x| x + 1)))
        })
    });
    assert!(
        matches!(e, LeRobotError::Frames { episode: 0, .. }) && e.to_string().contains("meta/episodes says length"),
        "{e}"
    );
    // A picture that does not decode.
    let cam = format!("observation.images.{}", Dataset::open(&fixture().dataset).unwrap().index.cameras[0].name);
    let (e, _, _d) = import_damaged(|src| {
        replace_column(&src.join(format::chunk_file("data", 0, 0, "parquet")), &cam, |c| {
            let s: &StructArray = c.as_any().downcast_ref().unwrap();
            let bytes: &BinaryArray = s.column(0).as_any().downcast_ref().unwrap();
            let broken = BinaryArray::from_iter_values((0..bytes.len()).map(|i| {
                if i == 2 {
                    &bytes.value(i)[..40]
                } else {
                    bytes.value(i)
                }
            }));
            Arc::new(StructArray::new(s.fields().clone(), vec![Arc::new(broken), s.column(1).clone()], None))
        })
    });
    assert!(
        matches!(e, LeRobotError::Feature { ref feature, .. } if *feature == cam)
            && e.to_string().contains("does not decode"),
        "{e}"
    );
    // A mapping naming a feature the dataset lacks.
    let out = tempfile::tempdir().unwrap();
    let mapping: ImportMapping = serde_yaml::from_str("state: observation.joints").unwrap();
    let e = import(&fixture().exported, &mapping, &out.path().join("x"), &ImportOptions::default(), &mut |_, _| {})
        .unwrap_err();
    assert!(e.to_string().contains("observation.joints") && e.to_string().contains("observation.state"), "{e}");
    // A 1-D feature mapped as a camera.
    let mapping: ImportMapping = serde_yaml::from_str("cameras: [{name: c, feature: action}]").unwrap();
    let e = import(&fixture().exported, &mapping, &out.path().join("x"), &ImportOptions::default(), &mut |_, _| {})
        .unwrap_err();
    assert!(e.to_string().contains("expected an image or video feature"), "{e}");
    // Video without ffmpeg (none on PATH on these machines; a named one that is not there).
    if vla_finetune::dataset::lerobot::video::find_ffmpeg(None).is_err() {
        let opts = ExportOptions { pictures: PictureMode::Video, ..Default::default() };
        let e = export(&fixture().dataset, &out.path().join("v"), &opts, &mut |_, _| {}).unwrap_err();
        assert!(matches!(e, LeRobotError::Video(_)) && e.to_string().contains("ffmpeg was not found on PATH"), "{e}");
    }
    let opts = ExportOptions {
        pictures: PictureMode::Video,
        ffmpeg: Some("/nonexistent/ffmpeg".into()),
        ..Default::default()
    };
    let e = export(&fixture().dataset, &out.path().join("v"), &opts, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, LeRobotError::Video(_)) && e.to_string().contains("/nonexistent/ffmpeg"), "{e}");
    assert!(!out.path().join("v").exists());
}
