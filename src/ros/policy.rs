//! Policy node: a thin r2r adapter over the ROS-free policy runtime (`runtime`). Camera
//! (sensor_msgs/Image or CompressedImage) and sensor (vla_finetune_msgs/SensorFrame) topics of the
//! stream mapping feed the input buffers; checkpoint announcements on `~/checkpoint_in`
//! (CheckpointInfo, reliable + transient-local, remapped to the trainer's `~/checkpoint`) and the
//! optional `checkpoints_dir` watcher feed the hot-swap; action chunks go to `~/action_chunk`,
//! status to `~/status`, and with `target_output` twist/pose the first step of each chunk to
//! `~/target_twist` (TwistStamped) or `~/target_pose` (PoseStamped, relative, tool frame).
//! Safety gate: nothing is published until `~/enable` (std_srvs/SetBool) is called with true
//! (unless `start_enabled`); false stops publishing. Both are served from the start: one called
//! before the first checkpoint holds once it is loaded. `~/rollback` (std_srvs/Trigger) makes the
//! previous version active and pins it; the `pinned_version` parameter pins / unpins and
//! `instruction` replaces the instruction, both at run time (`ros2 param set`).
//! The robot state stream is not an input: the heads in this build are trained without state.

use super::clock::RuntimeRosClock;
use super::collector::{qos, ros_topic};
use super::interfaces::msg;
use super::params::{declare, share_file, ParamsExt};
use super::NodeRuntime;
use crate::dataset::cdr::{MsgType, RosMessage, SensorFrame};
use crate::dataset::mcap_episode::decode_image;
use crate::dataset::streams::StreamConfig;
use crate::runtime::output::{pose_delta, twist, TargetOutput};
use crate::runtime::{
    ActionEvent, CameraInput, ControlConfig, InputBuffers, InputConfig, Operator, OperatorCommand, OperatorReply,
    PolicyStatus, RuntimeConfig, RuntimeNotice, SensorInput, StaleBehavior, VlaLoader, WatchConfig,
};
use anyhow::{anyhow, bail, Context as _, Result};
use futures::StreamExt;
use r2r::builtin_interfaces::msg::Time;
use r2r::geometry_msgs::msg::{Point, Pose, PoseStamped, Quaternion, Twist, TwistStamped, Vector3};
use r2r::std_msgs::msg::Header;
use r2r::std_srvs::srv::{SetBool, Trigger};
use r2r::{ParameterValue, QosProfile};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// ActionChunk from a published action event, stamped `stamp`.
pub fn action_msg(ev: &ActionEvent, header: Header) -> msg::ActionChunk {
    let c = &ev.chunk;
    msg::ActionChunk {
        header,
        checkpoint_version: c.version.clone(),
        horizon: c.horizon as u32,
        action_dim: c.action_dim as u32,
        step_period_s: c.step_period_s,
        values: c.values.clone(),
    }
}

/// PolicyStatus from the runtime's status, stamped `stamp`.
pub fn status_msg(s: &PolicyStatus, stamp: Time) -> msg::PolicyStatus {
    msg::PolicyStatus {
        stamp,
        enabled: s.enabled,
        pinned_version: s.pinned_version.clone(),
        active_version: s.active_version.clone(),
        previous_version: s.previous_version.clone(),
        acting: s.acting,
        stale_inputs: s.stale_inputs.clone(),
        ticks: s.ticks,
        missed_ticks: s.missed_ticks,
        last_tick_ms: s.last_tick_ms as f32,
        message: s.message.clone(),
    }
}

fn header(stamp: Time, frame_id: &str) -> Header {
    Header { stamp, frame_id: frame_id.to_string() }
}

/// Samples and per-sample stamps of a SensorFrame: `values` holds `k` samples of `channels`;
/// the header stamps the last one, earlier ones get stamps 1 ns apart before it (only their
/// order matters to the input buffer).
pub fn sensor_samples(f: &SensorFrame) -> Result<(Vec<f32>, Vec<i64>)> {
    let c = f.channels as usize;
    if c == 0 || f.values.len() % c != 0 {
        bail!("SensorFrame with {} values is not a whole number of samples of {} channels", f.values.len(), f.channels);
    }
    let k = f.values.len() / c;
    let last = f.header.stamp.to_ns();
    Ok((f.values.clone(), (0..k).map(|i| last - (k - 1 - i) as i64).collect()))
}

/// Sensor window, horizon and action size the runtime is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shapes {
    /// Sensor samples per window.
    pub sensor_window: usize,
    /// Action steps per chunk.
    pub horizon: usize,
    /// Values per action step.
    pub action_dim: usize,
}

