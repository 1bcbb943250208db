//! Compile -> store -> read round trips on synthetic episodes: the stored samples are exactly
//! the aligner's, splits are by episode, stats match numpy, the reader is deterministic, an
//! incremental compile gives what a whole compile gives.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vla_finetune::dataset::align::{wrap_deg, AlignConfig, Aligner};
use vla_finetune::dataset::compile::{compile, split_episodes, CompileConfig, SplitConfig, StoreConfig};
use vla_finetune::dataset::episode::{
    EpisodeMeta, EpisodeSource, LazyEpisode, MemoryEpisode, RgbImage, SensorSeries, Signals, SourceError, Stamp,
    StateSeries,
};
use vla_finetune::dataset::incremental::{compile_incremental, FingerprintedEpisode};
use vla_finetune::dataset::reader::{epoch_batches, BatchReader, Dataset, ReaderConfig};
use vla_finetune::dataset::rng::SplitMix64;
use vla_finetune::dataset::stats::StatsAccumulator;
use vla_finetune::dataset::store::Split;

const MS: i64 = 1_000_000;
const W: u32 = 16;
const H: u32 = 8;

/// Frame `f` of camera `c`: a flat colour that identifies it.
fn frame(c: usize, f: usize) -> RgbImage {
    let px = [(f * 20 % 250) as u8, (c * 100 + 20) as u8, 200 - (f * 7 % 150) as u8];
    RgbImage { width: W, height: H, data: px.iter().copied().cycle().take((W * H * 3) as usize).collect() }
}

/// A 3 s episode: cameras at ~5 and ~10 Hz, a 4-channel sensor at ~200 Hz, pose at ~100 Hz,
/// all jittered, with some lost messages.
fn episode(id: &str, seed: u64) -> MemoryEpisode {
    let mut rng = SplitMix64::new(seed);
    let mut stream = |period_ms: i64| -> Vec<i64> {
        let mut v = Vec::new();
        let mut x = rng.below(20) as i64 * MS / 2;
        while x < 3000 * MS {
            if rng.below(100) >= 5 {
                v.push(x);
            }
            x += period_ms * MS + (rng.below(3) as i64 - 1) * MS;
        }
        v
    };
    let cams = [stream(200), stream(100)];
    let sens = stream(5);
    let states = stream(10);
    let stamp = |ns: i64| Stamp { stamp_ns: ns, recv_ns: ns + 2 * MS };
    let mut sensor = SensorSeries { channels: 4, ..Default::default() };
    for (i, &s) in sens.iter().enumerate() {
        sensor.stamps.push(stamp(s));
        let x = i as f32;
        sensor.values.extend([x, (x * 0.1).sin(), seed as f32, (i % 7) as f32]);
    }
    let mut state = StateSeries {
        names: ["x", "y", "z", "roll", "pitch", "yaw"].map(String::from).to_vec(),
        is_angle_deg: vec![false, false, false, true, true, true],
        ..Default::default()
    };
    for (k, &s) in states.iter().enumerate() {
        state.stamps.push(stamp(s));
        let k = k as f64;
        state.values.push(vec![k * 0.5, -k * 0.25, seed as f64, wrap_deg(170.0 + k * 3.0), wrap_deg(-k), 10.0]);
    }
    MemoryEpisode {
        meta: EpisodeMeta {
            id: id.into(),
            instruction: format!("task of {id}"),
            task: "insert".into(),
            ..Default::default()
        },
        cameras: cams
            .iter()
            .enumerate()
            .map(|(c, v)| (format!("cam{c}"), v.iter().enumerate().map(|(f, &s)| (stamp(s), frame(c, f))).collect()))
            .collect(),
        signals: Signals { sensors: vec![("oct".into(), sensor)], state, commands: None },
    }
}

fn config() -> CompileConfig {
    CompileConfig {
        align: AlignConfig {
            sensor: "oct".into(),
            sensor_window_s: 0.1,
            sensor_samples: 10,
            sensor_max_gap_s: 0.02,
            state_max_age_s: 0.03,
            horizon: 4,
            ..Default::default()
        },
        split: SplitConfig { val_fraction: 0.34, seed: 3, ..Default::default() },
        store: StoreConfig { jpeg_quality: 95, shard_max_mb: 0.05, encode_threads: 2, ..Default::default() },
    }
}

