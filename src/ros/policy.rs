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

mod operator;
mod outputs;

pub use outputs::{action_msg, status_msg};

use super::clock::RuntimeRosClock;
use super::collector::{qos, ros_topic};
use super::interfaces::msg;
use super::params::{declare, share_file, Params, ParamsExt};
use super::NodeRuntime;
use crate::dataset::cdr::{MsgType, RosMessage, SensorFrame};
use crate::dataset::mcap_episode::decode_image;
use crate::dataset::streams::StreamConfig;
use crate::runtime::output::TargetOutput;
use crate::runtime::{
    Announcer, InputBuffers, RuntimeConfig, RuntimeSettings, Shapes, StaleBehavior, VlaLoader, WatchConfig,
};
use anyhow::{anyhow, bail, Context as _, Result};
use futures::StreamExt;
use r2r::QosProfile;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// A checkpoint's version and folder, as announced.
type Announced = (String, PathBuf);

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

/// The shapes from the parameters, each 0 ("from the checkpoint") taken from `checkpoint`'s
/// deploy.json; an explicit value is kept (a checkpoint that disagrees is then rejected).
pub fn resolve_shapes(p: &Params, checkpoint: Option<&Path>) -> Result<Shapes> {
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

/// The runtime settings from the node's parameters, stream mapping and shapes.
fn runtime_settings(p: &Params, streams: &StreamConfig, shapes: Shapes) -> Result<RuntimeSettings> {
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
            Ok(v)
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
    let dir = p.string("checkpoints_dir");
    Ok(RuntimeSettings {
        cameras: streams.cameras.iter().map(|c| c.name.clone()).collect(),
        sensor: sensor.name.clone(),
        sensor_channels: channels,
        shapes,
        instruction: p.string("instruction"),
        control_rate_hz: rate,
        max_camera_age_s: age("max_camera_age_s")?,
        max_sensor_age_s: age("max_sensor_age_s")?,
        vl_refresh_ticks: u32::try_from(count("vl_refresh_ticks")?).context("parameter vl_refresh_ticks")?,
        stale_behavior: p
            .string("stale_behavior")
            .parse::<StaleBehavior>()
            .map_err(|e| anyhow!("parameter stale_behavior: {e}"))?,
        start_enabled: p.boolean("start_enabled"),
        watch: (!dir.is_empty()).then(|| WatchConfig { root: PathBuf::from(dir), poll: Duration::from_millis(200) }),
    })
}

/// The parameters the node checks at start, before it waits for a checkpoint (the runtime
/// settings are checked once the shapes are known).
struct NodeSettings {
    device: tch::Device,
    dtype: tch::Kind,
    streams: StreamConfig,
    target: TargetOutput,
    base_model: String,
    ddim_steps: usize,
}

impl NodeSettings {
    fn from_params(p: &Params) -> Result<Self> {
        if !p.string("pinned_version").is_empty() {
            bail!("parameter pinned_version is set at run time (`ros2 param set`) to a loaded version; start with `checkpoint` instead");
        }
        let device =
            crate::device::parse_available(&p.string("device")).map_err(|e| anyhow!("parameter device: {e}"))?;
        let dtype =
            crate::device::parse_dtype(&p.string("dtype"), device).map_err(|e| anyhow!("parameter dtype: {e}"))?;
        let streams_path = share_file(&p.string("streams_config"));
        let streams = StreamConfig::load(&streams_path)
            .with_context(|| format!("parameter streams_config = `{}`", streams_path.display()))?;
        let target = p.string("target_output").parse().map_err(|e| anyhow!("parameter target_output: {e}"))?;
        let base_model = p.string("base_model");
        if base_model.is_empty() {
            bail!("parameter base_model is empty: set the base VL model folder the checkpoints belong to");
        }
        let ddim_steps = usize::try_from(p.int("ddim_steps"))
            .map_err(|_| anyhow!("parameter ddim_steps = {}: expected >= 0", p.int("ddim_steps")))?;
        Ok(Self { device, dtype, streams, target, base_model, ddim_steps })
    }
}

/// Runs the policy node until SIGINT / SIGTERM. Until a checkpoint is known (the `checkpoint`
/// parameter or the first announcement) when the shapes come from it, nothing is published.
pub fn main() -> Result<()> {
    let mut n = NodeRuntime::new("vla_policy")?;
    let (changes_tx, changes) = unbounded_channel();
    let p = declare(&mut n.node, &n.rt, "policy_node", move |name, value| {
        // The receiver lives as long as the node.
        let _ = changes_tx.send((name.to_string(), value.clone()));
    })?;
    let s = NodeSettings::from_params(&p)?;
    let gate = operator::waiting_gate();
    operator::serve_operator(&mut n.node, &n.rt, &gate)?;
    let mut announced = subscribe_announcements(&mut n)?;
    let Some((shapes, first)) = shapes_and_start(&mut n, &p, &mut announced)? else { return Ok(()) };
    tracing::info!(
        "shapes: sensor window {}, horizon {}, action size {}",
        shapes.sensor_window,
        shapes.horizon,
        shapes.action_dim
    );
    let loader = Arc::new(VlaLoader::new(Path::new(&s.base_model), s.ddim_steps, s.device, s.dtype)?);
    let cfg = RuntimeConfig::from_settings(runtime_settings(&p, &s.streams, shapes)?);
    let mut handle = crate::runtime::start(cfg, loader, Arc::new(RuntimeRosClock::new(n.clock.clone())))?;
    subscribe_cameras(&mut n, &s.streams, &handle.inputs)?;
    subscribe_sensor(&mut n, &s.streams, &handle.inputs)?;
    n.rt.block_on(operator::open_gate(&gate, handle.operator.clone()));
    n.rt.spawn(operator::apply_parameter_changes(changes, handle.inputs.clone(), handle.operator.clone()));
    follow_announcements(&n, handle.announcer.clone(), first, announced)?;

    let actions = outputs::ActionOutputs::create(&mut n.node, s.target, n.clock.clone())?;
    n.rt.spawn(actions.run(std::mem::replace(&mut handle.events, unbounded_channel().1)));
    let status_pub = n.node.create_publisher::<msg::PolicyStatus>("~/status", QosProfile::default())?;
    n.rt.spawn(outputs::publish_status(status_pub, handle.status.clone(), n.clock.clone()));
    n.rt.spawn(outputs::log_notices(std::mem::replace(&mut handle.notices, unbounded_channel().1)));

    tracing::info!(
        "policy ready: {} cameras, sensor `{}`, {} Hz",
        s.streams.cameras.len(),
        s.streams.sensors[0].name,
        p.double("control_rate_hz")
    );
    n.spin();
    handle.shutdown();
    tracing::info!("policy stopped");
    Ok(())
}

/// Forwards each announcement on `~/checkpoint_in` (version, folder) to the returned channel.
fn subscribe_announcements(n: &mut NodeRuntime) -> Result<UnboundedReceiver<Announced>> {
    let (announced_tx, announced) = unbounded_channel::<Announced>();
    let mut ckpt = n.node.subscribe::<msg::CheckpointInfo>("~/checkpoint_in", super::trainer::checkpoint_qos())?;
    n.rt.spawn(async move {
        while let Some(info) = ckpt.next().await {
            tracing::info!("checkpoint {} announced at {}", info.version, info.path);
            if announced_tx.send((info.version.clone(), PathBuf::from(&info.path))).is_err() {
                break;
            }
        }
    });
    Ok(announced)
}

/// The `checkpoint` parameter's checkpoint (verified), if set.
fn start_checkpoint(p: &Params) -> Result<Option<Announced>> {
    let start = p.string("checkpoint");
    if start.is_empty() {
        return Ok(None);
    }
    let context = || format!("parameter checkpoint = `{start}`");
    let dir = crate::checkpoint::publish::resolve_checkpoint_dir(Path::new(&start)).with_context(context)?;
    let manifest = crate::checkpoint::publish::verify(&dir).with_context(context)?;
    Ok(Some((manifest.version, dir)))
}

/// The shapes and the checkpoint to start with. Shapes the parameters leave to a checkpoint
/// that is not known yet come from the first announcement, waited for while spinning (`None`:
/// stopped while waiting).
fn shapes_and_start(
    n: &mut NodeRuntime,
    p: &Params,
    announced: &mut UnboundedReceiver<Announced>,
) -> Result<Option<(Shapes, Option<Announced>)>> {
    let mut first = start_checkpoint(p)?;
    let shapes = match resolve_shapes(p, first.as_ref().map(|(_, d)| d.as_path())) {
        Ok(s) => s,
        Err(_) if first.is_none() => {
            tracing::info!("waiting for a checkpoint announcement on ~/checkpoint_in (sensor_window, horizon and action_dim come from it)");
            while first.is_none() && !n.stop.load(std::sync::atomic::Ordering::SeqCst) {
                n.node.spin_once(Duration::from_millis(20));
                first = announced.try_recv().ok();
            }
            let Some((_, dir)) = &first else { return Ok(None) };
            resolve_shapes(p, Some(dir))?
        }
        Err(e) => return Err(e),
    };
    Ok(Some((shapes, first)))
}

/// Announces the start checkpoint, then every later announcement, to the runtime.
fn follow_announcements(
    n: &NodeRuntime,
    announcer: Announcer,
    first: Option<Announced>,
    mut announced: UnboundedReceiver<Announced>,
) -> Result<()> {
    if let Some((version, dir)) = first {
        announcer.announce(version, dir)?;
    }
    n.rt.spawn(async move {
        while let Some((version, dir)) = announced.recv().await {
            if let Err(e) = announcer.announce(version, dir) {
                tracing::error!("{e}");
            }
        }
    });
    Ok(())
}

/// One task per camera stream: each image, decoded, goes to the input buffers.
fn subscribe_cameras(n: &mut NodeRuntime, streams: &StreamConfig, inputs: &Arc<InputBuffers>) -> Result<()> {
    for spec in &streams.cameras {
        let kind = spec.kind();
        let mut sub = n.node.subscribe_raw(ros_topic(&spec.topic), kind.name(), qos(spec))?;
        let (inputs, name, topic) = (inputs.clone(), spec.name.clone(), spec.topic.clone());
        n.rt.spawn(async move {
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
    Ok(())
}

/// The sensor stream's task: each SensorFrame's samples go to the input buffers.
fn subscribe_sensor(n: &mut NodeRuntime, streams: &StreamConfig, inputs: &Arc<InputBuffers>) -> Result<()> {
    let sensor = &streams.sensors[0];
    if sensor.kind() != MsgType::SensorFrame {
        bail!(
            "streams_config: sensor `{}` has type {}; the policy reads {}",
            sensor.name,
            sensor.msg_type,
            MsgType::SensorFrame.name()
        );
    }
    let mut sub = n.node.subscribe_raw(ros_topic(&sensor.topic), sensor.kind().name(), qos(sensor))?;
    let (inputs, topic) = (inputs.clone(), sensor.topic.clone());
    n.rt.spawn(async move {
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
    Ok(())
}
