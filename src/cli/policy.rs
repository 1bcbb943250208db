//! `vla_finetune policy`: the policy runtime as its own process, beside a trainer. It loads the
//! base VL model, watches `<checkpoints>/latest` and hot-swaps each new version in (verified,
//! validated, rolled back on failure), reads inputs from the simulated robot (`--sim`) and runs
//! the control loop at `--rate-hz`. It publishes no action before the first checkpoint appears.
//! A JSON status (see [`StatusReport`]) is written atomically every `--status-period-s` and at
//! the end. It stops at `--duration-s`, on SIGINT, or when its stdin (a pipe from a parent
//! process) is closed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::dataset::cdr::{Image, RosMessage, SensorFrame};
use crate::dataset::episode::RgbImage;
use crate::runtime::{
    ActionEvent, Clock, InputBuffers, RuntimeConfig, RuntimeHandle, RuntimeNotice, RuntimeSettings, Shapes,
    StaleBehavior, SystemClock, VlaLoader, WatchConfig,
};
use crate::sim::{SimConfig, SENSOR_TOPIC};

/// Arguments of `policy`.
#[derive(clap::Args, Debug, Clone)]
pub struct PolicyArgs {
    /// Base VL model folder (Hugging Face layout) the checkpoints belong to.
    #[arg(long)]
    pub base_model: PathBuf,
    /// Checkpoints root; its `latest` is watched and every new version is hot-swapped in. A
    /// folder that does not exist is reported (stderr, log, status) and waited for.
    #[arg(long)]
    pub checkpoints: PathBuf,
    /// Refuse to start when the checkpoints root has no published `latest` yet.
    #[arg(long)]
    pub require_checkpoint: bool,
    /// Read inputs from the simulated robot (live topics are read by the ROS policy node).
    #[arg(long)]
    pub sim: bool,
    /// Control rate, Hz.
    #[arg(long, default_value_t = 10.0)]
    pub rate_hz: f64,
    /// Stop after this many seconds (default: run until SIGINT or stdin close).
    #[arg(long)]
    pub duration_s: Option<f64>,
    /// Write the status JSON here (atomically: temporary file + rename).
    #[arg(long)]
    pub status_json: Option<PathBuf>,
    /// Seconds between status JSON writes.
    #[arg(long, default_value_t = 1.0)]
    pub status_period_s: f64,
    /// Recompute VL features every N control ticks.
    #[arg(long, default_value_t = 4)]
    pub vl_refresh_ticks: u32,
    /// Where the models run: auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// The VL model's dtype: auto (bf16 on CUDA, f32 on the CPU), f32 or bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// DDIM steps per chunk (0: each checkpoint's own setting).
    #[arg(long, default_value_t = 0)]
    pub ddim_steps: usize,
    /// On stale input: `none` (publish nothing) or `hold` (re-publish the last chunk).
    #[arg(long, default_value = "none")]
    pub stale_behavior: StaleBehavior,
    /// Poll interval of `<checkpoints>/latest`, ms.
    #[arg(long, default_value_t = 100)]
    pub poll_ms: u64,
    /// Sensor samples per window the checkpoints expect.
    #[arg(long, default_value_t = 65)]
    pub sensor_window: usize,
    /// Action steps per chunk the checkpoints produce.
    #[arg(long, default_value_t = 8)]
    pub horizon: usize,
    /// Values per action step.
    #[arg(long, default_value_t = 7)]
    pub action_dim: usize,
    /// Camera frames older than this are stale, s.
    #[arg(long, default_value_t = 0.5)]
    pub max_camera_age_s: f64,
    /// No sensor sample for longer than this is stale, s.
    #[arg(long, default_value_t = 0.1)]
    pub max_sensor_age_s: f64,
    /// Simulator seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Simulated camera views (named camera0, camera1, ... as in recorded datasets).
    #[arg(long, default_value_t = 2)]
    pub cameras: usize,
    /// Simulated image width.
    #[arg(long, default_value_t = 112)]
    pub width: u32,
    /// Simulated image height.
    #[arg(long, default_value_t = 84)]
    pub height: u32,
    /// Simulated seconds per episode (the scene is redrawn after each).
    #[arg(long, default_value_t = 10.0)]
    pub episode_s: f64,
}

/// One activation of a checkpoint.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SwapRecord {
    /// Version.
    pub version: String,
    /// Seconds since start at activation.
    pub activated_at_s: f64,
    /// Whether it was validated on live input before activation.
    pub validated: bool,
    /// From its appearance in `latest` to its first published action, ms (None until then).
    pub hotswap_latency_ms: Option<f64>,
}