fn episodes(n: usize) -> Vec<MemoryEpisode> {
    (0..n).map(|i| episode(&format!("ep{i:02}"), 100 + i as u64)).collect()
}

fn compile_to(eps: &[MemoryEpisode], cfg: &CompileConfig, out: &Path) -> vla_finetune::dataset::compile::CompileOutput {
    let refs: Vec<&dyn EpisodeSource> = eps.iter().map(|e| e as &dyn EpisodeSource).collect();
    compile(&refs, cfg, out, false).unwrap()
}

#[test]
fn stored_samples_are_the_aligned_ones() {
    let mut eps = episodes(5);
    eps[2].signals.sensors[0].1.values[4 * 150 + 1] = f32::NAN; // one NaN sensor value
    let cfg = config();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let res = compile_to(&eps, &cfg, &out);
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.len() as u64, res.report.samples);
    assert!(ds.index.shards.len() > 1, "50 KiB shards should split this dataset");
    let dropped: u64 = res.report.drops.values().sum();
    assert_eq!(res.report.samples + dropped, res.report.candidates);
    assert!(res.report.drops.get("sensor_non_finite").copied().unwrap_or(0) >= 1, "{:?}", res.report.drops);
    assert!(res.report.failed_episodes.is_empty());

    // Re-align every episode independently and compare with what the reader returns.
    let mut i = 0;
    for (e, ep) in eps.iter().enumerate() {
        let al = Aligner::new(ep, &cfg.align).unwrap();
        for t in al.sample_times() {
            let Ok(want) = al.align(t) else { continue };
            let got = ds.sample(i).unwrap();
            assert_eq!(got.episode, format!("ep{e:02}"));
            assert_eq!(got.instruction, format!("task of ep{e:02}"));
            assert_eq!(got.t_ns, want.t_ns);
            assert_eq!(ds.index.samples[i].frames, want.frames);
            assert_eq!((got.sensor, got.state, got.action), (want.sensor, want.state, want.action));
            for (c, img) in got.images.iter().enumerate() {
                let orig = frame(c, want.frames[c]);
                let max_diff = img.data.iter().zip(&orig.data).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
                assert!(max_diff <= 6, "sample {i} camera {c}: JPEG differs by {max_diff}");
            }
            i += 1;
        }
    }
    assert_eq!(i, ds.len());
    // The stored JPEG is a real JPEG file.
    assert_eq!(&ds.jpeg(0, 1).unwrap()[..2], &[0xFF, 0xD8]);
}

#[test]
fn split_is_by_episode_and_deterministic() {
    let ids: Vec<String> = (0..20).map(|i| format!("episode-{i}")).collect();
    let cfg = SplitConfig { val_fraction: 0.25, seed: 11, ..Default::default() };
    let a = split_episodes(&ids, &cfg);
    assert_eq!(a.iter().filter(|s| **s == Split::Val).count(), 5);
    // Independent of the order the ids come in.
    let mut rev = ids.clone();
    rev.reverse();
    let mut b = split_episodes(&rev, &cfg);
    b.reverse();
    assert_eq!(a, b);
    // Another seed, another split.
    assert_ne!(a, split_episodes(&ids, &SplitConfig { val_fraction: 0.25, seed: 12, ..Default::default() }));
    // Small counts: at least one val episode, never all.
    assert_eq!(
        split_episodes(&ids[..2], &SplitConfig { val_fraction: 0.1, seed: 0, ..Default::default() })
            .iter()
            .filter(|s| **s == Split::Val)
            .count(),
        1
    );
    assert_eq!(
        split_episodes(&ids[..1], &SplitConfig { val_fraction: 0.5, seed: 0, ..Default::default() }),
        vec![Split::Train]
    );
    // Named validation episodes: exactly those, whatever the fraction.
    let named = SplitConfig {
        val_fraction: 0.5,
        val_episodes: vec!["episode-3".into(), "episode-7".into(), "absent".into()],
        ..Default::default()
    };
    let s = split_episodes(&ids, &named);
    assert_eq!(s.iter().enumerate().filter(|(_, s)| **s == Split::Val).map(|(i, _)| i).collect::<Vec<_>>(), vec![3, 7]);

    // In a compiled dataset no episode has samples in both splits, whatever the input order.
    let mut eps = episodes(6);
    let dir = tempfile::tempdir().unwrap();
    let r1 = compile_to(&eps, &config(), &dir.path().join("a"));
    eps.reverse();
    let r2 = compile_to(&eps, &config(), &dir.path().join("b"));
    assert_eq!(r1.index, r2.index);
    let idx = &r1.index;
    assert_eq!(idx.episodes.iter().filter(|e| e.split == Split::Val).count(), 2); // round(0.34 * 6)
    for s in &idx.samples {
        assert_eq!(s.split, idx.episodes[s.episode].split);
    }
    let train: std::collections::BTreeSet<_> =
        idx.samples.iter().filter(|s| s.split == Split::Train).map(|s| s.episode).collect();
    let val: std::collections::BTreeSet<_> =
        idx.samples.iter().filter(|s| s.split == Split::Val).map(|s| s.episode).collect();
    assert!(train.is_disjoint(&val) && !val.is_empty() && !train.is_empty());
}

