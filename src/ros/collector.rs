//! Collector node: raw subscriptions to the configured topics feed the ROS-free recorder core
//! (`dataset::recorder`); `~/start_episode`, `~/stop_episode`, `~/discard_episode` (leaves an
//! episode out of training, `dataset::selection`) and `~/status` adapt it. Messages
//! lost before they reach the recorder are counted from the stamps of streams with a `rate_hz`.
//! A stop first waits (up to `stop_drain_s`) for messages stamped before it that are still in
//! flight. SIGINT / SIGTERM close an open episode as `interrupted`, keeping everything received.

use super::clock::NodeClock;
use super::interfaces::{msg, srv};
use super::params::{declare, share_file, Params, ParamsExt};
use super::{serve, NodeRuntime};
use crate::dataset::gaps::GapCounter;
use crate::dataset::recorder::{EpisodeInfo, Recorder, RecorderConfig, RecorderStatus};
use crate::dataset::selection::set_discarded;
use crate::dataset::streams::{Reliability, StreamConfig, StreamSpec};
use anyhow::{Context as _, Result};
use futures::{Stream, StreamExt};
use r2r::{QosProfile, ServiceRequest};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// The subscription QoS of a mapped stream.
pub fn qos(spec: &StreamSpec) -> QosProfile {
    let q = spec.qos();
    let base = QosProfile::default().keep_last(q.depth);
    match q.reliability {
        Reliability::Reliable => base.reliable(),
        Reliability::BestEffort => base.best_effort(),
    }
}

/// The ROS name of a mapped topic: relative, so a namespaced launch moves it with the node (the
/// mapping's absolute name stays the recorded one).
pub fn ros_topic(topic: &str) -> &str {
    topic.trim_start_matches('/')
}

