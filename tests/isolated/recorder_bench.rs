//! Benchmark (ignored by default; numbers go to docs/benchmarks.md, no timing asserts):
//! the recorder core alone, fed pre-generated simulator messages for the load (5 cameras
//! 640x360 rgb8 at 30 Hz, 650 Hz x 1026 floats, 100 Hz pose), 10 s of data per compression.
//! `cargo test --test recorder_bench -- --ignored --nocapture`

use crate::support::serial;
use std::time::Instant;
use vla_finetune::dataset::mcap_episode::{Compression, WriterOptions};
use vla_finetune::dataset::recorder::{EpisodeInfo, Recorder, RecorderConfig};
use vla_finetune::sim::{SimConfig, SimMessage};

/// Process CPU time (user + system), seconds.
fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

#[test]
#[ignore]
fn recorder_throughput_5x640x360_at_30hz_plus_sensor_and_pose() {
    let _serial = serial();
    let sim = SimConfig { seed: 1, cameras: 5, width: 640, height: 360, camera_hz: 30.0, ..Default::default() };
    let msgs: Vec<SimMessage> = sim.episode(0, 0, 2.0).collect();
    for comp in [Compression::Zstd, Compression::Lz4] {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let cfg = RecorderConfig {
            root: dir.path().into(),
            streams: sim.streams(),
            queue_capacity: 4096,
            queue_bytes: 256 << 20,
            writer: WriterOptions { compression: comp, ..Default::default() },
        };
        let (rec, _) = Recorder::open(cfg).unwrap();
        rec.start(EpisodeInfo { id: Some("b".into()), ..Default::default() }, 0).unwrap();
        let (c0, t0) = (cpu(), Instant::now());
        for rep in 0..5i64 {
            for m in &msgs {
                let off = rep * 2_000_000_000;
                rec.push_wait(&m.topic, m.type_name, m.cdr.clone(), m.stamp_ns + off, m.recv_ns + off);
            }
        }
        rec.stop_at("success", 10_000_000_000).unwrap();
        let (wall, c) = (t0.elapsed().as_secs_f64(), cpu() - c0);
        let st = rec.status();
        let drops: u64 = st.topics.iter().map(|t| t.dropped).sum();
        let bytes: u64 = st.topics.iter().map(|t| t.bytes).sum();
        assert_eq!(drops, 0, "push_wait never drops");
        println!("{comp:?}: 10 s of data in {wall:.2} s wall ({:.1}x real time), {c:.2} CPU-s ({:.1}x real time per core), {:.0} MB CDR, drops {drops}", 10.0 / wall, 10.0 / c, bytes as f64 / 1e6);
    }
}