#[test]
fn stats_hand_checked() {
    let mut acc = StatsAccumulator::new(2, 100, 0);
    acc.add_rows(&[1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 4.0, 40.0]);
    let s = acc.finish();
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9) && a.len() == b.len();
    assert_eq!(s.count, 4);
    assert!(close(&s.mean, &[2.5, 25.0]));
    assert!(close(&s.std, &[1.118033988749895, 11.18033988749895])); // sqrt(1.25), ddof 0
    assert!(close(&s.min, &[1.0, 10.0]) && close(&s.max, &[4.0, 40.0]));
    assert!(close(&s.q01, &[1.03, 10.3])); // 1 + 0.01 * 3 * (2 - 1)
    assert!(close(&s.q99, &[3.97, 39.7]), "{:?}", s.q99);
    let mut x = vec![2.5f32, 25.0, 4.0, 10.0];
    assert!(s.normalize(&mut x));
    assert!((x[0]).abs() < 1e-6 && (x[1]).abs() < 1e-6);
    assert!((x[2] - 1.5 / 1.118034).abs() < 1e-5 && (x[3] + 15.0 / 11.18034).abs() < 1e-5);
    assert!(!s.normalize(&mut [1.0, 2.0, 3.0]), "3 values are not whole rows of 2");
}

#[test]
fn stats_match_numpy_on_the_training_split() {
    let eps = episodes(4);
    let mut cfg = config();
    cfg.split.val_fraction = 0.25;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let res = compile_to(&eps, &cfg, &out);
    let ds = Dataset::open(&out).unwrap();
    let (mut sensor, mut state, mut action) = (Vec::new(), Vec::new(), Vec::new());
    for i in ds.split_indices(Split::Train) {
        let s = ds.sample(i).unwrap();
        sensor.extend(s.sensor);
        state.extend(s.state);
        action.extend(s.action);
    }
    assert!(sensor.len() / 4 <= cfg.store.stats_reservoir_rows, "quantiles must be exact here");
    let data = serde_json::json!({ "sensor": [sensor, 4], "state": [state, 6], "action": [action, 7] });
    let path = dir.path().join("data.json");
    std::fs::write(&path, serde_json::to_vec(&data).unwrap()).unwrap();
    let py = r#"
import json, sys, numpy as np
d = json.load(open(sys.argv[1]))
out = {}
for k, (v, dims) in d.items():
    a = np.asarray(v, dtype=np.float32).astype(np.float64).reshape(-1, dims)
    out[k] = {"count": a.shape[0], "mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "min": a.min(0).tolist(),
              "max": a.max(0).tolist(), "q01": np.quantile(a, 0.01, axis=0).tolist(), "q99": np.quantile(a, 0.99, axis=0).tolist()}
print(json.dumps(out))
"#;
    let o = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"))
        .arg("-c")
        .arg(py)
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let np: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ours = serde_json::to_value(&res.stats).unwrap();
    // stats.json holds what compile returned (to the last bits of a JSON float round trip).
    for (a, b) in [
        (&res.stats.sensor, &ds.stats.sensor),
        (&res.stats.state, &ds.stats.state),
        (&res.stats.action, &ds.stats.action),
    ] {
        assert_eq!(a.count, b.count);
        for (x, y) in [(&a.mean, &b.mean), (&a.std, &b.std), (&a.q01, &b.q01), (&a.q99, &b.q99)] {
            assert!(x.iter().zip(y).all(|(x, y)| (x - y).abs() <= 1e-12 * x.abs().max(1.0)));
        }
    }
    for field in ["sensor", "state", "action"] {
        assert_eq!(ours[field]["count"], np[field]["count"], "{field} count");
        for k in ["mean", "std", "min", "max", "q01", "q99"] {
            let a: Vec<f64> = serde_json::from_value(ours[field][k].clone()).unwrap();
            let b: Vec<f64> = serde_json::from_value(np[field][k].clone()).unwrap();
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-9 * y.abs().max(1.0), "{field}.{k}: ours {a:?} numpy {b:?}");
            }
        }
    }
    // The constant channel: std 0, mean 1 (the pad value).
    assert_eq!((res.stats.action.mean[6], res.stats.action.std[6]), (1.0, 0.0));
}

