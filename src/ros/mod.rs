//! ROS 2 adapters (r2r): message <-> core type conversion and the nodes. No logic lives here.

pub mod clock;
pub mod collector;
pub mod convert;
pub mod interfaces;
pub mod params;
pub mod policy;
pub mod rosout;
pub mod sim_robot;
pub mod trainer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use futures::{Stream, StreamExt};
use tokio::signal::unix::{signal, SignalKind};

/// Set when SIGINT or SIGTERM arrives (`ros2 launch` sends SIGINT on shutdown, then SIGTERM).
/// The handlers replace an inherited "ignore" disposition, so a node started in the background
/// by a shell without job control still stops on SIGINT.
pub fn stop_on_signals(rt: &tokio::runtime::Runtime) -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let _guard = rt.enter();
    for (kind, name) in [(SignalKind::interrupt(), "SIGINT"), (SignalKind::terminate(), "SIGTERM")] {
        let mut s = signal(kind).with_context(|| format!("install a {name} handler"))?;
        let stop = stop.clone();
        rt.spawn(async move {
            while s.recv().await.is_some() {
                tracing::info!("{name}: shutting down");
                stop.store(true, Ordering::SeqCst);
            }
        });
    }
    Ok(stop)
}

/// Spins the node on this thread until `stop` is set (r2r delivers messages, service calls and
/// timers to the async streams while spinning).
pub fn spin(node: &mut r2r::Node, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        node.spin_once(Duration::from_millis(5));
    }
}

/// Answers each request of a service with `answer` (the service's task); `name` labels a
/// response that could not be sent in the log.
pub async fn serve<T: r2r::WrappedServiceTypeSupport + 'static>(
    mut requests: impl Stream<Item = r2r::ServiceRequest<T>> + Unpin,
    name: &str,
    mut answer: impl FnMut(&T::Request) -> T::Response,
) {
    while let Some(req) = requests.next().await {
        let response = answer(&req.message);
        if let Err(e) = req.respond(response) {
            tracing::error!("{name}: could not respond: {e}");
        }
    }
}

/// A node with its runtime and shutdown flag: the common start of every node's `main`.
pub struct NodeRuntime {
    /// The r2r node.
    pub node: r2r::Node,
    /// Runs the node's async tasks (one per subscription, service and timer).
    pub rt: tokio::runtime::Runtime,
    /// Set by SIGINT / SIGTERM.
    pub stop: Arc<AtomicBool>,
    /// The node's ROS clock (simulated time with `use_sim_time`): every stamp a node writes.
    pub clock: clock::NodeClock,
}

impl NodeRuntime {
    /// Creates the node `name` (launch and `--ros-args` may rename or namespace it) with logs on
    /// stderr and /rosout.
    pub fn new(name: &str) -> Result<Self> {
        let ctx = r2r::Context::create().context("initialize ROS 2 (rcl)")?;
        let node = r2r::Node::create(ctx, name, "").with_context(|| format!("create node `{name}`"))?;
        rosout::init(node.logger(), "info");
        let rt = tokio::runtime::Runtime::new()?;
        let stop = stop_on_signals(&rt)?;
        let clock = clock::NodeClock::of(&node);
        Ok(Self { node, rt, stop, clock })
    }

    /// Spins until SIGINT / SIGTERM.
    pub fn spin(&mut self) {
        spin(&mut self.node, &self.stop);
    }
}
