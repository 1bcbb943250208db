//! Training progress: the event (mirrors `vla_finetune_msgs/TrainingProgress`), a broadcast hub
//! for the ROS node and CLI, a rate throttle that always passes phase changes, a JSON-lines log
//! and an indicatif progress-bar renderer.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

/// What a job is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Compiling recorded episodes into the dataset the job trains on.
    Compiling,
    /// Loading models and data, checking inputs.
    Preparing,
    /// Filling the feature or vision cache.
    BuildingCache,
    /// Optimizer steps (feature-cached or live).
    Training,
    /// A live epoch that trains the LoRA and rewrites the feature cache.
    RefreshingCache,
    /// Validation on held-out episodes.
    Validating,
    /// Writing the resumable training state.
    Checkpointing,
    /// Writing a deployable checkpoint.
    Publishing,
    /// Finished normally.
    Done,
    /// Stopped by a cancel request (a consistent checkpoint was written).
    Cancelled,
    /// Stopped by an error (the message says which).
    Failed,
}

impl Phase {
    /// The snake_case name used in messages and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Compiling => "compiling",
            Phase::Preparing => "preparing",
            Phase::BuildingCache => "building_cache",
            Phase::Training => "training",
            Phase::RefreshingCache => "refreshing_cache",
            Phase::Validating => "validating",
            Phase::Checkpointing => "checkpointing",
            Phase::Publishing => "publishing",
            Phase::Done => "done",
            Phase::Cancelled => "cancelled",
            Phase::Failed => "failed",
        }
    }

    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Done | Phase::Cancelled | Phase::Failed)
    }
}

/// The feature cache as seen in progress reports.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CacheStatus {
    /// `off`, `vision` or `features`.
    pub mode: String,
    /// Whether the cache is being built or refreshed right now.
    pub building: bool,
    /// Hits / lookups since the job started (0 when there were none).
    pub hit_rate: f64,
    /// Entries stored.
    pub entries: u64,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// Last measured drift of fresh vs cached features (relative L2), if measured.
    pub drift: Option<f64>,
    /// Refresh epochs done so far.
    pub refreshes: u64,
    /// Whether the VL model's weights are in host memory (features-mode cached epochs).
    #[serde(default)]
    pub vl_offloaded: bool,
}

/// One progress report of a training job. Optional numbers are absent (`null` in JSON) until
/// known; the ROS adapter maps them to NaN / 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressEvent {
    /// Job id given at start.
    pub job_id: String,
    /// Stage being run: 1 (policy heads) or 2 (LoRA + heads); 0 while compiling episodes.
    #[serde(default)]
    pub stage: u8,
    /// What the job is doing.
    pub phase: Phase,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Epochs of the run.
    pub total_epochs: u64,
    /// Optimizer steps done in the run.
    pub step: u64,
    /// Optimizer steps of the run.
    pub total_steps: u64,
    /// Latest training loss (mean over the last optimizer step).
    pub loss: Option<f64>,
    /// Learning rate of the heads group (the other groups scale with it).
    pub lr: Option<f64>,
    /// Training samples per second over the recent window.
    pub samples_per_s: Option<f64>,
    /// Seconds spent waiting for data in the recent window.
    pub data_time_s: f64,
    /// Seconds spent computing (forward, backward, optimizer) in the recent window.
    pub compute_time_s: f64,
    /// Peak accelerator memory of the current phase, bytes.
    pub peak_accel_mem_bytes: Option<u64>,
    /// Peak resident host memory of the process, bytes.
    pub peak_host_mem_bytes: Option<u64>,
    /// Cache state.
    pub cache: CacheStatus,
    /// Estimated seconds to the end of the run.
    pub eta_s: Option<f64>,
    /// Human-readable note (errors, validation results, published version).
    pub message: String,
    /// Wall-clock time of the event, Unix milliseconds.
    pub time_unix_ms: u64,
}

