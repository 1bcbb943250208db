//! Simulated robot node: publishes the simulator's camera, tactile/OCT and pose messages (already
//! CDR-encoded by `sim`) in real time, episode after episode, stamped by the node clock, on the
//! topics of config/streams_sim.yaml with their QoS. With `published_log` set it appends one line
//! `<topic> <stamp_ns>` per published message, so tests can compare a recording with what was sent;
//! with `truth_log` set, one `sim::truth::EpisodeTruth` line per episode as it starts (its span on
//! the node clock), the ground truth an oracle or a test matches a recording against.

use super::clock::NodeClock;
use super::collector::ros_topic;
use super::params::{declare, Params, ParamsExt};
use super::NodeRuntime;
use crate::dataset::streams::Reliability;
use crate::sim::truth::{self, EpisodeTruth};
use crate::sim::{SimConfig, SimMessage};
use anyhow::{Context as _, Result};
use r2r::{PublisherUntyped, QosProfile};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The simulator's settings from the node's parameters.
fn sim_config(p: &Params) -> SimConfig {
    SimConfig {
        seed: p.int("seed") as u64,
        cameras: p.int("cameras").max(1) as usize,
        width: p.int("image_width").max(28) as u32,
        height: p.int("image_height").max(28) as u32,
        camera_hz: p.double("camera_rate_hz"),
        sensor_hz: p.double("sensor_rate_hz"),
        pose_hz: p.double("pose_rate_hz"),
        ..SimConfig::default()
    }
}

/// The file parameter `name` opened for appending (`None` when empty).
fn append_to(p: &Params, name: &str) -> Result<Option<(PathBuf, File)>> {
    match p.string(name).as_str() {
        "" => Ok(None),
        path => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("parameter {name} = `{path}`"))?;
            Ok(Some((PathBuf::from(path), file)))
        }
    }
}

/// One publisher per simulated stream, by topic, with the stream's QoS.
fn publishers(node: &mut r2r::Node, sim: &SimConfig) -> Result<HashMap<String, PublisherUntyped>> {
    let mut publishers = HashMap::new();
    for (_, spec) in sim.streams().all() {
        let q = spec.qos();
        let qos = match q.reliability {
            Reliability::Reliable => QosProfile::default().reliable(),
            Reliability::BestEffort => QosProfile::sensor_data(),
        }
        .keep_last(q.depth);
        let publisher = node.create_publisher_untyped(ros_topic(&spec.topic), spec.kind().name(), qos)?;
        publishers.insert(spec.topic.clone(), publisher);
    }
    Ok(publishers)
}

/// Runs the simulated robot node until SIGINT / SIGTERM.
pub fn main() -> Result<()> {
    let mut n = NodeRuntime::new("sim_robot")?;
    let p = declare(&mut n.node, &n.rt, "sim_robot_node", |_, _| {})?;
    let sim = sim_config(&p);
    let episode_s = p.double("episode_seconds");
    let log = append_to(&p, "published_log")?.map(|(_, file)| BufWriter::new(file));
    // Opened now to fail at start, as for published_log; each episode appends to it later.
    let truth_log = append_to(&p, "truth_log")?.map(|(path, _)| path);
    let publishers = publishers(&mut n.node, &sim)?;
    let (stop, clock) = (n.stop.clone(), n.clock.clone());
    let publisher = SimPublisher { sim, episode_s, publishers, log, truth_log, clock, stop };
    let publishing = std::thread::spawn(move || publisher.run());
    n.spin();
    if let Ok(Some(mut w)) = publishing.join() {
        w.flush().context("flush published_log")?;
    }
    Ok(())
}

/// The publishing thread: the simulator, its publishers and logs.
struct SimPublisher {
    sim: SimConfig,
    episode_s: f64,
    publishers: HashMap<String, PublisherUntyped>,
    log: Option<BufWriter<File>>,
    truth_log: Option<PathBuf>,
    clock: NodeClock,
    stop: Arc<AtomicBool>,
}

impl SimPublisher {
    /// Publishes episode after episode until the node stops; hands back the published log.
    fn run(mut self) -> Option<BufWriter<File>> {
        for index in 0.. {
            if !self.episode(index) {
                break;
            }
        }
        self.log
    }

    /// Publishes episode `index` in real time from the node clock's now; false once stopped.
    fn episode(&mut self, index: u64) -> bool {
        // Under simulated time the clock reads 0 until /clock has spoken: stamps start then.
        if !self.wait_until(|now| now != 0, Duration::from_millis(10)) {
            return false;
        }
        let (start_wall, start_ns) = (Instant::now(), self.clock.now_ns());
        let scene = self.sim.scene(index);
        tracing::info!("sim episode {index}: {}", scene.instruction());
        // The span of the stamps sim.episode gives this episode's messages.
        let end_ns = start_ns + (self.episode_s * 1e9) as i64;
        if let Some(path) = &self.truth_log {
            if let Err(e) = truth::append(path, &EpisodeTruth::new(&scene, self.sim.seed, index, start_ns, end_ns)) {
                tracing::error!("episode {index}: {e}");
            }
        }
        for m in self.sim.episode(index, start_ns, self.episode_s) {
            let due = start_wall + Duration::from_nanos((m.stamp_ns - start_ns).max(0) as u64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if self.stop.load(Ordering::SeqCst) {
                return false;
            }
            self.publish(&m);
        }
        // The next scene starts once this one's span is over: one scene at a time.
        self.wait_until(|now| now >= end_ns, Duration::from_millis(1))
    }

    /// Publishes `m`, logging it to the published log.
    fn publish(&mut self, m: &SimMessage) {
        match self.publishers[&m.topic].publish_raw(&m.cdr) {
            Ok(()) => {
                if let Some(w) = self.log.as_mut() {
                    let _ = writeln!(w, "{} {}", m.topic, m.stamp_ns);
                }
            }
            Err(e) => tracing::warn!("{}: {e}", m.topic),
        }
    }

    /// Naps `nap` at a time until `ready` holds of the node clock's now (true) or the node
    /// stops (false).
    fn wait_until(&self, ready: impl Fn(i64) -> bool, nap: Duration) -> bool {
        while !ready(self.clock.now_ns()) {
            if self.stop.load(Ordering::SeqCst) {
                return false;
            }
            std::thread::sleep(nap);
        }
        true
    }
}
