//! Wiring: builds the input buffers, the refresh and hot-swap threads, the optional folder
//! watcher and the control loop, and hands back the handle a node (or the CLI) talks to.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::clock::Clock;
use super::control::{ActionEvent, ControlConfig, ControlCore, PolicyStatus, RuntimeNotice};
use super::error::RuntimeError;
use super::hotswap::{spawn_watcher, Acceptance, Announcer, SwapWorker};
use super::inputs::{InputBuffers, InputConfig};
use super::model::ModelLoader;
use super::operator::Operator;
use super::types::IoSpec;

/// Polls a checkpoints folder's `latest` pointer (use without ROS).
#[derive(Debug, Clone, PartialEq)]
pub struct WatchConfig {
    /// The checkpoints root (holding `latest` and `<version>/` folders).
    pub root: PathBuf,
    /// Poll interval.
    pub poll: Duration,
}

/// Everything the runtime is configured with.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// Inputs and their staleness limits.
    pub inputs: InputConfig,
    /// Loop timing and stale behaviour.
    pub control: ControlConfig,
    /// Action steps per chunk the robot side expects.
    pub horizon: usize,
    /// Values per action step the robot side expects.
    pub action_dim: usize,
    /// Accept only checkpoints of this base model (`None`: any).
    pub base_model_id: Option<String>,
    /// Also watch a checkpoints folder.
    pub watch: Option<WatchConfig>,
}

impl RuntimeConfig {
    /// The shapes checkpoints must declare to be accepted.
    pub fn io_spec(&self) -> IoSpec {
        IoSpec {
            cameras: self.inputs.cameras.iter().map(|c| c.name.clone()).collect(),
            sensor_channels: self.inputs.sensor.channels,
            sensor_window: self.inputs.sensor.window,
            state_dim: self.inputs.state.as_ref().map_or(0, |s| s.dim),
            horizon: self.horizon,
            action_dim: self.action_dim,
        }
    }

    fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |field: &str, reason: &str| Err(RuntimeError::Config { field: field.into(), reason: reason.into() });
        if self.control.period.is_zero() {
            return bad("control.period", "must be positive");
        }
        if self.control.tick_budget.is_zero() {
            return bad("control.tick_budget", "must be positive");
        }
        if self.control.vl_refresh_ticks == 0 {
            return bad("control.vl_refresh_ticks", "must be at least 1");
        }
        if self.horizon == 0 || self.action_dim == 0 {
            return bad("horizon/action_dim", "must be at least 1");
        }
        if self.watch.as_ref().is_some_and(|w| w.poll.is_zero()) {
            return bad("watch.poll", "must be positive");
        }
        Ok(())
    }
}

/// The outside of a running policy: feed inputs, announce checkpoints, read actions and status.
pub struct RuntimeHandle {
    /// Latest-input buffers (push camera frames, sensor samples, state here).
    pub inputs: Arc<InputBuffers>,
    /// Announces new checkpoints (clone it for each source).
    pub announcer: Announcer,
    /// Published action chunks, in tick order.
    pub events: mpsc::UnboundedReceiver<ActionEvent>,
    /// Status after every tick.
    pub status: watch::Receiver<PolicyStatus>,
    /// Swaps, rejections, roll-backs, stale-input changes and VL refreshes, in order (drain it).
    pub notices: mpsc::UnboundedReceiver<RuntimeNotice>,
    /// Enables / disables publishing, pins a version, rolls back (clone it for each source).
    pub operator: Operator,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl RuntimeHandle {
    /// Stops the loop and the background threads and waits for them.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a policy runtime thread panicked");
            }
        }
    }
}

impl Drop for RuntimeHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Builds the runtime without starting the control loop: the caller drives the returned
/// [`ControlCore`] (tick by tick in tests, or [`ControlCore::run`] on a thread of its choice).
/// The hot-swap thread, the VL refresh thread and the folder watcher run already.
pub fn build(
    cfg: RuntimeConfig,
    loader: Arc<dyn ModelLoader>,
    clock: Arc<dyn Clock>,
) -> Result<(ControlCore, RuntimeHandle), RuntimeError> {
    cfg.validate()?;
    let io = cfg.io_spec();
    let inputs = Arc::new(InputBuffers::new(cfg.inputs.clone(), clock.clone())?);
    let stop = Arc::new(AtomicBool::new(false));
    let accept = Acceptance { io: io.clone(), base_model_id: cfg.base_model_id.clone() };
    let worker = SwapWorker::spawn(loader, accept, inputs.clone(), clock.clone(), stop.clone())?;
    let mut threads = vec![worker.thread];
    if let Some(w) = &cfg.watch {
        threads.push(spawn_watcher(w.root.clone(), w.poll, worker.announcer.clone(), stop.clone())?);
    }
    let refresher = super::refresh::Refresher::spawn(clock.clone())?;
    let (events_tx, events) = mpsc::unbounded_channel();
    let (status_tx, status) = watch::channel(PolicyStatus::default());
    let (notices_tx, notices) = mpsc::unbounded_channel();
    let (operator, operator_rx) = Operator::channel();
    let core = ControlCore::new(
        cfg.control.clone(),
        io,
        clock,
        inputs.clone(),
        worker.outcomes,
        operator_rx,
        refresher,
        events_tx,
        status_tx,
        notices_tx,
    );
    Ok((core, RuntimeHandle { inputs, announcer: worker.announcer, events, status, notices, operator, stop, threads }))
}

/// Builds the runtime and runs its control loop on a dedicated thread (`vla-control`).
pub fn start(
    cfg: RuntimeConfig,
    loader: Arc<dyn ModelLoader>,
    clock: Arc<dyn Clock>,
) -> Result<RuntimeHandle, RuntimeError> {
    let (core, mut handle) = build(cfg, loader, clock)?;
    let stop = handle.stop.clone();
    let t = std::thread::Builder::new()
        .name("vla-control".into())
        .spawn(move || core.run(&stop))
        .map_err(|source| RuntimeError::Thread { name: "vla-control".into(), source })?;
    handle.threads.insert(0, t);
    Ok(handle)
}