/// A checkpoint refused before activation, or dropped after failing while active.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RejectRecord {
    /// Version.
    pub version: String,
    /// `rejected` (before activation) or `rolled_back` (failed while active).
    pub kind: String,
    /// Why.
    pub reason: String,
}

/// Percentiles of a latency sample, ms.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// Maximum.
    pub max_ms: Option<f64>,
}

impl Latency {
    /// Nearest-rank percentiles of `samples` (ms).
    pub fn of(samples: &[f64]) -> Self {
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let pick = |p: f64| (!v.is_empty()).then(|| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]);
        Self { n: v.len(), p50_ms: pick(0.5), p99_ms: pick(0.99), max_ms: v.last().copied() }
    }
}

/// The status JSON.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StatusReport {
    /// Device the models run on (`Cpu`, `Cuda(0)`).
    pub device: String,
    /// dtype of the VL model (`Float`, `BFloat16`).
    pub dtype: String,
    /// Version acting now (empty before the first checkpoint).
    pub active_version: String,
    /// Activations in order.
    pub swaps: Vec<SwapRecord>,
    /// Refused or dropped versions.
    pub rejected: Vec<RejectRecord>,
    /// Control ticks.
    pub ticks: u64,
    /// Ticks whose action was not ready by the deadline, or that were skipped.
    pub missed_ticks: u64,
    /// Changes to a non-empty set of stale inputs (the wait for the first data included).
    pub stale_events: u64,
    /// Inputs stale now.
    pub stale_inputs: Vec<String>,
    /// Fresh action chunks published.
    pub actions: u64,
    /// Held (re-published) chunks.
    pub held_actions: u64,
    /// Per fresh chunk, observation to publication: the control tick's work (VL refresh excluded,
    /// it runs in the background).
    pub control_latency: Latency,
    /// Per fresh chunk, the tick's work plus the duration of the VL refresh its features came
    /// from: the latency if the VL model ran inside the tick.
    pub control_latency_vl_included: Latency,
    /// Background VL refresh durations.
    pub vl_refresh: Latency,
    /// Per fresh chunk, age of the observation its VL features were computed from at publication.
    pub vl_feature_age: Latency,
    /// Seconds since start.
    pub elapsed_s: f64,
    /// True in the last write, after the loop stopped.
    pub finished: bool,
    /// Why it stopped (in the last write).
    pub stop_reason: Option<String>,
    /// Problems that do not stop the control loop (a missing checkpoints folder, a status file
    /// that cannot be written), each once.
    pub warnings: Vec<String>,
}

/// Collects notices and actions into a [`StatusReport`].
#[derive(Debug, Default)]
pub struct StatusCollector {
    report: StatusReport,
    tick_ms: Vec<f64>,
    included_ms: Vec<f64>,
    vl_ms: Vec<f64>,
    age_ms: Vec<f64>,
    /// (version, observation time, duration ms) of recent VL refreshes, to match chunks to them.
    refreshes: Vec<(String, Duration, f64)>,
}

impl StatusCollector {
    /// Takes one runtime notice.
    pub fn notice(&mut self, n: &RuntimeNotice) {
        let r = &mut self.report;
        match n {
            RuntimeNotice::Activated { version, validated, at, .. } => {
                r.swaps.push(SwapRecord {
                    version: version.clone(),
                    activated_at_s: at.as_secs_f64(),
                    validated: *validated,
                    hotswap_latency_ms: None,
                });
                r.active_version = version.clone();
            }
            RuntimeNotice::FirstAction { version, latency } => {
                if let Some(s) = r.swaps.iter_mut().rev().find(|s| &s.version == version) {
                    s.hotswap_latency_ms = Some(latency.as_secs_f64() * 1e3);
                }
            }
            RuntimeNotice::Rejected { version, reason } => r.rejected.push(RejectRecord {
                version: version.clone(),
                kind: "rejected".into(),
                reason: reason.clone(),
            }),
            RuntimeNotice::RolledBack { from, to, reason } => {
                r.rejected.push(RejectRecord {
                    version: from.clone(),
                    kind: "rolled_back".into(),
                    reason: reason.clone(),
                });
                r.active_version = to.clone().unwrap_or_default();
            }
            RuntimeNotice::Stale { inputs } => {
                r.stale_events += 1;
                r.stale_inputs = inputs.clone();
            }
            RuntimeNotice::Fresh => r.stale_inputs.clear(),
            RuntimeNotice::VlRefreshed { version, obs_taken_at, took } => {
                let ms = took.as_secs_f64() * 1e3;
                self.vl_ms.push(ms);
                self.refreshes.push((version.clone(), *obs_taken_at, ms));
                if self.refreshes.len() > 64 {
                    self.refreshes.remove(0);
                }
            }
        }
    }