fn reader_cfg(workers: usize, seed: u64, epoch: u64) -> ReaderConfig {
    ReaderConfig {
        split: Split::Train,
        batch_size: 7,
        shuffle: true,
        seed,
        epoch,
        drop_last: false,
        workers,
        prefetch: 2,
    }
}

#[test]
fn reader_is_deterministic_and_threads_do_not_change_it() {
    let eps = episodes(4);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    compile_to(&eps, &config(), &out);
    let ds = Arc::new(Dataset::open(&out).unwrap());
    let train = ds.split_indices(Split::Train);

    let order = epoch_batches(&ds, &reader_cfg(0, 5, 0));
    let mut flat: Vec<usize> = order.concat();
    assert_ne!(flat, train, "shuffled");
    assert_eq!(order, epoch_batches(&ds, &reader_cfg(0, 5, 0)));
    assert_ne!(order, epoch_batches(&ds, &reader_cfg(0, 5, 1)), "another epoch, another order");
    assert_ne!(order, epoch_batches(&ds, &reader_cfg(0, 6, 0)), "another seed, another order");
    flat.sort();
    assert_eq!(flat, train, "every training sample exactly once");
    let mut dl = reader_cfg(0, 5, 0);
    dl.drop_last = true;
    assert!(epoch_batches(&ds, &dl).iter().all(|b| b.len() == 7));

    let single: Vec<_> = BatchReader::new(ds.clone(), &reader_cfg(0, 5, 0)).map(|b| b.unwrap()).collect();
    let threaded: Vec<_> = BatchReader::new(ds.clone(), &reader_cfg(3, 5, 0)).map(|b| b.unwrap()).collect();
    assert_eq!(single.len(), order.len());
    assert!(single == threaded, "threaded batches differ from single-threaded ones");
    let b = &single[0];
    assert_eq!(b.indices, order[0]);
    assert_eq!(b.images[1].shape, vec![7, H as usize, W as usize, 3]);
    assert_eq!(b.sensor.shape, vec![7, 10, 4]);
    assert_eq!(b.action.shape, vec![7, 4, 7]);
    // Normalized values follow the stats: element (sample 2, step 3, channel 1) of the action.
    let st = &ds.stats.action;
    let i = 2 * 28 + 3 * 7 + 1;
    let want = (b.action.data[i] as f64 - st.mean[1]) / st.std[1];
    assert!((b.action_norm.data[i] as f64 - want).abs() < 1e-5);
    assert_eq!(b.action.to_tensor().size(), vec![7, 4, 7]);
    // Dropping a reader early stops its workers.
    let mut r = BatchReader::new(ds, &reader_cfg(2, 5, 0));
    assert!(r.next().is_some());
    drop(r);
}

