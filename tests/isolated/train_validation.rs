//! Validation in chunks (`train::heads_job::validation_error`, the pass of stage 1 and, through
//! `ValidationSums`, of Stage 2): the chunked result equals one pass over the whole split, and the
//! pass's peak host memory does not grow with the validation split.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::support::serial;
use tch::{Device, Kind, Tensor};
use vla_finetune::dataset::align::AlignConfig;
use vla_finetune::dataset::compile::{compile, CompileConfig, SplitConfig, StoreConfig};
use vla_finetune::dataset::episode::{
    EpisodeMeta, EpisodeSource, MemoryEpisode, RgbImage, SensorSeries, Signals, Stamp, StateSeries,
};
use vla_finetune::dataset::reader::Dataset;
use vla_finetune::dataset::store::Split;
use vla_finetune::policy::{
    ActionExpertConfig, CondInput, NoiseRng, NormStats, PolicyConfig, PolicyHeads, SensorEncoderConfig, VlInput,
};
use vla_finetune::train::heads_job::{validation_error, validation_noise, ValidationSums};

const MS: i64 = 1_000_000;
const CHANNELS: usize = 128;
const WINDOW: usize = 650;
const VL_DIM: i64 = 8;

/// A 3 s episode: a 16x8 camera at 10 Hz, a 128-channel sensor at 650 Hz, pose at 100 Hz.
fn episode(e: usize) -> MemoryEpisode {
    let stamp = |ns: i64| Stamp { stamp_ns: ns, recv_ns: ns + MS };
    let frame = |f: usize| RgbImage { width: 16, height: 8, data: vec![(f * 9 % 250) as u8; 16 * 8 * 3] };
    let mut sensor = SensorSeries { channels: CHANNELS, ..Default::default() };
    for i in 0..3 * 650 {
        sensor.stamps.push(stamp(i * 1_000_000_000 / 650));
        sensor.values.extend((0..CHANNELS).map(|c| ((i as usize * 7 + c * 13 + e) % 101) as f32 * 0.01));
    }
    let mut state = StateSeries {
        names: ["x", "y", "z", "roll", "pitch", "yaw"].map(String::from).to_vec(),
        is_angle_deg: vec![false, false, false, true, true, true],
        ..Default::default()
    };
    for k in 0..300 {
        state.stamps.push(stamp(k * 10 * MS));
        let t = k as f64 * 0.01;
        state.values.push(vec![(t + e as f64).sin() * 20.0, t * 5.0, e as f64, 0.0, 0.0, (t * 30.0) % 90.0]);
    }
    MemoryEpisode {
        meta: EpisodeMeta {
            id: format!("ep{e:02}"),
            instruction: "insert".into(),
            task: "insert".into(),
            ..Default::default()
        },
        cameras: vec![("cam".into(), (0..30).map(|f| (stamp(f as i64 * 100 * MS), frame(f))).collect())],
        signals: Signals { sensors: vec![("oct".into(), sensor)], state, commands: None },
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    ds: Dataset,
    /// Validation indices of each validation episode, in stored order.
    val_episodes: Vec<Vec<usize>>,
}

/// Ten episodes, eight of them validation ones (~16 samples each, sensor windows 650 x 128).
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        tch::set_num_threads(1);
        let eps: Vec<MemoryEpisode> = (0..10).map(episode).collect();
        let refs: Vec<&dyn EpisodeSource> = eps.iter().map(|e| e as &dyn EpisodeSource).collect();
        let cfg = CompileConfig {
            align: AlignConfig { sensor_window_s: 1.0, sensor_samples: WINDOW, horizon: 4, ..Default::default() },
            split: SplitConfig { val_fraction: 0.8, seed: 3, ..Default::default() },
            store: StoreConfig::default(),
        };
        let dir = tempfile::tempdir().unwrap();
        let out: PathBuf = dir.path().join("ds");
        compile(&refs, &cfg, &out, false).unwrap();
        let ds = Dataset::open(&out).unwrap();
        let mut val_episodes: Vec<Vec<usize>> = Vec::new();
        for i in ds.split_indices(Split::Val) {
            let ep = ds.index.samples[i].episode;
            match val_episodes.last_mut() {
                Some(v) if ds.index.samples[v[0]].episode == ep => v.push(i),
                _ => val_episodes.push(vec![i]),
            }
        }
        assert_eq!(val_episodes.len(), 8, "8 validation episodes");
        Fixture { _dir: dir, ds, val_episodes }
    })
}

fn heads(ds: &Dataset) -> PolicyHeads {
    tch::manual_seed(4);
    let [_, action_dim] = ds.index.action_shape;
    let cfg = PolicyConfig {
        vl_dim: VL_DIM,
        sensor: SensorEncoderConfig {
            window: WINDOW as i64,
            in_channels: CHANNELS as i64,
            conv_channels: vec![8],
            d_model: 8,
            n_heads: 2,
            n_layers: 1,
            ff_dim: 16,
            out_dim: 8,
            dropout: 0.0,
        },
        expert: ActionExpertConfig {
            horizon: 4,
            action_dim: action_dim as i64,
            d_model: 16,
            n_heads: 2,
            n_layers: 1,
            ff_dim: 32,
            dropout: 0.0,
        },
        ..PolicyConfig::default()
    };
    PolicyHeads::new(cfg, NormStats::from_dataset(&ds.stats, 0), Device::Cpu).unwrap()
}