    /// Takes one published action.
    pub fn action(&mut self, ev: &ActionEvent) {
        if ev.held {
            self.report.held_actions += 1;
            return;
        }
        self.report.actions += 1;
        let tick = ev.published_at.saturating_sub(ev.obs_taken_at).as_secs_f64() * 1e3;
        self.tick_ms.push(tick);
        self.age_ms.push(ev.published_at.saturating_sub(ev.vl_obs_taken_at).as_secs_f64() * 1e3);
        // The refresh that computed the chunk's features; features from a new version's
        // validation pass have none and are left out.
        let vl = self
            .refreshes
            .iter()
            .rev()
            .find(|(v, at, _)| *v == ev.chunk.version && *at == ev.vl_obs_taken_at)
            .map(|r| r.2);
        if let Some(vl) = vl {
            self.included_ms.push(tick + vl);
        }
    }

    /// Records a problem that does not stop the control loop, logging it the first time.
    pub fn warn(&mut self, what: String) {
        if !self.report.warnings.contains(&what) {
            tracing::warn!("{what}");
            self.report.warnings.push(what);
        }
    }

    /// The report with the latest counters.
    pub fn report(&mut self, status: &crate::runtime::PolicyStatus, elapsed: Duration) -> StatusReport {
        let r = &mut self.report;
        r.ticks = status.ticks;
        r.missed_ticks = status.missed_ticks;
        r.active_version = status.active_version.clone();
        r.control_latency = Latency::of(&self.tick_ms);
        r.control_latency_vl_included = Latency::of(&self.included_ms);
        r.vl_refresh = Latency::of(&self.vl_ms);
        r.vl_feature_age = Latency::of(&self.age_ms);
        r.elapsed_s = elapsed.as_secs_f64();
        r.clone()
    }
}

/// Writes `value` as pretty JSON to `path` atomically.
pub fn write_json_atomic<T: Serialize>(path: &std::path::Path, value: &T) -> Result<()> {
    Ok(crate::atomic_file::write(path, &serde_json::to_vec_pretty(value)?)?)
}

/// Writes the status best-effort: a failure is a warning in the next report, never a stop.
fn write_status(path: &std::path::Path, collector: &mut StatusCollector, report: &StatusReport) {
    if let Err(e) = write_json_atomic(path, report) {
        collector.warn(format!("status file {} not written (control goes on): {e:#}", path.display()));
    }
}

/// The warning for a checkpoints root that does not exist, or `None`.
fn missing_root_warning(root: &std::path::Path) -> Option<String> {
    (!root.is_dir()).then(|| {
        format!(
            "checkpoints folder {} does not exist: no model acts until a checkpoint is published there",
            root.display()
        )
    })
}

fn check_args(a: &PolicyArgs) -> Result<()> {
    if !a.sim {
        bail!("`policy` needs --sim: live ROS topics are read by the ROS policy node (policy_node, feature `ros`)");
    }
    let positive = |name: &str, v: f64| {
        if v > 0.0 && v.is_finite() {
            Ok(())
        } else {
            bail!("--{name} must be a positive number, got {v}")
        }
    };
    positive("rate-hz", a.rate_hz)?;
    positive("status-period-s", a.status_period_s)?;
    positive("episode-s", a.episode_s)?;
    positive("max-camera-age-s", a.max_camera_age_s)?;
    positive("max-sensor-age-s", a.max_sensor_age_s)?;
    if let Some(d) = a.duration_s {
        positive("duration-s", d)?;
    }
    if a.cameras == 0 || a.width == 0 || a.height == 0 {
        bail!("--cameras, --width and --height must be at least 1");
    }
    if !a.base_model.join("config.json").is_file() {
        bail!("--base-model {}: no config.json (expected a Hugging Face model folder)", a.base_model.display());
    }
    Ok(())
}