#[test]
fn info_cli_reports_counts_drops_streams_and_stats() {
    let eps = episodes(3);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let res = compile_to(&eps, &config(), &out);
    let bin = env!("CARGO_BIN_EXE_vla_finetune");
    let o = Command::new(bin).args(["dataset", "info"]).arg(&out).arg("--json").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["episodes"]["total"], 3);
    assert_eq!(v["samples"]["total"], res.report.samples);
    assert_eq!(v["samples"]["train"].as_u64().unwrap() + v["samples"]["val"].as_u64().unwrap(), res.report.samples);
    assert_eq!(v["drops"], serde_json::to_value(&res.report.drops).unwrap());
    let cam0 = &v["streams"]["cam0"];
    assert_eq!(cam0["kind"], "camera");
    let rate = cam0["rate_hz_min"].as_f64().unwrap();
    assert!((4.0..6.0).contains(&rate), "cam0 ~5 Hz, got {rate}");
    assert!(cam0["skew"]["max_s"].as_f64().unwrap() <= 0.3);
    assert_eq!(v["stats"]["state"]["mean"].as_array().unwrap().len(), 6);
    assert_eq!(v["camera_spread"]["samples"], res.report.samples);
    let spread = v["camera_spread"]["max_s"].as_f64().unwrap();
    assert!(spread > 0.0 && spread <= 0.3, "{spread}");
    let o = Command::new(bin).args(["dataset", "info"]).arg(&out).output().unwrap();
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.contains("episodes: 3") && text.contains("drops by reason") && text.contains("cam1 [camera]"),
        "{text}"
    );
    let o = Command::new(bin).args(["dataset", "info"]).arg(dir.path().join("nope")).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("index.json"));
}

#[test]
fn bad_and_empty_episodes_are_reported_and_the_rest_compiled() {
    let mut eps = episodes(3);
    eps[1].signals.sensors[0].1.values.truncate(10); // inconsistent sensor stream
    eps.push(MemoryEpisode {
        meta: EpisodeMeta { id: "ep99-empty".into(), ..Default::default() },
        cameras: vec![("cam0".into(), vec![]), ("cam1".into(), vec![])],
        signals: Signals {
            sensors: vec![("oct".into(), SensorSeries { channels: 4, ..Default::default() })],
            state: eps[0].signals.state.clone().tap_clear(),
            commands: None,
        },
    });
    let dir = tempfile::tempdir().unwrap();
    let res = compile_to(&eps, &config(), &dir.path().join("ds"));
    assert_eq!(res.report.failed_episodes.len(), 1);
    let f = &res.report.failed_episodes[0];
    assert_eq!(f.id, "ep01");
    assert!(f.error.contains("`oct`") && f.error.contains("expected"), "{}", f.error);
    let empty = res.report.episodes.iter().find(|e| e.id == "ep99-empty").unwrap();
    assert_eq!((empty.candidates, empty.samples), (0, 0));
    assert_eq!(res.index.episodes.len(), 3);
    assert!(res.report.samples > 0);
    // A frame with the wrong byte count and one of another size: counted drops, not errors.
    let mut eps = episodes(1);
    eps[0].cameras[0].1[3].1.data.truncate(10);
    eps[0].cameras[1].1[12].1 = RgbImage { width: 8, height: 8, data: vec![0; 8 * 8 * 3] };
    let res = compile_to(&eps, &config(), &dir.path().join("ds3"));
    let d = &res.report.drops;
    assert!(
        d.get("camera_bad_frame:cam0").copied().unwrap_or(0) >= 1
            && d.get("camera_size_changed:cam1").copied().unwrap_or(0) >= 1,
        "{d:?}"
    );
    let ds = Dataset::open(&dir.path().join("ds3")).unwrap();
    assert!((0..ds.len()).all(|i| ds.index.samples[i].frames[0] != 3 && ds.index.samples[i].frames[1] != 12));
    assert_eq!(ds.sample(0).unwrap().images[1].width, W);
    // An episode whose streams differ from the dataset's is left out with both shapes named.
    let mut eps = episodes(2);
    eps[1].cameras.pop();
    let res = compile_to(&eps, &config(), &dir.path().join("ds2"));
    assert!(res.report.failed_episodes[0].error.contains("cameras [\"cam0\"]"), "{:?}", res.report.failed_episodes);
    // Every sample time dropped: the error counts the reasons.
    let mut eps = episodes(2);
    for e in &mut eps {
        e.signals.sensors[0].1.values.fill(f32::NAN);
    }
    let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
    for e in &eps {
        let al = Aligner::new(e, &config().align).unwrap();
        for t in al.sample_times() {
            *reasons.entry(al.align(t).expect_err("dropped").key()).or_default() += 1;
        }
    }
    let times: usize = reasons.values().sum();
    assert!(reasons["sensor_non_finite"] > times / 2, "{reasons:?}");
    let refs: Vec<&dyn EpisodeSource> = eps.iter().map(|e| e as &dyn EpisodeSource).collect();
    let err = compile(&refs, &config(), &dir.path().join("nan"), false).unwrap_err().to_string();
    assert!(err.contains(&format!("(0 left out; all {times} sample times dropped: sensor_non_finite x")), "{err}");
    for (k, n) in &reasons {
        assert!(err.contains(&format!("{k} x{n}")), "{k} x{n} in {err}");
    }
}

