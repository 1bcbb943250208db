//! Simulated robot node: publishes the simulator's camera, tactile/OCT and pose messages (already
//! CDR-encoded by `sim`) in real time, episode after episode, on the topics of
//! config/streams_sim.yaml.

use super::params::{declare, ParamsExt};
use crate::dataset::recorder::now_ns;
use crate::sim::SimConfig;
use anyhow::Result;
use r2r::QosProfile;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// Runs the simulated robot node until the process is stopped.
pub fn main() -> Result<()> {
    crate::logging::init("info");
    let ctx = r2r::Context::create()?;
    let mut node = r2r::Node::create(ctx, "sim_robot", "")?;
    let p = declare(&node, "sim_robot_node")?;
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
    let mut publishers = HashMap::new();
    for (_, spec) in sim.streams().all() {
        let publisher = node.create_publisher_untyped(&spec.topic, spec.kind().name(), QosProfile::sensor_data())?;
        publishers.insert(spec.topic.clone(), publisher);
    }
    std::thread::spawn(move || {
        for index in 0.. {
            let (start_wall, start_ns) = (Instant::now(), now_ns());
            let episode = sim.episode(index, start_ns, episode_s);
            tracing::info!("sim episode {index}: target {}", sim.scene(index).target_color);
            for m in episode {
                let due = start_wall + Duration::from_nanos((m.stamp_ns - start_ns).max(0) as u64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                if let Err(e) = publishers[&m.topic].publish_raw(&m.cdr) {
                    tracing::warn!("{}: {e}", m.topic);
                }
            }
        }
    });
    super::spin(&mut node, &AtomicBool::new(false));
    Ok(())
}