/// The shapes from the parameters, each 0 ("from the checkpoint") taken from `checkpoint`'s
/// deploy.json; an explicit value is kept (a checkpoint that disagrees is then rejected).
pub fn resolve_shapes(p: &serde_json::Map<String, serde_json::Value>, checkpoint: Option<&Path>) -> Result<Shapes> {
    let param = |name: &str| {
        usize::try_from(p.int(name))
            .map_err(|_| anyhow!("parameter {name} = {}: expected 0 (from the checkpoint) or more", p.int(name)))
    };
    let (w, h, a) = (param("sensor_window")?, param("horizon")?, param("action_dim")?);
    if w > 0 && h > 0 && a > 0 {
        return Ok(Shapes { sensor_window: w, horizon: h, action_dim: a });
    }
    let dir = checkpoint.ok_or_else(|| {
        anyhow!("sensor_window, horizon and action_dim come from the checkpoint, and none is known yet")
    })?;
    let d =
        crate::checkpoint::deploy::DeployInfo::read(dir).with_context(|| format!("checkpoint {}", dir.display()))?;
    let pick = |v: usize, from: usize| if v > 0 { v } else { from };
    Ok(Shapes {
        sensor_window: pick(w, d.sensor_window),
        horizon: pick(h, d.horizon),
        action_dim: pick(a, d.action_dim),
    })
}

/// The runtime configuration from the node's parameters, stream mapping and shapes.
fn runtime_config(
    p: &serde_json::Map<String, serde_json::Value>,
    streams: &StreamConfig,
    shapes: Shapes,
) -> Result<RuntimeConfig> {
    let [sensor] = streams.sensors.as_slice() else {
        bail!("streams_config: the policy reads exactly one sensor stream, found {}", streams.sensors.len());
    };
    let channels =
        sensor.channels.ok_or_else(|| anyhow!("streams_config: sensor `{}` needs `channels`", sensor.name))?;
    let rate = p.double("control_rate_hz");
    if !(rate > 0.0 && rate.is_finite()) {
        bail!("parameter control_rate_hz = {rate}: expected a positive number");
    }
    let age = |name: &str| {
        let v = p.double(name);
        if v > 0.0 && v.is_finite() {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(anyhow!("parameter {name} = {v}: expected a positive number"))
        }
    };
    let count = |name: &str| {
        usize::try_from(p.int(name))
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| anyhow!("parameter {name} = {}: expected at least 1", p.int(name)))
    };
    let period = Duration::from_secs_f64(1.0 / rate);
    let dir = p.string("checkpoints_dir");
    Ok(RuntimeConfig {
        inputs: InputConfig {
            cameras: streams
                .cameras
                .iter()
                .map(|c| Ok(CameraInput { name: c.name.clone(), max_age: age("max_camera_age_s")? }))
                .collect::<Result<_>>()?,
            sensor: SensorInput {
                name: sensor.name.clone(),
                channels,
                window: shapes.sensor_window,
                max_age: age("max_sensor_age_s")?,
            },
            state: None,
            instruction: p.string("instruction"),
        },
        control: ControlConfig {
            period,
            tick_budget: period,
            vl_refresh_ticks: u32::try_from(count("vl_refresh_ticks")?).context("parameter vl_refresh_ticks")?,
            stale_behavior: p
                .string("stale_behavior")
                .parse::<StaleBehavior>()
                .map_err(|e| anyhow!("parameter stale_behavior: {e}"))?,
            start_enabled: p.boolean("start_enabled"),
        },
        horizon: shapes.horizon,
        action_dim: shapes.action_dim,
        base_model_id: None,
        watch: (!dir.is_empty()).then(|| WatchConfig { root: PathBuf::from(dir), poll: Duration::from_millis(200) }),
    })
}