trait TapClear {
    fn tap_clear(self) -> Self;
}
impl TapClear for StateSeries {
    fn tap_clear(mut self) -> Self {
        self.stamps.clear();
        self.values.clear();
        self
    }
}

#[test]
fn output_is_atomic_and_existing_data_kept() {
    let eps = episodes(2);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    let refs: Vec<&dyn EpisodeSource> = eps.iter().map(|e| e as &dyn EpisodeSource).collect();
    let err = compile(&refs, &config(), &out, false).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "precious");
    compile(&refs, &config(), &out, true).unwrap();
    assert!(!out.join("keep.txt").exists() && out.join("index.json").exists() && out.join("compile.yaml").exists());
    // No staging or old folders are left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("ds")]);
    // The stored config reads back as the one used.
    assert_eq!(CompileConfig::from_yaml_file(&out.join("compile.yaml")).unwrap(), config());
    // Duplicate ids are refused.
    let twice: Vec<&dyn EpisodeSource> = vec![&eps[0], &eps[0]];
    let err = compile(&twice, &config(), &dir.path().join("dup"), false).unwrap_err().to_string();
    assert!(err.contains("ep00"), "{err}");
    assert!(!dir.path().join("dup").exists());
}

#[test]
fn corrupt_shard_and_config_errors_name_the_file_and_field() {
    let eps = episodes(2);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    compile_to(&eps, &config(), &out);
    let shard = out.join("shard-00000.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let err = Dataset::open(&out).unwrap_err().to_string();
    assert!(err.contains("shard-00000.safetensors"), "{err}");

    let defaults =
        CompileConfig::from_yaml_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/compile.yaml")).unwrap();
    assert_eq!(defaults, CompileConfig::default(), "config/compile.yaml documents the defaults");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "align:\n  control_hz: 10\n  horizn: 8\n").unwrap();
    let err = CompileConfig::from_yaml_file(&bad).unwrap_err().to_string();
    assert!(err.contains("horizn") && err.contains("bad.yaml"), "{err}");
    std::fs::write(&bad, "align:\n  control_hz: -1\n").unwrap();
    assert!(CompileConfig::from_yaml_file(&bad).unwrap_err().to_string().contains("control_hz"));
}

#[test]
fn quantiles_beyond_the_reservoir_are_close() {
    // 100 000 rows of a known distribution (i / 100 000 in a scrambled order), 5 000 kept.
    let mut acc = StatsAccumulator::new(1, 5_000, 9);
    let n = 100_000u64;
    let rows: Vec<f32> = (0..n).map(|i| ((i * 7919) % n) as f32 / n as f32).collect();
    acc.add_rows(&rows);
    let s = acc.finish();
    assert_eq!(s.count, n);
    assert!((s.mean[0] - 0.499995).abs() < 1e-6, "mean is exact: {}", s.mean[0]);
    assert!((s.q01[0] - 0.01).abs() < 0.004 && (s.q99[0] - 0.99).abs() < 0.004, "{:?} {:?}", s.q01, s.q99);
}

/// Episodes opened now and most ever open at once, counted by [`Counted`].
#[derive(Default)]
struct OpenCount {
    now: AtomicUsize,
    most: AtomicUsize,
    opens: AtomicUsize,
}

