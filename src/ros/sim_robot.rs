//! Simulated robot node: publishes the simulator's camera, tactile/OCT and pose messages (already
//! CDR-encoded by `sim`) in real time, episode after episode, stamped by the node clock, on the
//! topics of config/streams_sim.yaml with their QoS. With `published_log` set it appends one line
//! `<topic> <stamp_ns>` per published message, so tests can compare a recording with what was sent;
//! with `truth_log` set, one `sim::truth::EpisodeTruth` line per episode as it starts (its span on
//! the node clock), the ground truth an oracle or a test matches a recording against.

use super::collector::ros_topic;
use super::params::{declare, ParamsExt};
use super::NodeRuntime;
use crate::dataset::streams::Reliability;
use crate::sim::truth::{self, EpisodeTruth};
use crate::sim::SimConfig;
use anyhow::{Context as _, Result};
use r2r::QosProfile;
use std::collections::HashMap;
use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Runs the simulated robot node until SIGINT / SIGTERM.
pub fn main() -> Result<()> {
    let mut n = NodeRuntime::new("sim_robot")?;
    let p = declare(&mut n.node, &n.rt, "sim_robot_node", |_, _| {})?;
    let sim = SimConfig {
        seed: p.int("seed") as u64,
        cameras: p.int("cameras").max(1) as usize,
        width: p.int("image_width").max(28) as u32,
        height: p.int("image_height").max(28) as u32,
        camera_hz: p.double("camera_rate_hz"),
        sensor_hz: p.double("sensor_rate_hz"),
        pose_hz: p.double("pose_rate_hz"),
        ..SimConfig::default()
    };
    let episode_s = p.double("episode_seconds");
    let mut log = match p.string("published_log").as_str() {
        "" => None,
        path => Some(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("parameter published_log = `{path}`"))?,
        )),
    };
    let truth_log = match p.string("truth_log").as_str() {
        "" => None,
        path => {
            // Fail at start, as for published_log, when the file cannot be opened for appending.
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("parameter truth_log = `{path}`"))?;
            Some(std::path::PathBuf::from(path))
        }
    };
    let mut publishers = HashMap::new();
    for (_, spec) in sim.streams().all() {
        let q = spec.qos();
        let qos = match q.reliability {
            Reliability::Reliable => QosProfile::default().reliable(),
            Reliability::BestEffort => QosProfile::sensor_data(),
        }
        .keep_last(q.depth);
        let publisher = n.node.create_publisher_untyped(ros_topic(&spec.topic), spec.kind().name(), qos)?;
        publishers.insert(spec.topic.clone(), publisher);
    }
    let (stop, clock) = (n.stop.clone(), n.clock.clone());
    let publishing = std::thread::spawn(move || {
        for index in 0.. {
            // Under simulated time the clock reads 0 until /clock has spoken: stamps start then.
            while clock.now_ns() == 0 {
                if stop.load(Ordering::SeqCst) {
                    return log;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let (start_wall, start_ns) = (Instant::now(), clock.now_ns());
            let scene = sim.scene(index);
            tracing::info!("sim episode {index}: {}", scene.instruction());
            // The span of the stamps sim.episode gives this episode's messages.
            let end_ns = start_ns + (episode_s * 1e9) as i64;
            if let Some(path) = &truth_log {
                if let Err(e) = truth::append(path, &EpisodeTruth::new(&scene, sim.seed, index, start_ns, end_ns)) {
                    tracing::error!("episode {index}: {e}");
                }
            }
            for m in sim.episode(index, start_ns, episode_s) {
                let due = start_wall + Duration::from_nanos((m.stamp_ns - start_ns).max(0) as u64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                if stop.load(Ordering::SeqCst) {
                    return log;
                }
                match publishers[&m.topic].publish_raw(&m.cdr) {
                    Ok(()) => {
                        if let Some(w) = log.as_mut() {
                            let _ = writeln!(w, "{} {}", m.topic, m.stamp_ns);
                        }
                    }
                    Err(e) => tracing::warn!("{}: {e}", m.topic),
                }
            }
            // The next scene starts once this one's span is over: one scene at a time.
            while clock.now_ns() < end_ns {
                if stop.load(Ordering::SeqCst) {
                    return log;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        log
    });
    n.spin();
    if let Ok(Some(mut w)) = publishing.join() {
        w.flush().context("flush published_log")?;
    }
    Ok(())
}