/// Waits (at most `limit`) until every topic that has delivered anything has delivered a message
/// stamped at or after `stop_ns`, so messages in flight when a stop is asked still enter the
/// episode (a busy machine delays 690 KB camera images by hundreds of milliseconds).
async fn drain_in_flight(newest: &[AtomicI64], stop_ns: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline
        && newest.iter().map(|n| n.load(Ordering::Relaxed)).any(|t| t != i64::MIN && t < stop_ns)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The newest stamp (or receive time) per mapped stream, `i64::MIN` before its first message.
type Newest = Arc<Vec<AtomicI64>>;

/// Opens the recorder on `dataset_root`, repairing (and logging) unfinished episodes.
fn open_recorder(p: &Params, streams: &StreamConfig) -> Result<Arc<Recorder>> {
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
    Ok(Arc::new(recorder))
}

/// Runs the collector node until SIGINT / SIGTERM.
pub fn main() -> Result<()> {
    let mut n = NodeRuntime::new("vla_collector")?;
    let p = declare(&mut n.node, &n.rt, "collector_node", |_, _| {})?;
    let streams_path = share_file(&p.string("streams_config"));
    let streams = StreamConfig::load(&streams_path)
        .with_context(|| format!("parameter streams_config = `{}`", streams_path.display()))?;
    let recorder = open_recorder(&p, &streams)?;
    let newest: Newest = Arc::new(streams.all().iter().map(|_| AtomicI64::new(i64::MIN)).collect());
    subscribe_streams(&mut n, &streams, &recorder, &newest)?;
    let drain = Duration::from_secs_f64(p.double("stop_drain_s").max(0.0));

    let services = QosProfile::services_default;
    let start = n.node.create_service::<srv::StartEpisode::Service>("~/start_episode", services())?;
    let (rec, clock) = (recorder.clone(), n.clock.clone());
    n.rt.spawn(serve(start, "start_episode", move |m| start_episode(&rec, &clock, m)));
    let stop = n.node.create_service::<srv::StopEpisode::Service>("~/stop_episode", services())?;
    n.rt.spawn(serve_stop(stop, recorder.clone(), newest.clone(), drain, n.clock.clone()));
    let discard = n.node.create_service::<srv::DiscardEpisode::Service>("~/discard_episode", services())?;
    let root = PathBuf::from(p.string("dataset_root"));
    n.rt.spawn(serve(discard, "discard_episode", move |m| discard_episode(&root, m)));

    let status_pub = n.node.create_publisher::<msg::CollectorStatus>("~/status", QosProfile::default())?;
    let timer = n.node.create_wall_timer(Duration::from_secs_f64(1.0 / p.double("status_rate_hz").max(0.01)))?;
    n.rt.spawn(publish_status(status_pub, timer, recorder.clone(), n.clock.clone()));

    tracing::info!("collector ready: {} topics -> {}", streams.all().len(), p.string("dataset_root"));
    n.spin();
    close_interrupted(&recorder, &n.clock);
    Ok(())
}

/// One raw subscription per mapped stream: each message goes to the recorder; its stamp
/// advances the stream's `newest` and, for a stream with a `rate_hz`, counts lost messages.
fn subscribe_streams(
    n: &mut NodeRuntime,
    streams: &StreamConfig,
    recorder: &Arc<Recorder>,
    newest: &Newest,
) -> Result<()> {
    for (i, (_, spec)) in streams.all().into_iter().enumerate() {
        let mut sub = n.node.subscribe_raw(ros_topic(&spec.topic), spec.kind().name(), qos(spec))?;
        let (rec, topic, kind, newest, clock) =
            (recorder.clone(), spec.topic.clone(), spec.kind(), newest.clone(), n.clock.clone());
        let mut gaps = spec.rate_hz.map(GapCounter::new);
        n.rt.spawn(async move {
            while let Some(cdr) = sub.next().await {
                let stamp = kind.header_stamp(&cdr).ok().flatten();
                if let (Some(g), Some(stamp)) = (gaps.as_mut(), stamp) {
                    rec.count_lost(&topic, g.observe(stamp));
                }
                let received = clock.now_ns();
                rec.push_received(&topic, kind.name(), cdr, received);
                newest[i].fetch_max(stamp.unwrap_or(received), Ordering::Relaxed);
            }
        });
    }
    Ok(())
}

/// `~/start_episode`: opens an episode stamped now.
fn start_episode(rec: &Recorder, clock: &NodeClock, m: &srv::StartEpisode::Request) -> srv::StartEpisode::Response {
    let info = EpisodeInfo {
        id: None,
        instruction: m.instruction.clone(),
        task: m.task.clone(),
        operator: m.operator_name.clone(),
    };
    match rec.start(info, clock.now_ns()) {
        Ok(id) => srv::StartEpisode::Response { started: true, episode_id: id, reason: String::new() },
        Err(e) => srv::StartEpisode::Response { started: false, episode_id: String::new(), reason: e.to_string() },
    }
}

/// `~/stop_episode`: closes the episode at now, after draining messages still in flight.
async fn serve_stop(
    mut requests: impl Stream<Item = ServiceRequest<srv::StopEpisode::Service>> + Unpin,
    rec: Arc<Recorder>,
    newest: Newest,
    drain: Duration,
    clock: NodeClock,
) {
    while let Some(req) = requests.next().await {
        let stop_ns = clock.now_ns();
        drain_in_flight(&newest, stop_ns, drain).await;
        let resp = match rec.stop_at(&req.message.outcome, stop_ns) {
            Ok(meta) => srv::StopEpisode::Response {
                stopped: true,
                episode_id: meta.id,
                messages: rec.status().episode_messages,
                reason: String::new(),
            },
            Err(e) => srv::StopEpisode::Response {
                stopped: false,
                episode_id: String::new(),
                messages: 0,
                reason: e.to_string(),
            },
        };
        if let Err(e) = req.respond(resp) {
            tracing::error!("stop_episode: could not respond: {e}");
        }
    }
}

/// `~/discard_episode`: leaves an episode under `root` out of training, or restores it.
fn discard_episode(root: &Path, m: &srv::DiscardEpisode::Request) -> srv::DiscardEpisode::Response {
    match set_discarded(root, &m.episode_id, &m.reason, m.restore) {
        Ok(_) => srv::DiscardEpisode::Response {
            success: true,
            message: if m.restore { "restored" } else { "discarded" }.into(),
        },
        Err(e) => srv::DiscardEpisode::Response { success: false, message: e.to_string() },
    }
}

/// Publishes the recorder's status on `~/status` at every tick of `timer`.
async fn publish_status(
    publisher: r2r::Publisher<msg::CollectorStatus>,
    mut timer: r2r::Timer,
    rec: Arc<Recorder>,
    clock: NodeClock,
) {
    while timer.tick().await.is_ok() {
        if let Err(e) = publisher.publish(&status_msg(&rec.status(), clock.now())) {
            tracing::warn!("status: {e}");
        }
    }
}

/// Closes an open episode as `interrupted` (at shutdown), keeping everything received.
fn close_interrupted(recorder: &Recorder, clock: &NodeClock) {
    if recorder.status().recording {
        match recorder.stop_at("interrupted", clock.now_ns()) {
            Ok(meta) => tracing::info!(
                "episode {} closed as interrupted ({} messages)",
                meta.id,
                recorder.status().episode_messages
            ),
            Err(e) => tracing::error!("closing the episode at shutdown: {e}"),
        }
    }
}
