//! The policy node's outputs: action chunks on `~/action_chunk` (plus `~/target_twist` or
//! `~/target_pose` per `target_output`), the status on `~/status`, and the runtime's notices as
//! log lines.

use super::super::clock::NodeClock;
use super::super::interfaces::msg;
use crate::runtime::output::{pose_delta, twist, TargetOutput};
use crate::runtime::{ActionChunk, ActionEvent, PolicyStatus, RuntimeNotice};
use anyhow::Result;
use r2r::builtin_interfaces::msg::Time;
use r2r::geometry_msgs::msg::{Point, Pose, PoseStamped, Quaternion, Twist, TwistStamped, Vector3};
use r2r::std_msgs::msg::Header;
use r2r::QosProfile;
use tokio::sync::{mpsc, watch};

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

/// TwistStamped of the chunk's first step.
fn twist_msg(chunk: &ActionChunk, header: Header) -> Result<TwistStamped, String> {
    let t = twist(chunk)?;
    let v = |a: [f64; 3]| Vector3 { x: a[0], y: a[1], z: a[2] };
    Ok(TwistStamped { header, twist: Twist { linear: v(t.linear), angular: v(t.angular) } })
}

/// PoseStamped of the chunk's first step (relative, tool frame).
fn pose_msg(chunk: &ActionChunk, header: Header) -> Result<PoseStamped, String> {
    let d = pose_delta(chunk)?;
    let (q, x) = (d.orientation, d.position);
    let pose = Pose {
        position: Point { x: x[0], y: x[1], z: x[2] },
        orientation: Quaternion { x: q[0], y: q[1], z: q[2], w: q[3] },
    };
    Ok(PoseStamped { header, pose })
}

/// The action publishers: `~/action_chunk` and, per the target output, `~/target_twist` or
/// `~/target_pose`; each event is stamped by the node clock in the `tool` frame.
pub struct ActionOutputs {
    chunk: r2r::Publisher<msg::ActionChunk>,
    twist: Option<r2r::Publisher<TwistStamped>>,
    pose: Option<r2r::Publisher<PoseStamped>>,
    clock: NodeClock,
}

impl ActionOutputs {
    /// Creates the publishers `target` asks for.
    pub fn create(node: &mut r2r::Node, target: TargetOutput, clock: NodeClock) -> Result<Self> {
        let chunk = node.create_publisher::<msg::ActionChunk>("~/action_chunk", QosProfile::default())?;
        let twist = (target == TargetOutput::Twist)
            .then(|| node.create_publisher::<TwistStamped>("~/target_twist", QosProfile::default()))
            .transpose()?;
        let pose = (target == TargetOutput::Pose)
            .then(|| node.create_publisher::<PoseStamped>("~/target_pose", QosProfile::default()))
            .transpose()?;
        Ok(Self { chunk, twist, pose, clock })
    }

    /// Publishes every event until the runtime closes the channel.
    pub async fn run(self, mut events: mpsc::UnboundedReceiver<ActionEvent>) {
        while let Some(ev) = events.recv().await {
            self.publish(&ev);
        }
    }

    fn publish(&self, ev: &ActionEvent) {
        let stamp = self.clock.now();
        if let Err(e) = self.chunk.publish(&action_msg(ev, header(stamp.clone(), "tool"))) {
            tracing::warn!("action_chunk: {e}");
        }
        if let Some(p) = &self.twist {
            let sent = twist_msg(&ev.chunk, header(stamp.clone(), "tool")).and_then(|m| publish(p, &m));
            if let Err(e) = sent {
                tracing::warn!("target_twist: {e}");
            }
        }
        if let Some(p) = &self.pose {
            let sent = pose_msg(&ev.chunk, header(stamp, "tool")).and_then(|m| publish(p, &m));
            if let Err(e) = sent {
                tracing::warn!("target_pose: {e}");
            }
        }
    }
}

/// Publishes `m`; the error as text.
fn publish<T: r2r::WrappedTypesupport + 'static>(p: &r2r::Publisher<T>, m: &T) -> Result<(), String> {
    p.publish(m).map_err(|e| e.to_string())
}

/// Publishes the runtime's status on `~/status` at every change, stamped by the node clock.
pub async fn publish_status(
    publisher: r2r::Publisher<msg::PolicyStatus>,
    mut status: watch::Receiver<PolicyStatus>,
    clock: NodeClock,
) {
    while status.changed().await.is_ok() {
        let m = status_msg(&status.borrow_and_update(), clock.now());
        if let Err(e) = publisher.publish(&m) {
            tracing::warn!("status: {e}");
        }
    }
}

/// Logs each runtime notice (VL refreshes excepted).
pub async fn log_notices(mut notices: mpsc::UnboundedReceiver<RuntimeNotice>) {
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
}