/// An episode that counts itself open from its creation to its drop.
struct Counted {
    ep: MemoryEpisode,
    count: Arc<OpenCount>,
}

impl Counted {
    fn open(ep: MemoryEpisode, count: Arc<OpenCount>) -> Box<dyn EpisodeSource> {
        let now = count.now.fetch_add(1, Ordering::SeqCst) + 1;
        count.most.fetch_max(now, Ordering::SeqCst);
        count.opens.fetch_add(1, Ordering::SeqCst);
        Box::new(Counted { ep, count })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.count.now.fetch_sub(1, Ordering::SeqCst);
    }
}

impl EpisodeSource for Counted {
    fn meta(&self) -> &EpisodeMeta {
        self.ep.meta()
    }
    fn cameras(&self) -> Vec<String> {
        self.ep.cameras()
    }
    fn camera_stamps(&self, camera: &str) -> Result<Vec<Stamp>, SourceError> {
        self.ep.camera_stamps(camera)
    }
    fn camera_frame(&self, camera: &str, index: usize) -> Result<RgbImage, SourceError> {
        self.ep.camera_frame(camera, index)
    }
    fn signals(&self) -> Result<&Signals, SourceError> {
        self.ep.signals()
    }
}

#[test]
fn cli_compile_opens_one_episode_at_a_time() {
    use vla_finetune::cli::dataset::{run_compile, CompileArgs};
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("c.yaml");
    std::fs::write(&cfg_path, serde_yaml::to_string(&config()).unwrap()).unwrap();
    let args = CompileArgs {
        episodes: vec![dir.path().join("a"), dir.path().join("b")],
        config: Some(cfg_path),
        out: dir.path().join("ds"),
        overwrite: false,
        allow_losses: false,
        outcomes: vec!["any".into()],
        tasks: vec![],
    };
    // Each path gives three episodes named after it, opened only when read.
    let count = Arc::new(OpenCount::default());
    let open = |p: &Path| -> anyhow::Result<Vec<LazyEpisode<'static>>> {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        Ok((0..3)
            .map(|i| {
                let ep = episode(&format!("{name}{i}"), i);
                let count = count.clone();
                LazyEpisode {
                    meta: ep.meta.clone(),
                    unreadable: None,
                    open: Box::new(move || Counted::open(ep.clone(), count.clone())),
                }
            })
            .collect())
    };
    run_compile(&args, &open).unwrap();
    assert_eq!(count.most.load(Ordering::SeqCst), 1, "episodes open at once");
    assert_eq!(count.opens.load(Ordering::SeqCst), 12, "each episode opened twice: shapes, then samples");
    assert_eq!(count.now.load(Ordering::SeqCst), 0);
    // The same dataset as a compile of the six episodes held in memory.
    let held: Vec<MemoryEpisode> =
        ["a", "b"].iter().flat_map(|n| (0..3).map(move |i| episode(&format!("{n}{i}"), i))).collect();
    let whole = compile_to(&held, &config(), &dir.path().join("whole"));
    let ds = Dataset::open(&dir.path().join("ds")).unwrap();
    let ids: Vec<_> = ds.index.episodes.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["a0", "a1", "a2", "b0", "b1", "b2"]);
    assert_eq!(ds.index.samples, whole.index.samples);
    assert_eq!(Dataset::open(&dir.path().join("whole")).unwrap().stats, ds.stats);
    // A second run into the same folder is refused; an opener error names the path.
    assert!(run_compile(&args, &open).unwrap_err().to_string().contains("already exists"));
    let failing =
        |p: &Path| -> anyhow::Result<Vec<LazyEpisode<'static>>> { anyhow::bail!("cannot read {}", p.display()) };
    let args = CompileArgs { out: dir.path().join("ds2"), ..args };
    let err = format!("{:#}", run_compile(&args, &failing).unwrap_err());
    assert!(err.contains("opening episodes in") && err.contains("/a"), "{err}");
}