impl ProgressEvent {
    /// An event for `job_id` in `phase` with every number at zero / unknown, stamped now.
    pub fn new(job_id: impl Into<String>, phase: Phase) -> Self {
        Self {
            job_id: job_id.into(),
            stage: 0,
            phase,
            epoch: 0,
            total_epochs: 0,
            step: 0,
            total_steps: 0,
            loss: None,
            lr: None,
            samples_per_s: None,
            data_time_s: 0.0,
            compute_time_s: 0.0,
            peak_accel_mem_bytes: None,
            peak_host_mem_bytes: None,
            cache: CacheStatus::default(),
            eta_s: None,
            message: String::new(),
            time_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        }
    }
}

/// Seconds left, extrapolating the mean time per step so far; None before the first step.
pub fn eta_seconds(steps_done: u64, total_steps: u64, elapsed: Duration) -> Option<f64> {
    (steps_done > 0).then(|| elapsed.as_secs_f64() / steps_done as f64 * total_steps.saturating_sub(steps_done) as f64)
}

/// Peak resident memory of this process (`VmHWM` of `/proc/self/status`), bytes; None off Linux.
pub fn peak_host_memory_bytes() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

/// Current resident memory of this process (`VmRSS`), bytes; None off Linux.
pub fn host_memory_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// Fan-out of progress events: every subscriber gets every event (broadcast, bounded; a slow
/// subscriber loses the oldest and is told how many), and `latest()` gives the last one.
#[derive(Clone)]
pub struct ProgressHub {
    tx: broadcast::Sender<ProgressEvent>,
    latest: watch::Sender<Option<ProgressEvent>>,
    stage: Option<u8>,
}

impl ProgressHub {
    /// A hub whose subscribers buffer up to `capacity` events (at least 1).
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        let (latest, _) = watch::channel(None);
        Self { tx, latest, stage: None }
    }

    /// The same hub, stamping `stage` on every event published through it.
    pub fn with_stage(&self, stage: u8) -> Self {
        Self { stage: Some(stage), ..self.clone() }
    }

    /// Sends `ev` to every subscriber and records it as the latest. Never blocks.
    pub fn publish(&self, mut ev: ProgressEvent) {
        if let Some(stage) = self.stage {
            ev.stage = stage;
        }
        let _ = self.tx.send(ev.clone()); // no subscriber is fine
        self.latest.send_replace(Some(ev));
    }

    /// A receiver of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ProgressEvent> {
        self.tx.subscribe()
    }

    /// A receiver that always holds the latest event.
    pub fn watch(&self) -> watch::Receiver<Option<ProgressEvent>> {
        self.latest.subscribe()
    }

    /// The latest event, if any.
    pub fn latest(&self) -> Option<ProgressEvent> {
        self.latest.borrow().clone()
    }
}

/// Limits a stream of events to `max_hz`, but always passes the first event, every phase change,
/// every terminal event and the (two) reports of the compiling phase.
#[derive(Debug, Clone)]
pub struct Throttle {
    min_interval: Duration,
    last: Option<(Instant, Phase, String)>,
}

impl Throttle {
    /// A throttle passing at most `max_hz` ordinary events per second (`max_hz <= 0`: no limit).
    pub fn new(max_hz: f64) -> Self {
        let min_interval = if max_hz > 0.0 { Duration::from_secs_f64(1.0 / max_hz) } else { Duration::ZERO };
        Self { min_interval, last: None }
    }

    /// Whether `ev`, arriving at `now`, should be passed on; records it if so.
    pub fn admit(&mut self, ev: &ProgressEvent, now: Instant) -> bool {
        let pass = match &self.last {
            None => true,
            Some((t, phase, job)) => {
                *phase != ev.phase
                    || *job != ev.job_id
                    || ev.phase.is_terminal()
                    || ev.phase == Phase::Compiling
                    || now.saturating_duration_since(*t) >= self.min_interval
            }
        };
        if pass {
            self.last = Some((now, ev.phase, ev.job_id.clone()));
        }
        pass
    }
}

/// Errors of the progress log.
#[derive(Debug, thiserror::Error)]
#[error("progress log `{path}`: {source}")]
pub struct LogError {
    /// The log file.
    pub path: PathBuf,
    /// What failed.
    pub source: std::io::Error,
}