/// The runtime settings for the simulated robot's streams.
fn runtime_settings(a: &PolicyArgs, sim: &SimConfig) -> RuntimeSettings {
    RuntimeSettings {
        cameras: (0..sim.cameras).map(|i| format!("camera{i}")).collect(),
        sensor: "oct".into(),
        sensor_channels: sim.sensor_channels,
        shapes: Shapes { sensor_window: a.sensor_window, horizon: a.horizon, action_dim: a.action_dim },
        instruction: sim.scene(0).instruction(),
        control_rate_hz: a.rate_hz,
        max_camera_age_s: a.max_camera_age_s,
        max_sensor_age_s: a.max_sensor_age_s,
        vl_refresh_ticks: a.vl_refresh_ticks,
        stale_behavior: a.stale_behavior,
        start_enabled: true,
        watch: Some(WatchConfig { root: a.checkpoints.clone(), poll: Duration::from_millis(a.poll_ms.max(1)) }),
    }
}

/// Feeds the simulated robot's camera and sensor messages into `inputs` at wall-clock pace,
/// episode after episode, until `stop` is set. The instruction follows each episode's scene.
fn feed_sim(
    sim: SimConfig,
    episode_s: f64,
    inputs: Arc<InputBuffers>,
    clock: Arc<SystemClock>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let origin = clock.now();
    let mut start_ns = 0i64;
    for index in 0.. {
        let mut ep = sim.episode(index, start_ns, episode_s);
        inputs.set_instruction(ep.scene().instruction());
        for m in ep.by_ref() {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            clock.sleep_until(origin + Duration::from_nanos(m.recv_ns.max(0) as u64));
            if m.topic == SENSOR_TOPIC {
                let f = SensorFrame::decode(&m.cdr)?;
                inputs.push_sensor(&f.values, &[m.stamp_ns])?;
            } else if let Some(cam) = m.topic.strip_prefix("/sim/camera").and_then(|r| r.split('/').next()) {
                let img = Image::decode(&m.cdr)?;
                inputs.push_frame(
                    &format!("camera{cam}"),
                    RgbImage { width: img.width, height: img.height, data: img.data },
                    m.stamp_ns,
                )?;
            }
        }
        start_ns += (episode_s * 1e9) as i64;
    }
    Ok(())
}

/// Whether stdin is a pipe or socket (a parent process holds its other end): then its closing
/// means the parent is gone. A terminal or /dev/null is not watched.
fn stdin_is_pipe() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileTypeExt;
    let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() else { return false };
    std::fs::File::from(fd).metadata().map(|m| m.file_type().is_fifo() || m.file_type().is_socket()).unwrap_or(false)
}

/// Runs `policy`.
pub fn run(a: PolicyArgs) -> Result<()> {
    check_args(&a)?;
    let device = crate::device::parse_available(&a.device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let kind = crate::device::parse_dtype(&a.dtype, device).map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    if a.require_checkpoint && crate::checkpoint::publish::read_latest(&a.checkpoints)?.is_none() {
        bail!("--checkpoints {}: no published `latest` and --require-checkpoint was given", a.checkpoints.display());
    }
    let sim = SimConfig { seed: a.seed, cameras: a.cameras, width: a.width, height: a.height, ..Default::default() };
    eprintln!("loading base model {} ({kind:?} on {device:?})", a.base_model.display());
    let loader = Arc::new(VlaLoader::new(&a.base_model, a.ddim_steps, device, kind)?);
    let clock = Arc::new(SystemClock::new());
    let cfg = RuntimeConfig::from_settings(runtime_settings(&a, &sim));
    let mut handle = crate::runtime::start(cfg, loader, clock.clone())?;
    eprintln!("policy running at {} Hz, watching {}/latest", a.rate_hz, a.checkpoints.display());

    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (inputs, clock, stop) = (handle.inputs.clone(), clock.clone(), stop.clone());
        std::thread::Builder::new()
            .name("sim-feed".into())
            .spawn(move || feed_sim(sim, a.episode_s, inputs, clock, stop))?
    };

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut collector = StatusCollector::default();
    (collector.report.device, collector.report.dtype) = (format!("{device:?}"), format!("{kind:?}"));
    if let Some(w) = missing_root_warning(&a.checkpoints) {
        eprintln!("warning: {w}");
        collector.warn(w);
    }
    let stop_reason = rt.block_on(until_stopped(&a, &mut handle, &mut collector, &clock, &feeder));
    // The stdin reader may still block in read(); do not wait for it.
    rt.shutdown_background();
    let stop_reason = stop_reason?;
    stop.store(true, Ordering::Relaxed);
    finish(&a, handle, collector, &clock, feeder, stop_reason)
}