/// Episodes as an incremental compile takes them, each fingerprinted by its id; `opened` counts
/// the episodes opened.
fn fingerprinted<'a>(eps: &'a [MemoryEpisode], opened: &'a std::cell::Cell<usize>) -> Vec<FingerprintedEpisode<'a>> {
    eps.iter()
        .map(|e| FingerprintedEpisode {
            id: e.meta.id.clone(),
            fingerprint: format!("fp-{}", e.meta.id),
            open: Box::new(move || {
                opened.set(opened.get() + 1);
                Box::new(e.clone()) as Box<dyn EpisodeSource>
            }),
        })
        .collect()
}

#[test]
fn incremental_compile_equals_a_whole_compile_and_reads_only_new_episodes() {
    let mut eps = episodes(6);
    eps[1].signals.sensors[0].1.values.truncate(10); // left out: inconsistent sensor stream
    eps[4].cameras.pop(); // left out: streams differ from the majority's
    eps[5].cameras[1].1[12].1 = RgbImage { width: 8, height: 8, data: vec![0; 8 * 8 * 3] }; // one frame of another size
    let mut cfg = config();
    cfg.split.val_fraction = 0.5;
    let dir = tempfile::tempdir().unwrap();
    let whole = compile_to(&eps, &cfg, &dir.path().join("whole"));
    let parts = dir.path().join("parts");
    let opened = std::cell::Cell::new(0);

    let first =
        compile_incremental(&fingerprinted(&eps[..3], &opened), &cfg, &parts, &dir.path().join("inc3")).unwrap();
    assert_eq!((first.compiled, first.reused, opened.get()), (3, 0, 3));
    assert_eq!(first.output.report.failed_episodes.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), ["ep01"]);
    // All six: the two good parts are reused, the failed episode is tried again.
    let inc = compile_incremental(&fingerprinted(&eps, &opened), &cfg, &parts, &dir.path().join("inc")).unwrap();
    assert_eq!((inc.compiled, inc.reused, opened.get()), (4, 2, 7), "only the episodes compiled are opened");

    assert_eq!(inc.output.report, whole.report);
    assert_eq!(inc.output.stats, whole.stats);
    let (a, b) = (&inc.output.index, &whole.index);
    assert_eq!(
        (&a.cameras, &a.episodes, a.sensor_shape, &a.state_names, a.action_shape),
        (&b.cameras, &b.episodes, b.sensor_shape, &b.state_names, b.action_shape)
    );
    let key = |s: &vla_finetune::dataset::store::SampleEntry| (s.episode, s.t_ns, s.split, s.frames.clone());
    assert_eq!(a.samples.iter().map(key).collect::<Vec<_>>(), b.samples.iter().map(key).collect::<Vec<_>>());
    assert!(
        whole.report.failed_episodes.len() == 2
            && whole.report.drops.get("camera_size_changed:cam1").copied().unwrap_or(0) >= 1
    );
    assert!(
        whole.index.episodes.iter().any(|e| e.split == Split::Val)
            && whole.index.episodes.iter().any(|e| e.split == Split::Train)
    );
    let (da, db) = (Dataset::open(&dir.path().join("inc")).unwrap(), Dataset::open(&dir.path().join("whole")).unwrap());
    assert_eq!(da.len(), db.len());
    for i in 0..da.len() {
        let (x, y) = (da.sample(i).unwrap(), db.sample(i).unwrap());
        assert_eq!(
            (&x.episode, x.t_ns, &x.sensor, &x.state, &x.action),
            (&y.episode, y.t_ns, &y.sensor, &y.state, &y.action)
        );
        for c in 0..2 {
            assert_eq!(da.jpeg(i, c).unwrap(), db.jpeg(i, c).unwrap(), "sample {i} camera {c}");
        }
    }
    // Other split settings reuse every part (ep04's too: it is left out when assembled), only the
    // unreadable ep01 is tried again; other alignment settings compile every episode again.
    cfg.split.seed = 9;
    let resplit = compile_incremental(&fingerprinted(&eps, &opened), &cfg, &parts, &dir.path().join("inc")).unwrap();
    assert_eq!((resplit.compiled, resplit.reused), (1, 5));
    assert_eq!(resplit.output.report, compile_to(&eps, &cfg, &dir.path().join("whole9")).report);
    cfg.align.horizon = 3;
    assert_eq!(
        compile_incremental(&fingerprinted(&eps, &opened), &cfg, &parts, &dir.path().join("inc")).unwrap().compiled,
        6
    );
}