/// Pooled VL features `[1, VL_DIM]` of every sample (random, fixed).
fn features(n: usize) -> Vec<Tensor> {
    let mut rng = NoiseRng::new(8);
    (0..n).map(|_| rng.randn(&[1, VL_DIM], Device::Cpu)).collect()
}

#[test]
fn chunked_validation_equals_one_pass_over_the_split() {
    let _g = serial();
    let f = fixture();
    let heads = heads(&f.ds);
    let feats = features(f.ds.len());
    let val: Vec<usize> = f.val_episodes[..3].concat();
    // The reference: the whole split in one batch, read with the image-decoding reader.
    let b = f.ds.batch(&val).unwrap();
    let vl = VlInput::pooled(Tensor::cat(&val.iter().map(|&i| feats[i].shallow_clone()).collect::<Vec<_>>(), 0));
    let sensor = b.sensor.to_tensor();
    let x_t = Tensor::cat(&val.iter().map(|&i| validation_noise(&heads, 7, i)).collect::<Vec<_>>(), 0);
    let c = CondInput { vl: &vl, sensor: &sensor, state: None };
    let pred = heads.sample_from(&c, x_t, 10, 0.0, &mut NoiseRng::new(0)).unwrap();
    let want = Vec::<f64>::try_from((pred - b.action.to_tensor()).abs().mean_dim(&[0i64, 1][..], false, Kind::Double))
        .unwrap();
    for chunk in [1, 5, val.len()] {
        let got = validation_error(&heads, &f.ds, &val, &feats, 7, chunk).unwrap();
        assert_eq!(got.len(), want.len());
        for (d, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6, "chunk {chunk}, dim {d}: {g} vs one pass {w}");
        }
    }
    // The loss sums: chunks of 4 weigh each chunk's mean by its size.
    let loss = |chunk: usize| {
        let mut s = ValidationSums::default();
        for idx in val.chunks(chunk) {
            let vl = Tensor::cat(&idx.iter().map(|&i| feats[i].shallow_clone()).collect::<Vec<_>>(), 0);
            s.add(&heads, &f.ds, idx, &vl, 7, Some(1)).unwrap();
        }
        s.loss()
    };
    let (whole, chunked) = (loss(val.len()), loss(4));
    assert!(whole > 0.0 && (whole - chunked).abs() <= 1e-6, "loss {whole} in one pass, {chunked} in chunks of 4");
}

/// `key` of /proc/self/status (a `kB` line), in bytes.
fn status_bytes(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/self/status"));
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

extern "C" {
    /// glibc: returns the free pages of every malloc arena to the system.
    fn malloc_trim(pad: usize) -> std::ffi::c_int;
}

/// The process's private (not file-backed) resident memory before `f` and at its peak while
/// `f` runs, bytes. Freed heap pages are first returned to the system (`malloc_trim`), so what
/// `f` allocates must fault in new pages; the peak is the resident high-water mark, reset before
/// `f` (/proc/self/clear_refs), minus the file-backed and shared pages resident after it (the
/// memory-mapped dataset shards, whose resident part only grows during a pass). Other processes
/// on the machine do not enter either number.
fn private_memory_around(f: impl FnOnce()) -> (u64, u64) {
    // SAFETY: malloc_trim only releases free memory; no pointer is passed.
    unsafe { malloc_trim(0) };
    let before = status_bytes("RssAnon");
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    f();
    (before, status_bytes("VmHWM") - status_bytes("RssFile") - status_bytes("RssShmem"))
}

#[test]
fn validation_peak_memory_does_not_grow_with_the_split() {
    let _g = serial();
    let f = fixture();
    let heads = heads(&f.ds);
    let feats = features(f.ds.len());
    let one = f.val_episodes[0].clone();
    let eight: Vec<usize> = f.val_episodes.concat();
    assert!(eight.len() >= 8 * one.len() - 8, "the 8x split is ~8 times the 1x one");
    let pass = |val: &[usize], chunk: usize| {
        let _ = validation_error(&heads, &f.ds, val, &feats, 7, chunk).unwrap();
    };
    pass(&eight, 8); // warm-up: libtorch's lazy state
    let (b1, p1) = private_memory_around(|| pass(&one, 8));
    let (b8, p8) = private_memory_around(|| pass(&eight, 8));
    // The same counters see an unchunked pass over the 8x split (the old behaviour) grow.
    let (bw, pw) = private_memory_around(|| pass(&eight, eight.len()));
    let mb = |b: u64| b as f64 / 1e6;
    let sensor_mb = |v: &[usize]| (v.len() * WINDOW * CHANNELS * 4) as f64 / 1e6;
    eprintln!(
        "validation pass, private memory peak (before -> peak, MB): 1x {} samples (sensor {:.1} MB) {:.1} -> {:.1}; \
         8x {} samples (sensor {:.1} MB) {:.1} -> {:.1}; 8x in one chunk {:.1} -> {:.1}",
        one.len(),
        sensor_mb(&one),
        mb(b1),
        mb(p1),
        eight.len(),
        sensor_mb(&eight),
        mb(b8),
        mb(p8),
        mb(bw),
        mb(pw)
    );
    let growth = p8 as f64 / p1 as f64 - 1.0;
    assert!(growth.abs() <= 0.10, "peak {:.1} MB at 8x vs {:.1} MB at 1x ({:+.1} %)", mb(p8), mb(p1), growth * 100.0);
    assert!(
        pw as f64 > 1.1 * p1 as f64,
        "an unchunked 8x pass peaks at {:.1} MB, 1x chunked at {:.1} MB: the counters cannot see the growth",
        mb(pw),
        mb(p1)
    );
}