/// Runs the policy node until SIGINT / SIGTERM. Until a checkpoint is known (the `checkpoint`
/// parameter or the first announcement) when the shapes come from it, nothing is published.
pub fn main() -> Result<()> {
    let mut n = NodeRuntime::new("vla_policy")?;
    let (changes_tx, changes) = tokio::sync::mpsc::unbounded_channel();
    let p = declare(&mut n.node, &n.rt, "policy_node", move |name, value| {
        // The receiver lives as long as the node.
        let _ = changes_tx.send((name.to_string(), value.clone()));
    })?;
    if !p.string("pinned_version").is_empty() {
        bail!("parameter pinned_version is set at run time (`ros2 param set`) to a loaded version; start with `checkpoint` instead");
    }
    let device = crate::device::parse_available(&p.string("device")).map_err(|e| anyhow!("parameter device: {e}"))?;
    let kind = crate::device::parse_dtype(&p.string("dtype"), device).map_err(|e| anyhow!("parameter dtype: {e}"))?;
    let streams_path = share_file(&p.string("streams_config"));
    let streams = StreamConfig::load(&streams_path)
        .with_context(|| format!("parameter streams_config = `{}`", streams_path.display()))?;
    let target: TargetOutput =
        p.string("target_output").parse().map_err(|e| anyhow!("parameter target_output: {e}"))?;
    let base_model = p.string("base_model");
    if base_model.is_empty() {
        bail!("parameter base_model is empty: set the base VL model folder the checkpoints belong to");
    }
    let ddim_steps = usize::try_from(p.int("ddim_steps"))
        .map_err(|_| anyhow!("parameter ddim_steps = {}: expected >= 0", p.int("ddim_steps")))?;

    let gate: SharedGate = Arc::new(tokio::sync::Mutex::new(Gate::Waiting { enable: None }));
    serve_operator(&mut n.node, &n.rt, &gate)?;
    let (announced_tx, mut announced) = tokio::sync::mpsc::unbounded_channel::<(String, PathBuf)>();
    let mut ckpt = n.node.subscribe::<msg::CheckpointInfo>("~/checkpoint_in", super::trainer::checkpoint_qos())?;
    n.rt.spawn(async move {
        while let Some(info) = ckpt.next().await {
            tracing::info!("checkpoint {} announced at {}", info.version, info.path);
            if announced_tx.send((info.version.clone(), PathBuf::from(&info.path))).is_err() {
                break;
            }
        }
    });
    let mut first = match p.string("checkpoint").as_str() {
        "" => None,
        start => {
            let context = || format!("parameter checkpoint = `{start}`");
            let dir = crate::checkpoint::publish::resolve_checkpoint_dir(Path::new(start)).with_context(context)?;
            let manifest = crate::checkpoint::publish::verify(&dir).with_context(context)?;
            Some((manifest.version, dir))
        }
    };
    let shapes = match resolve_shapes(&p, first.as_ref().map(|(_, d)| d.as_path())) {
        Ok(s) => s,
        Err(_) if first.is_none() => {
            tracing::info!("waiting for a checkpoint announcement on ~/checkpoint_in (sensor_window, horizon and action_dim come from it)");
            while first.is_none() && !n.stop.load(std::sync::atomic::Ordering::SeqCst) {
                n.node.spin_once(Duration::from_millis(20));
                first = announced.try_recv().ok();
            }
            let Some((_, dir)) = &first else { return Ok(()) };
            resolve_shapes(&p, Some(dir))?
        }
        Err(e) => return Err(e),
    };
    tracing::info!(
        "shapes: sensor window {}, horizon {}, action size {}",
        shapes.sensor_window,
        shapes.horizon,
        shapes.action_dim
    );
    let loader = Arc::new(VlaLoader::new(Path::new(&base_model), ddim_steps, device, kind)?);
    let cfg = runtime_config(&p, &streams, shapes)?;
    let mut handle = crate::runtime::start(cfg, loader, Arc::new(RuntimeRosClock::new(n.clock.clone())))?;
    let node = &mut n.node;
    let rt = &n.rt;

    for spec in &streams.cameras {
        let kind = spec.kind();
        let mut sub = node.subscribe_raw(ros_topic(&spec.topic), kind.name(), qos(spec))?;
        let (inputs, name, topic) = (handle.inputs.clone(), spec.name.clone(), spec.topic.clone());
        rt.spawn(async move {
            while let Some(cdr) = sub.next().await {
                let pushed = decode_image(kind, &cdr).map_err(|e| anyhow!(e)).and_then(|img| {
                    let stamp = kind.header_stamp(&cdr)?.unwrap_or(0);
                    Ok(inputs.push_frame(&name, img, stamp)?)
                });
                if let Err(e) = pushed {
                    tracing::warn!("{topic}: {e}");
                }
            }
        });
    }
    let sensor = &streams.sensors[0];
    if sensor.kind() != MsgType::SensorFrame {
        bail!(
            "streams_config: sensor `{}` has type {}; the policy reads {}",
            sensor.name,
            sensor.msg_type,
            MsgType::SensorFrame.name()
        );
    }
    let mut sub = node.subscribe_raw(ros_topic(&sensor.topic), sensor.kind().name(), qos(sensor))?;
    let (inputs, topic) = (handle.inputs.clone(), sensor.topic.clone());
    rt.spawn(async move {
        while let Some(cdr) = sub.next().await {
            let pushed = SensorFrame::decode(&cdr).map_err(anyhow::Error::from).and_then(|f| {
                let (values, stamps) = sensor_samples(&f)?;
                Ok(inputs.push_sensor(&values, &stamps)?)
            });
            if let Err(e) = pushed {
                tracing::warn!("{topic}: {e}");
            }
        }
    });

    rt.block_on(open_gate(&gate, handle.operator.clone()));
    rt.spawn(apply_parameter_changes(changes, handle.inputs.clone(), handle.operator.clone()));

    let announcer = handle.announcer.clone();
    if let Some((version, dir)) = first {
        announcer.announce(version, dir)?;
    }
    rt.spawn(async move {
        while let Some((version, dir)) = announced.recv().await {
            if let Err(e) = announcer.announce(version, dir) {
                tracing::error!("{e}");
            }
        }
    });

    let action_pub = node.create_publisher::<msg::ActionChunk>("~/action_chunk", QosProfile::default())?;
    let twist_pub = (target == TargetOutput::Twist)
        .then(|| node.create_publisher::<TwistStamped>("~/target_twist", QosProfile::default()))
        .transpose()?;
    let pose_pub = (target == TargetOutput::Pose)
        .then(|| node.create_publisher::<PoseStamped>("~/target_pose", QosProfile::default()))
        .transpose()?;
    let mut events = std::mem::replace(&mut handle.events, tokio::sync::mpsc::unbounded_channel().1);
    let clock = n.clock.clone();
    rt.spawn(async move {
        while let Some(ev) = events.recv().await {
            let stamp = clock.now();
            if let Err(e) = action_pub.publish(&action_msg(&ev, header(stamp.clone(), "tool"))) {
                tracing::warn!("action_chunk: {e}");
            }
            if let Some(pubr) = &twist_pub {
                match twist(&ev.chunk) {
                    Ok(t) => {
                        let v = |a: [f64; 3]| Vector3 { x: a[0], y: a[1], z: a[2] };
                        let m = TwistStamped {
                            header: header(stamp.clone(), "tool"),
                            twist: Twist { linear: v(t.linear), angular: v(t.angular) },
                        };
                        if let Err(e) = pubr.publish(&m) {
                            tracing::warn!("target_twist: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("target_twist: {e}"),
                }
            }
            if let Some(pubr) = &pose_pub {
                match pose_delta(&ev.chunk) {
                    Ok(d) => {
                        let (q, x) = (d.orientation, d.position);
                        let pose = Pose {
                            position: Point { x: x[0], y: x[1], z: x[2] },
                            orientation: Quaternion { x: q[0], y: q[1], z: q[2], w: q[3] },
                        };
                        if let Err(e) = pubr.publish(&PoseStamped { header: header(stamp.clone(), "tool"), pose }) {
                            tracing::warn!("target_pose: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("target_pose: {e}"),
                }
            }
        }
    });

    let status_pub = node.create_publisher::<msg::PolicyStatus>("~/status", QosProfile::default())?;
    let (mut status, clock) = (handle.status.clone(), n.clock.clone());
    rt.spawn(async move {
        while status.changed().await.is_ok() {
            let m = status_msg(&status.borrow_and_update(), clock.now());
            if let Err(e) = status_pub.publish(&m) {
                tracing::warn!("status: {e}");
            }
        }
    });
    let mut notices = std::mem::replace(&mut handle.notices, tokio::sync::mpsc::unbounded_channel().1);
    rt.spawn(async move {
        while let Some(n) = notices.recv().await {
            match n {
                RuntimeNotice::Rejected { version, reason } => tracing::warn!("rejected {version}: {reason}"),
                RuntimeNotice::RolledBack { from, to, reason } => {
                    tracing::warn!("dropped {from} (now {to:?}): {reason}")
                }
                RuntimeNotice::Activated { version, validated, .. } => {
                    tracing::info!("activated {version} (validated: {validated})")
                }
                RuntimeNotice::FirstAction { version, latency } => {
                    tracing::info!("{version} acting, {:.1} ms after announcement", latency.as_secs_f64() * 1e3)
                }
                RuntimeNotice::Stale { inputs } => tracing::warn!("stale inputs: {}", inputs.join(", ")),
                RuntimeNotice::Fresh => tracing::info!("inputs fresh"),
                RuntimeNotice::VlRefreshed { .. } => {}
            }
        }
    });

    tracing::info!(
        "policy ready: {} cameras, sensor `{}`, {} Hz",
        streams.cameras.len(),
        sensor.name,
        p.double("control_rate_hz")
    );
    n.spin();
    handle.shutdown();
    tracing::info!("policy stopped");
    Ok(())
}

/// `success` and `message` of a service answering an operator command.
fn answer(reply: Result<OperatorReply, tokio::sync::oneshot::error::RecvError>) -> (bool, String) {
    match reply {
        Ok(Ok(message)) => (true, message),
        Ok(Err(e)) => (false, e.to_string()),
        Err(_) => (false, "the control loop has stopped".into()),
    }
}

/// Where the operator services send their commands: nowhere before the runtime has started
/// (no checkpoint yet; an enable is kept for the start), then its operator.
enum Gate {
    Waiting { enable: Option<bool> },
    Running(Operator),
}

type SharedGate = Arc<tokio::sync::Mutex<Gate>>;

/// The answer to `cmd`: from the runtime once started, from the gate before.
async fn command(gate: &SharedGate, cmd: OperatorCommand) -> (bool, String) {
    let mut g = gate.lock().await;
    match &mut *g {
        Gate::Running(op) => {
            let op = op.clone();
            drop(g);
            answer(op.send(cmd).await)
        }
        Gate::Waiting { enable } => match cmd {
            OperatorCommand::Enable(on) => {
                *enable = Some(on);
                let message = if on {
                    "enabled: publishing actions once a checkpoint is loaded"
                } else {
                    "disabled: no checkpoint is loaded yet"
                };
                (true, message.into())
            }
            _ => (false, "no checkpoint is loaded yet: nothing to roll back to".into()),
        },
    }
}

/// Hands the gate to the started runtime, applying an enable asked for while waiting.
async fn open_gate(gate: &SharedGate, operator: Operator) {
    let mut g = gate.lock().await;
    if let Gate::Waiting { enable: Some(on) } = *g {
        let (ok, message) = answer(operator.send(OperatorCommand::Enable(on)).await);
        if ok {
            tracing::info!("{message} (asked for before the first checkpoint)");
        } else {
            tracing::error!("the enable asked for before the first checkpoint failed: {message}");
        }
    }
    *g = Gate::Running(operator);
}

/// `~/enable` (SetBool: true enables publishing, false disables it) and `~/rollback` (Trigger).
fn serve_operator(node: &mut r2r::Node, rt: &tokio::runtime::Runtime, gate: &SharedGate) -> Result<()> {
    let mut enable = node.create_service::<SetBool::Service>("~/enable", QosProfile::services_default())?;
    let g = gate.clone();
    rt.spawn(async move {
        while let Some(req) = enable.next().await {
            let (success, message) = command(&g, OperatorCommand::Enable(req.message.data)).await;
            if let Err(e) = req.respond(SetBool::Response { success, message }) {
                tracing::error!("enable: could not respond: {e}");
            }
        }
    });
    let mut rollback = node.create_service::<Trigger::Service>("~/rollback", QosProfile::services_default())?;
    let g = gate.clone();
    rt.spawn(async move {
        while let Some(req) = rollback.next().await {
            let (success, message) = command(&g, OperatorCommand::RollBack).await;
            if let Err(e) = req.respond(Trigger::Response { success, message }) {
                tracing::error!("rollback: could not respond: {e}");
            }
        }
    });
    Ok(())
}

/// Applies run-time parameter changes: `instruction` from the next VL refresh on,
/// `pinned_version` as a pin (empty: unpin). Others take effect at the next start.
async fn apply_parameter_changes(
    mut changes: tokio::sync::mpsc::UnboundedReceiver<(String, ParameterValue)>,
    inputs: Arc<InputBuffers>,
    operator: Operator,
) {
    while let Some((name, value)) = changes.recv().await {
        match (name.as_str(), value) {
            ("instruction", ParameterValue::String(s)) => {
                tracing::info!("instruction: {s}");
                inputs.set_instruction(s);
            }
            ("pinned_version", ParameterValue::String(v)) => {
                let (ok, message) = answer(operator.send(OperatorCommand::Pin((!v.is_empty()).then_some(v))).await);
                if ok {
                    tracing::info!("{message}");
                } else {
                    tracing::error!("{message} (the status's pinned_version is what holds)");
                }
            }
            ("instruction" | "pinned_version", other) => {
                tracing::error!("parameter {name}: expected a string, got {other:?}; ignored")
            }
            _ => tracing::warn!("parameter {name} takes effect at the next start of the node"),
        }
    }
}
