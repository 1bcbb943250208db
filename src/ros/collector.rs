//! Collector node: raw subscriptions to the configured topics feed the ROS-free recorder core
//! (`dataset::recorder`); `~/start_episode`, `~/stop_episode` and `~/status` adapt it.

use super::interfaces::{msg, srv};
use super::params::{declare, ParamsExt};
use crate::dataset::recorder::{now_ns, EpisodeInfo, Recorder, RecorderConfig, RecorderStatus};
use crate::dataset::streams::StreamConfig;
use anyhow::{Context as _, Result};
use futures::StreamExt;
use r2r::QosProfile;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// CollectorStatus from the recorder's status snapshot.
pub fn status_msg(s: &RecorderStatus, stamp: r2r::builtin_interfaces::msg::Time) -> msg::CollectorStatus {
    msg::CollectorStatus {
        stamp,
        recording: s.recording,
        episode_id: s.episode.clone().unwrap_or_default(),
        topics: s.topics.iter().map(|t| t.topic.clone()).collect(),
        received: s.topics.iter().map(|t| t.received).collect(),
        written: s.topics.iter().map(|t| t.written).collect(),
        dropped: s.topics.iter().map(|t| t.dropped).collect(),
        bytes_written: s.topics.iter().map(|t| t.bytes).sum(),
        error: s.error.clone().unwrap_or_default(),
    }
}

/// Runs the collector node until the process is stopped.
pub fn main() -> Result<()> {
    crate::logging::init("info");
    let ctx = r2r::Context::create()?;
    let mut node = r2r::Node::create(ctx, "vla_collector", "")?;
    let p = declare(&node, "collector_node")?;
    let streams_path = p.string("streams_config");
    let streams = StreamConfig::load(std::path::Path::new(&streams_path)).with_context(|| format!("parameter streams_config = `{streams_path}`"))?;
    let config = RecorderConfig {
        root: p.string("dataset_root").into(),
        streams: streams.clone(),
        queue_capacity: p.int("queue_capacity").max(1) as usize,
        queue_bytes: 1 << 30,
        writer: Default::default(),
    };
    let (recorder, recovered) = Recorder::open(config)?;
    for r in recovered {
        match r {
            Ok(report) => tracing::warn!("recovered an unfinished episode: {report:?}"),
            Err(e) => tracing::error!("could not recover an unfinished episode: {e}"),
        }
    }
    let recorder = Arc::new(recorder);
    let rt = tokio::runtime::Runtime::new()?;

    for (_, spec) in streams.all() {
        let mut sub = node.subscribe_raw(&spec.topic, spec.kind().name(), QosProfile::sensor_data())?;
        let (rec, topic, ty) = (recorder.clone(), spec.topic.clone(), spec.kind().name());
        rt.spawn(async move {
            while let Some(cdr) = sub.next().await {
                rec.push_received(&topic, ty, cdr, now_ns());
            }
        });
    }

    let mut start = node.create_service::<srv::StartEpisode::Service>("~/start_episode", QosProfile::services_default())?;
    let rec = recorder.clone();
    rt.spawn(async move {
        while let Some(req) = start.next().await {
            let m = &req.message;
            let info = EpisodeInfo { id: None, instruction: m.instruction.clone(), task: m.task.clone(), operator: m.operator.clone() };
            let resp = match rec.start(info, now_ns()) {
                Ok(id) => srv::StartEpisode::Response { started: true, episode_id: id, reason: String::new() },
                Err(e) => srv::StartEpisode::Response { started: false, episode_id: String::new(), reason: e.to_string() },
            };
            if let Err(e) = req.respond(resp) {
                tracing::error!("start_episode: could not respond: {e}");
            }
        }
    });

    let mut stop = node.create_service::<srv::StopEpisode::Service>("~/stop_episode", QosProfile::services_default())?;
    let rec = recorder.clone();
    rt.spawn(async move {
        while let Some(req) = stop.next().await {
            let resp = match rec.stop(&req.message.outcome) {
                Ok(meta) => {
                    let written = rec.status().topics.iter().map(|t| t.written).sum();
                    srv::StopEpisode::Response { stopped: true, episode_id: meta.id, messages: written, reason: String::new() }
                }
                Err(e) => srv::StopEpisode::Response { stopped: false, episode_id: String::new(), messages: 0, reason: e.to_string() },
            };
            if let Err(e) = req.respond(resp) {
                tracing::error!("stop_episode: could not respond: {e}");
            }
        }
    });

    let status_pub = node.create_publisher::<msg::CollectorStatus>("~/status", QosProfile::default())?;
    let mut timer = node.create_wall_timer(std::time::Duration::from_secs_f64(1.0 / p.double("status_rate_hz").max(0.01)))?;
    let rec = recorder.clone();
    rt.spawn(async move {
        while timer.tick().await.is_ok() {
            if let Err(e) = status_pub.publish(&status_msg(&rec.status(), super::convert::time_now())) {
                tracing::warn!("status: {e}");
            }
        }
    });

    tracing::info!("collector ready: {} topics -> {}", streams.all().len(), p.string("dataset_root"));
    super::spin(&mut node, &AtomicBool::new(false));
    Ok(())
}