/// Appends one JSON object per line to a file, flushed after each line.
pub struct JsonlLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl JsonlLog {
    /// Opens `path` for appending (created with its folder if absent).
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let err = |source| LogError { path: path.to_path_buf(), source };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        let f = OpenOptions::new().create(true).append(true).open(path).map_err(err)?;
        Ok(Self { path: path.to_path_buf(), out: BufWriter::new(f) })
    }

    /// Appends `ev` as one line.
    pub fn append(&mut self, ev: &ProgressEvent) -> Result<(), LogError> {
        let err = |source| LogError { path: self.path.clone(), source };
        serde_json::to_writer(&mut self.out, ev).map_err(|e| err(e.into()))?;
        self.out.write_all(b"\n").map_err(err)?;
        self.out.flush().map_err(err)
    }
}

/// Renders events as one terminal progress bar over the run's optimizer steps.
pub struct BarRenderer {
    bar: ProgressBar,
}

impl BarRenderer {
    /// A bar drawn to stderr.
    pub fn stderr() -> Self {
        Self::with_target(ProgressDrawTarget::stderr())
    }

    /// A bar drawn to `target` (hidden in tests).
    pub fn with_target(target: ProgressDrawTarget) -> Self {
        let bar = ProgressBar::with_draw_target(None, target);
        let style = ProgressStyle::with_template("{prefix:>16} [{bar:30}] {pos}/{len} {msg}")
            .expect("static template is valid")
            .progress_chars("=> ");
        bar.set_style(style);
        Self { bar }
    }

    /// Shows `ev`: position = steps done, prefix = phase, message = epoch, loss, lr, rate, cache, ETA.
    pub fn update(&self, ev: &ProgressEvent) {
        self.bar.set_length(ev.total_steps);
        self.bar.set_position(ev.step);
        self.bar.set_prefix(ev.phase.as_str());
        self.bar.set_message(render_message(ev));
        if ev.phase.is_terminal() {
            self.bar.finish();
        }
    }

    /// The underlying bar.
    pub fn bar(&self) -> &ProgressBar {
        &self.bar
    }
}

/// The bar's message for `ev`.
pub fn render_message(ev: &ProgressEvent) -> String {
    let mut parts = vec![format!("epoch {}/{}", ev.epoch + 1, ev.total_epochs)];
    if let Some(l) = ev.loss {
        parts.push(format!("loss {l:.4}"));
    }
    if let Some(lr) = ev.lr {
        parts.push(format!("lr {lr:.2e}"));
    }
    if let Some(r) = ev.samples_per_s {
        parts.push(format!("{r:.1} samples/s"));
    }
    if ev.cache.mode != "off" && !ev.cache.mode.is_empty() {
        let mut c = format!("cache {} hit {:.0}%", ev.cache.mode, ev.cache.hit_rate * 100.0);
        if let Some(d) = ev.cache.drift {
            c.push_str(&format!(" drift {d:.3}"));
        }
        if ev.cache.vl_offloaded {
            c.push_str(" (VL model in host memory)");
        }
        parts.push(c);
    }
    if let Some(eta) = ev.eta_s {
        parts.push(format!("eta {}", format_duration(eta)));
    }
    if !ev.message.is_empty() {
        parts.push(ev.message.clone());
    }
    parts.join(" | ")
}

fn format_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// Drains a hub subscription on its own thread into a JSON-lines log (every event) and/or a
/// progress bar (throttled), until a terminal event of `job_id` or the hub is dropped. Returns the
/// number of events logged; a log write failure ends the sink with that error.
pub fn spawn_sink(
    mut rx: broadcast::Receiver<ProgressEvent>,
    job_id: String,
    mut log: Option<JsonlLog>,
    bar: Option<(BarRenderer, Throttle)>,
) -> std::thread::JoinHandle<Result<u64, LogError>> {
    std::thread::spawn(move || {
        let mut bar = bar;
        let mut logged = 0u64;
        loop {
            let ev = match rx.blocking_recv() {
                Ok(ev) => ev,
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    tracing::warn!(skipped, "progress sink lagged; events skipped");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(logged),
            };
            if ev.job_id != job_id {
                continue;
            }
            if let Some(l) = log.as_mut() {
                l.append(&ev)?;
                logged += 1;
            }
            if let Some((r, th)) = bar.as_mut() {
                if th.admit(&ev, Instant::now()) {
                    r.update(&ev);
                }
            }
            if ev.phase.is_terminal() {
                return Ok(logged);
            }
        }
    })
}
