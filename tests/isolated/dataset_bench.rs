//! Throughput benchmark of the dataset compiler and reader (ignored by default; it prints
//! numbers and asserts nothing about speed):
//!
//! `cargo test --test dataset_bench -- --ignored --nocapture`
//!
//! Reference-sized streams: 2 cameras 640x360 RGB at 15 Hz, a 650 Hz x 1026-channel sensor,
//! pose at 100 Hz; samples at 10 Hz with a 650 x 1026 window and 8 x 7 actions.

use std::sync::Arc;
use std::time::Instant;

use crate::support::serial;
use vla_finetune::dataset::align::AlignConfig;
use vla_finetune::dataset::compile::{compile, CompileConfig, SplitConfig, StoreConfig};
use vla_finetune::dataset::episode::{
    EpisodeMeta, EpisodeSource, RgbImage, SensorSeries, Signals, SourceError, Stamp, StateSeries,
};
use vla_finetune::dataset::reader::{BatchReader, Dataset, ReaderConfig};
use vla_finetune::dataset::store::Split;

const MS: i64 = 1_000_000;

/// Streams generated once, outside the timed part; frames cycle through 30 rendered ones so
/// that they need not all sit in memory.
struct SynthEpisode {
    meta: EpisodeMeta,
    seconds: i64,
    frames: Arc<Vec<RgbImage>>,
    signals: Signals,
}

/// A smooth scene with a moving bright square: compresses like a real frame, not like noise.
fn render(index: usize) -> RgbImage {
    let (w, h) = (640usize, 360usize);
    let shift = index * 21;
    let mut data = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let p = (y * w + x) * 3;
            let sq = (x + 640 - shift % 640) % 640 < 80 && (140..220).contains(&y);
            data[p] = if sq { 250 } else { (x / 3) as u8 };
            data[p + 1] = if sq { 240 } else { (y * 2 / 3) as u8 };
            data[p + 2] = ((x + y) / 5) as u8;
        }
    }
    RgbImage { width: w as u32, height: h as u32, data }
}

impl SynthEpisode {
    fn stamps(&self, period_ns: i64) -> Vec<Stamp> {
        (0..self.seconds * 1_000_000_000 / period_ns)
            .map(|i| Stamp { stamp_ns: i * period_ns + (i * 7919 % 1000) * 1000, recv_ns: i * period_ns + 2 * MS })
            .collect()
    }
}

impl EpisodeSource for SynthEpisode {
    fn meta(&self) -> &EpisodeMeta {
        &self.meta
    }
    fn cameras(&self) -> Vec<String> {
        vec!["front".into(), "wrist".into()]
    }
    fn camera_stamps(&self, _camera: &str) -> Result<Vec<Stamp>, SourceError> {
        Ok(self.stamps(1_000_000_000 / 15))
    }
    fn camera_frame(&self, camera: &str, index: usize) -> Result<RgbImage, SourceError> {
        let offset = if camera == "front" { 0 } else { 15 };
        Ok(self.frames[(index + offset) % self.frames.len()].clone())
    }
    fn signals(&self) -> Result<&Signals, SourceError> {
        Ok(&self.signals)
    }
}

/// A stream-less episode of `seconds`, for its stamps.
fn probe(seconds: i64) -> SynthEpisode {
    SynthEpisode { meta: EpisodeMeta::default(), seconds, frames: Arc::new(Vec::new()), signals: Signals::default() }
}

fn synth_state(seconds: i64) -> StateSeries {
    let stamps = probe(seconds).stamps(10 * MS);
    let values =
        (0..stamps.len()).map(|k| vec![k as f64 * 0.1, 0.0, 1.0, 0.0, 0.0, (k as f64 * 0.5) % 360.0 - 180.0]).collect();
    StateSeries {
        names: ["x", "y", "z", "roll", "pitch", "yaw"].map(String::from).to_vec(),
        is_angle_deg: vec![false, false, false, true, true, true],
        stamps,
        values,
    }
}

fn synth_sensor(seconds: i64, channels: usize) -> SensorSeries {
    let stamps = probe(seconds).stamps(1_000_000_000 / 650);
    let mut values = Vec::with_capacity(stamps.len() * channels);
    for i in 0..stamps.len() {
        values.push((i as f32 * 0.01).sin());
        values.extend((1..channels).map(|c| ((c + i) % 97) as f32 * 0.01));
    }
    SensorSeries { stamps, channels, values }
}

/// CPU seconds (user + system) used by this process so far, from /proc/self/stat.
fn cpu_s() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split(' ').collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name; clock ticks of 10 ms.
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn run(sensor_samples: usize, window_s: f64, episodes: usize, seconds: i64) {
    let frames = Arc::new((0..30).map(render).collect::<Vec<_>>());
    let signals = Signals {
        sensors: vec![("oct".into(), synth_sensor(seconds, 1026))],
        state: synth_state(seconds),
        commands: None,
    };
    let eps: Vec<SynthEpisode> = (0..episodes)
        .map(|i| SynthEpisode {
            meta: EpisodeMeta { id: format!("ep{i}"), ..Default::default() },
            seconds,
            frames: frames.clone(),
            signals: signals.clone(),
        })
        .collect();
    let refs: Vec<&dyn EpisodeSource> = eps.iter().map(|e| e as &dyn EpisodeSource).collect();
    let cfg = CompileConfig {
        align: AlignConfig { sensor: "oct".into(), sensor_samples, sensor_window_s: window_s, ..Default::default() },
        split: SplitConfig { val_fraction: 0.0, seed: 0, ..Default::default() },
        store: StoreConfig::default(),
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let (t0, c0) = (Instant::now(), cpu_s());
    let res = compile(&refs, &cfg, &out, false).unwrap();
    let (dt, cpu) = (t0.elapsed().as_secs_f64(), cpu_s() - c0);
    let n = res.report.samples as f64;
    let bytes: u64 = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    println!(
        "compile: sensor window {sensor_samples}x1026, {} episodes x {seconds} s: {} samples in {dt:.2} s = {:.1} samples/s; {cpu:.2} CPU s = {:.1} samples per CPU s ({:.2} MB on disk per sample)",
        episodes,
        n,
        n / dt,
        n / cpu,
        bytes as f64 / n / 1e6
    );
    let ds = Arc::new(Dataset::open(&out).unwrap());
    for workers in [0, 2] {
        let rc = ReaderConfig {
            split: Split::Train,
            batch_size: 32,
            shuffle: true,
            seed: 1,
            epoch: 0,
            drop_last: true,
            workers,
            prefetch: 4,
        };
        let (t0, c0) = (Instant::now(), cpu_s());
        let mut count = 0usize;
        for b in BatchReader::new(ds.clone(), &rc) {
            count += b.unwrap().indices.len();
        }
        let (dt, cpu) = (t0.elapsed().as_secs_f64(), cpu_s() - c0);
        println!(
            "reader: batch 32, 2 views 640x360 JPEG decode, workers {workers}: {count} samples in {dt:.2} s = {:.1} samples/s; {cpu:.2} CPU s = {:.1} samples per CPU s",
            count as f64 / dt,
            count as f64 / cpu
        );
    }
}

#[test]
#[ignore = "benchmark; run with --ignored --nocapture"]
fn dataset_throughput() {
    let _serial = serial();
    // The reference's 1 s window (650 samples) and its fast 0.1 s variant (65 samples).
    run(650, 1.0, 2, 12);
    run(65, 0.1, 2, 12);
}