/// Collects actions and notices and writes the status every `--status-period-s` until a stop
/// condition; returns why it stopped.
async fn until_stopped(
    a: &PolicyArgs,
    handle: &mut RuntimeHandle,
    collector: &mut StatusCollector,
    clock: &SystemClock,
    feeder: &JoinHandle<Result<()>>,
) -> Result<String> {
    let at = a.duration_s.map(|d| tokio::time::Instant::now() + Duration::from_secs_f64(d));
    let mut status_timer = tokio::time::interval(Duration::from_secs_f64(a.status_period_s));
    let until_deadline = deadline(at);
    tokio::pin!(until_deadline);
    let stdin_closed = stdin_closed();
    tokio::pin!(stdin_closed);
    loop {
        tokio::select! {
            Some(ev) = handle.events.recv() => collector.action(&ev),
            Some(n) = handle.notices.recv() => {
                log_notice(&n);
                collector.notice(&n);
            }
            _ = status_timer.tick() => {
                if let Some(path) = &a.status_json {
                    let report = collector.report(&handle.status.borrow(), clock.now());
                    write_status(path, collector, &report);
                }
                if feeder.is_finished() {
                    return Ok("the simulated robot feed stopped".to_string());
                }
            }
            _ = &mut until_deadline => return Ok("duration reached".to_string()),
            r = tokio::signal::ctrl_c() => {
                r.context("listening for SIGINT")?;
                return Ok("SIGINT".to_string());
            }
            _ = &mut stdin_closed => return Ok("stdin closed".to_string()),
        }
    }
}

/// Returns at `at`; never without one.
async fn deadline(at: Option<tokio::time::Instant>) {
    match at {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Returns when stdin, a pipe from a parent process, is closed; never when it is not a pipe.
async fn stdin_closed() {
    if stdin_is_pipe() {
        // Reads until EOF on a blocking thread; the bytes themselves are ignored.
        let _ = tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink())).await;
    } else {
        std::future::pending::<()>().await;
    }
}

/// Takes the last actions and notices, stops the runtime and the feed, writes the final status
/// and prints the summary; the feed's error, if any, is the result.
fn finish(
    a: &PolicyArgs,
    mut handle: RuntimeHandle,
    mut collector: StatusCollector,
    clock: &SystemClock,
    feeder: JoinHandle<Result<()>>,
    stop_reason: String,
) -> Result<()> {
    let status = handle.status.borrow().clone();
    while let Ok(ev) = handle.events.try_recv() {
        collector.action(&ev);
    }
    while let Ok(n) = handle.notices.try_recv() {
        collector.notice(&n);
    }
    let mut report = collector.report(&status, clock.now());
    report.finished = true;
    report.stop_reason = Some(stop_reason.clone());
    handle.shutdown();
    let fed = feeder.join().map_err(|_| anyhow::anyhow!("the simulated robot feed panicked"))?;
    if let Some(path) = &a.status_json {
        write_status(path, &mut collector, &report);
    }
    eprintln!(
        "policy stopped ({stop_reason}): {} ticks, {} missed, {} actions, active {:?}, {} swaps, {} rejected",
        report.ticks,
        report.missed_ticks,
        report.actions,
        report.active_version,
        report.swaps.len(),
        report.rejected.len()
    );
    fed.context("simulated robot feed")
}

fn log_notice(n: &RuntimeNotice) {
    match n {
        RuntimeNotice::Activated { version, validated, .. } => {
            eprintln!("activated {version} (validated on live input: {validated})")
        }
        RuntimeNotice::FirstAction { version, latency } => {
            eprintln!("{version}: first action {:.1} ms after announcement", latency.as_secs_f64() * 1e3)
        }
        RuntimeNotice::Rejected { version, reason } => eprintln!("rejected {version}: {reason}"),
        RuntimeNotice::RolledBack { from, to, reason } => {
            eprintln!("dropped {from} (now {}): {reason}", to.as_deref().unwrap_or("none"))
        }
        RuntimeNotice::Stale { inputs } => eprintln!("stale inputs: {}", inputs.join(", ")),
        RuntimeNotice::Fresh => eprintln!("inputs fresh"),
        RuntimeNotice::VlRefreshed { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        let l = Latency::of(&v);
        assert_eq!((l.n, l.p50_ms, l.p99_ms, l.max_ms), (200, Some(100.0), Some(198.0), Some(200.0)));
        assert_eq!(Latency::of(&[]).p50_ms, None);
        assert_eq!(Latency::of(&[3.0]).p99_ms, Some(3.0));
    }
}
