//! As-of alignment of one episode's streams to a fixed control-rate clock.
//!
//! Sample times are `t_k = t_start + k / control_hz`, where `t_start` is the first instant at
//! which every stream can be available (the latest of: each camera's first frame, the first state,
//! the first sensor sample plus the window span) and the last `t` leaves room for the action
//! horizon. For each `t`:
//!
//! * **Cameras**: the latest frame with stamp `<= t` (never a future frame), at most
//!   `camera_max_age_s` old.
//! * **Sensor**: `T = sensor_samples` values per channel at `tau_k = t - (T-1-k) * W / T`
//!   (`W = sensor_window_s`, so the last one is exactly `t`). Each `tau` is linearly interpolated
//!   between the two recorded samples around it, using only samples at or before `t`; a `tau`
//!   after the last sample at or before `t` holds that sample's value (zero-order hold, never a
//!   future sample). The newest sample must be at most `sensor_max_age_s` old and no gap inside
//!   the window may exceed `sensor_max_gap_s`.
//! * **State**: the latest state at or before `t` (what the controller sees at run time), at most
//!   `state_max_age_s` old.
//! * **Action** (`H = horizon` steps of `dt = 1 / control_hz`): with `s(x)` = latest state at or
//!   before `x`, `delta_from_current` gives `s(t + k dt) - s(t)` and `step_delta` gives
//!   `s(t + k dt) - s(t + (k-1) dt)` for `k = 1..=H`, angle channels wrapped to (-180, 180];
//!   `command` takes the latest recorded command at or before `t + (k+1) dt` for `k = 0..H`.
//!   Channels beyond the state's are filled with `action_pad_value` up to `action_dim`.
//!
//! Stamps come from the message headers (or receive times, `clock: receive`). A message whose
//! stamp is not after every earlier one of its stream is removed, and the time span it makes
//! ambiguous is poisoned: samples that would read the stream there are dropped. Every dropped
//! sample is counted under one reason (the first failing check, in the order above).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::episode::{EpisodeSource, SensorSeries, SourceError, Stamp, StateSeries};

/// Which stamp of each message is the data's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Clock {
    /// The header stamp (when the data was measured).
    #[default]
    Header,
    /// The time the recorder received the message.
    Receive,
}

/// How the action chunk is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ActionMode {
    /// `s(t + k dt) - s(t)`, `k = 1..=H`.
    #[default]
    DeltaFromCurrent,
    /// `s(t + k dt) - s(t + (k-1) dt)`, `k = 1..=H`.
    StepDelta,
    /// Recorded commands at `t + (k+1) dt`, `k = 0..H`.
    Command,
}

/// Alignment settings (the `align:` section of the compile config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlignConfig {
    /// Sample (control) rate in Hz.
    pub control_hz: f64,
    /// Camera streams to use, in order; empty = every camera of the episode, in its order.
    pub cameras: Vec<String>,
    /// Oldest acceptable camera frame, seconds before `t`.
    pub camera_max_age_s: f64,
    /// Name of the sensor stream.
    pub sensor: String,
    /// Length of the sensor window ending at `t`, seconds.
    pub sensor_window_s: f64,
    /// Samples per window after resampling (`T`).
    pub sensor_samples: usize,
    /// Oldest acceptable newest sensor sample, seconds before `t`.
    pub sensor_max_age_s: f64,
    /// Largest acceptable gap between consecutive sensor samples inside a window, seconds.
    pub sensor_max_gap_s: f64,
    /// Oldest acceptable state (at `t` and at each horizon step), seconds.
    pub state_max_age_s: f64,
    /// Oldest acceptable command at each horizon step, seconds (`command` mode).
    pub command_max_age_s: f64,
    /// Action steps `H`.
    pub horizon: usize,
    /// How actions are made.
    pub action: ActionMode,
    /// Values per action step; `None` = the state's size. Extra channels hold `action_pad_value`.
    pub action_dim: Option<usize>,
    /// Value of the padding channels.
    pub action_pad_value: f32,
    /// Which stamp is the data's time.
    pub clock: Clock,
}

impl Default for AlignConfig {
    fn default() -> Self {
        Self {
            control_hz: 10.0,
            cameras: Vec::new(),
            camera_max_age_s: 0.3,
            sensor: "oct".into(),
            sensor_window_s: 1.0,
            sensor_samples: 650,
            sensor_max_age_s: 0.05,
            sensor_max_gap_s: 0.05,
            state_max_age_s: 0.05,
            command_max_age_s: 0.2,
            horizon: 8,
            action: ActionMode::DeltaFromCurrent,
            action_dim: Some(7),
            action_pad_value: 1.0,
            clock: Clock::Header,
        }
    }
}

impl AlignConfig {
    /// Checks the settings, naming the first bad one.
    pub fn validate(&self) -> Result<(), AlignError> {
        let bad = |field: &str, expected: &str| Err(AlignError::Config(format!("`{field}` must be {expected}")));
        let pos = |v: f64| v.is_finite() && v > 0.0;
        if !pos(self.control_hz) {
            return bad("control_hz", "a positive number");
        }
        if !pos(self.sensor_window_s) {
            return bad("sensor_window_s", "a positive number");
        }
        if self.sensor_samples == 0 {
            return bad("sensor_samples", "at least 1");
        }
        if self.horizon == 0 {
            return bad("horizon", "at least 1");
        }
        for (f, v) in [
            ("camera_max_age_s", self.camera_max_age_s),
            ("sensor_max_age_s", self.sensor_max_age_s),
            ("sensor_max_gap_s", self.sensor_max_gap_s),
            ("state_max_age_s", self.state_max_age_s),
            ("command_max_age_s", self.command_max_age_s),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(f, "a finite number >= 0");
            }
        }
        if !self.action_pad_value.is_finite() {
            return bad("action_pad_value", "finite");
        }
        if self.action_dim == Some(0) {
            return bad("action_dim", "at least 1");
        }
        Ok(())
    }

    /// Control period in ns.
    pub fn dt_ns(&self) -> i64 {
        (1e9 / self.control_hz).round() as i64
    }
}

/// Errors that make a whole episode unusable for alignment.
#[derive(Debug, thiserror::Error)]
pub enum AlignError {
    /// A setting is out of range.
    #[error("compile config: {0}")]
    Config(String),
    /// The episode source failed to provide a stream.
    #[error("episode `{episode}`: reading stream `{stream}`: {source}")]
    Source {
        /// Episode id.
        episode: String,
        /// Stream name.
        stream: String,
        /// The source's error.
        source: SourceError,
    },
    /// A stream's contents are inconsistent.
    #[error("episode `{episode}`: stream `{stream}`: {what}")]
    Invalid {
        /// Episode id.
        episode: String,
        /// Stream name.
        stream: String,
        /// What is wrong and what was expected.
        what: String,
    },
}

/// Wraps degrees (an angle or an angle difference) into (-180, 180], without negative zero.
pub fn wrap_deg(d: f64) -> f64 {
    let w = d.rem_euclid(360.0);
    let r = if w > 180.0 { w - 360.0 } else { w };
    if r == 0.0 {
        0.0
    } else {
        r
    }
}

/// A stream's stamps reduced to a strictly increasing sequence, with the spans made ambiguous
/// by out-of-order messages.
#[derive(Debug, Clone)]
struct Track {
    /// Kept stamps, strictly increasing.
    stamps: Vec<i64>,
    /// Index of each kept stamp in the original stream.
    orig: Vec<usize>,
    /// `[a, b]` spans where a removed message fell behind an earlier one.
    poisoned: Vec<(i64, i64)>,
}

impl Track {
    fn new(stamps: &[Stamp], clock: Clock) -> Self {
        let mut t = Track {
            stamps: Vec::with_capacity(stamps.len()),
            orig: Vec::with_capacity(stamps.len()),
            poisoned: Vec::new(),
        };
        let mut max = i64::MIN;
        for (i, s) in stamps.iter().enumerate() {
            let v = match clock {
                Clock::Header => s.stamp_ns,
                Clock::Receive => s.recv_ns,
            };
            if i == 0 || v > max {
                t.stamps.push(v);
                t.orig.push(i);
                max = v;
            } else {
                t.poisoned.push((v, max));
            }
        }
        t
    }

    /// Position (in kept stamps) of the latest stamp `<= t`.
    fn as_of(&self, t: i64) -> Option<usize> {
        self.stamps.partition_point(|&s| s <= t).checked_sub(1)
    }

    /// Whether `[a, b]` touches a poisoned span.
    fn poisoned_in(&self, a: i64, b: i64) -> bool {
        self.poisoned.iter().any(|&(p0, p1)| p0 <= b && p1 >= a)
    }

    fn first(&self) -> Option<i64> {
        self.stamps.first().copied()
    }

    fn last(&self) -> Option<i64> {
        self.stamps.last().copied()
    }
}

/// Rate and timing summary of one stream of one episode.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamReport {
    /// Stream name (`state`, `command`, or the camera/sensor name).
    pub name: String,
    /// `camera`, `sensor`, `state` or `command`.
    pub kind: String,
    /// Messages.
    pub messages: usize,
    /// Messages removed because their stamp was not after an earlier one.
    pub non_monotonic: usize,
    /// Mean rate over the stream's span, Hz (0 for fewer than two messages).
    pub rate_hz: f64,
    /// Largest gap between consecutive kept stamps, seconds.
    pub max_gap_s: f64,
    /// Mean of receive time minus header stamp, seconds.
    pub mean_latency_s: f64,
    /// Largest receive time minus header stamp, seconds.
    pub max_latency_s: f64,
}

fn stream_report(name: &str, kind: &str, stamps: &[Stamp], track: &Track) -> StreamReport {
    let n = track.stamps.len();
    let span = if n >= 2 { (track.stamps[n - 1] - track.stamps[0]) as f64 * 1e-9 } else { 0.0 };
    let max_gap = track.stamps.windows(2).map(|w| (w[1] - w[0]) as f64 * 1e-9).fold(0.0, f64::max);
    let lat: Vec<f64> = stamps.iter().map(|s| (s.recv_ns - s.stamp_ns) as f64 * 1e-9).collect();
    StreamReport {
        name: name.into(),
        kind: kind.into(),
        messages: stamps.len(),
        non_monotonic: track.poisoned.len(),
        rate_hz: if span > 0.0 { (n - 1) as f64 / span } else { 0.0 },
        max_gap_s: max_gap,
        mean_latency_s: if lat.is_empty() { 0.0 } else { lat.iter().sum::<f64>() / lat.len() as f64 },
        max_latency_s: lat.iter().copied().reduce(f64::max).unwrap_or(0.0),
    }
}

/// One aligned training sample (images are referenced by frame index, not decoded).
#[derive(Debug, Clone, PartialEq)]
pub struct AlignedSample {
    /// Sample time, ns (episode clock).
    pub t_ns: i64,
    /// Frame index (in the camera's recorded order) per configured camera.
    pub frames: Vec<usize>,
    /// `t` minus the chosen frame's stamp per camera, ns (>= 0).
    pub frame_age_ns: Vec<i64>,
    /// `T x C` resampled sensor window, row-major (time major).
    pub sensor: Vec<f32>,
    /// `t` minus the newest sensor sample used, ns.
    pub sensor_age_ns: i64,
    /// Robot state at `t`.
    pub state: Vec<f32>,
    /// `t` minus the state's stamp, ns.
    pub state_age_ns: i64,
    /// `H x action_dim` action chunk, row-major.
    pub action: Vec<f32>,
}

/// Why a sample time produced no sample; `key()` is the counter name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropReason {
    /// No frame of the camera at or before `t`.
    CameraMissing(String),
    /// The latest frame is older than `camera_max_age_s`.
    CameraTooOld(String),
    /// A stream's stamps go backwards in the span the sample reads.
    NonMonotonic(String),
    /// No sensor sample at or before the window start.
    SensorWindowIncomplete,
    /// The newest sensor sample is older than `sensor_max_age_s`.
    SensorTooOld,
    /// A gap inside the window exceeds `sensor_max_gap_s`.
    SensorGap,
    /// A sensor value in the window is NaN or infinite.
    SensorNonFinite,
    /// No state at or before `t`.
    StateMissing,
    /// The state at `t` (or at a horizon step) is older than `state_max_age_s`.
    StateTooOld,
    /// A state value used is NaN or infinite.
    StateNonFinite,
    /// No command, or a too old one, at a horizon step.
    CommandTooOld,
    /// A command value used is NaN or infinite.
    CommandNonFinite,
}

impl DropReason {
    /// Counter name, e.g. `camera_too_old:front`.
    pub fn key(&self) -> String {
        match self {
            DropReason::CameraMissing(c) => format!("camera_missing:{c}"),
            DropReason::CameraTooOld(c) => format!("camera_too_old:{c}"),
            DropReason::NonMonotonic(s) => format!("non_monotonic_stamps:{s}"),
            DropReason::SensorWindowIncomplete => "sensor_window_incomplete".into(),
            DropReason::SensorTooOld => "sensor_too_old".into(),
            DropReason::SensorGap => "sensor_gap".into(),
            DropReason::SensorNonFinite => "sensor_non_finite".into(),
            DropReason::StateMissing => "state_missing".into(),
            DropReason::StateTooOld => "state_too_old".into(),
            DropReason::StateNonFinite => "state_non_finite".into(),
            DropReason::CommandTooOld => "command_too_old".into(),
            DropReason::CommandNonFinite => "command_non_finite".into(),
        }
    }
}

/// One episode's streams prepared for alignment; [`Aligner::align`] builds the sample at a time.
pub struct Aligner {
    cfg: AlignConfig,
    cameras: Vec<(String, Track)>,
    sensor: SensorSeries,
    sensor_track: Track,
    state: StateSeries,
    state_track: Track,
    commands: Option<(StateSeries, Track)>,
    action_dim: usize,
    reports: Vec<StreamReport>,
}

fn src_err(ep: &str, stream: &str, source: SourceError) -> AlignError {
    AlignError::Source { episode: ep.into(), stream: stream.into(), source }
}

fn check_state(ep: &str, stream: &str, s: &StateSeries) -> Result<(), AlignError> {
    let inv = |what: String| AlignError::Invalid { episode: ep.into(), stream: stream.into(), what };
    let n = s.names.len();
    if s.is_angle_deg.len() != n {
        return Err(inv(format!("{} angle flags for {n} names; expected one per name", s.is_angle_deg.len())));
    }
    if s.values.len() != s.stamps.len() {
        return Err(inv(format!(
            "{} value rows for {} stamps; expected one per stamp",
            s.values.len(),
            s.stamps.len()
        )));
    }
    if let Some((i, v)) = s.values.iter().enumerate().find(|(_, v)| v.len() != n) {
        return Err(inv(format!("row {i} has {} values; expected {n} (one per name)", v.len())));
    }
    Ok(())
}

impl Aligner {
    /// Loads and checks the streams of `src`.
    pub fn new(src: &dyn EpisodeSource, cfg: &AlignConfig) -> Result<Self, AlignError> {
        cfg.validate()?;
        let ep = src.meta().id.clone();
        let names = if cfg.cameras.is_empty() { src.cameras() } else { cfg.cameras.clone() };
        let mut reports = Vec::new();
        let mut cameras = Vec::new();
        for c in names {
            let st = src.camera_stamps(&c).map_err(|e| src_err(&ep, &c, e))?;
            let tr = Track::new(&st, cfg.clock);
            reports.push(stream_report(&c, "camera", &st, &tr));
            cameras.push((c, tr));
        }
        let sensor = src.sensor(&cfg.sensor).map_err(|e| src_err(&ep, &cfg.sensor, e))?;
        if sensor.channels == 0 && !sensor.stamps.is_empty() {
            return Err(AlignError::Invalid {
                episode: ep,
                stream: cfg.sensor.clone(),
                what: "0 channels; expected at least 1".into(),
            });
        }
        if sensor.values.len() != sensor.stamps.len() * sensor.channels {
            return Err(AlignError::Invalid {
                episode: ep,
                stream: cfg.sensor.clone(),
                what: format!(
                    "{} values for {} samples x {} channels; expected {}",
                    sensor.values.len(),
                    sensor.stamps.len(),
                    sensor.channels,
                    sensor.stamps.len() * sensor.channels
                ),
            });
        }
        let sensor_track = Track::new(&sensor.stamps, cfg.clock);
        reports.push(stream_report(&cfg.sensor, "sensor", &sensor.stamps, &sensor_track));
        let state = src.state().map_err(|e| src_err(&ep, "state", e))?;
        check_state(&ep, "state", &state)?;
        let state_track = Track::new(&state.stamps, cfg.clock);
        reports.push(stream_report("state", "state", &state.stamps, &state_track));
        let commands = if cfg.action == ActionMode::Command {
            let c = src.commands().map_err(|e| src_err(&ep, "command", e))?.ok_or_else(|| AlignError::Invalid {
                episode: ep.clone(),
                stream: "command".into(),
                what: "missing; `action: command` needs a recorded command stream".into(),
            })?;
            check_state(&ep, "command", &c)?;
            let tr = Track::new(&c.stamps, cfg.clock);
            reports.push(stream_report("command", "command", &c.stamps, &tr));
            Some((c, tr))
        } else {
            None
        };
        let native = match &commands {
            Some((c, _)) => c.names.len(),
            None => state.names.len(),
        };
        let action_dim = cfg.action_dim.unwrap_or(native);
        if action_dim < native {
            return Err(AlignError::Config(format!(
                "`action_dim` {action_dim} is smaller than the {native} values of the episode `{ep}` {} stream",
                if commands.is_some() { "command" } else { "state" }
            )));
        }
        Ok(Self { cfg: cfg.clone(), cameras, sensor, sensor_track, state, state_track, commands, action_dim, reports })
    }

    /// Camera names in sample order.
    pub fn camera_names(&self) -> Vec<String> {
        self.cameras.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Sensor channels `C`.
    pub fn sensor_channels(&self) -> usize {
        self.sensor.channels
    }

    /// State values per sample.
    pub fn state_dim(&self) -> usize {
        self.state.names.len()
    }

    /// State value names.
    pub fn state_names(&self) -> &[String] {
        &self.state.names
    }

    /// Values per action step.
    pub fn action_dim(&self) -> usize {
        self.action_dim
    }

    /// Per-stream rate/timing summaries.
    pub fn stream_reports(&self) -> &[StreamReport] {
        &self.reports
    }

    fn window_span_ns(&self) -> f64 {
        let t = self.cfg.sensor_samples as f64;
        (t - 1.0) * self.cfg.sensor_window_s * 1e9 / t
    }

    /// The sample times of this episode (empty when a stream is empty or the episode is shorter
    /// than the sensor window plus the horizon).
    pub fn sample_times(&self) -> Vec<i64> {
        let mut start = i64::MIN;
        for (_, tr) in &self.cameras {
            match tr.first() {
                Some(f) => start = start.max(f),
                None => return Vec::new(),
            }
        }
        match (self.sensor_track.first(), self.state_track.first()) {
            (Some(s), Some(q)) => start = start.max(s + self.window_span_ns().ceil() as i64).max(q),
            _ => return Vec::new(),
        }
        let dt = self.cfg.dt_ns();
        let h = self.cfg.horizon as i64;
        let end = match &self.commands {
            Some((_, tr)) => match tr.last() {
                Some(l) => l - h * dt,
                None => return Vec::new(),
            },
            None => self.state_track.last().unwrap_or(i64::MIN) - h * dt,
        };
        let mut out = Vec::new();
        let mut t = start;
        while t <= end {
            out.push(t);
            t += dt;
        }
        out
    }

    /// Builds the sample at `t`, or says why it must be dropped.
    pub fn align(&self, t: i64) -> Result<AlignedSample, DropReason> {
        let cfg = &self.cfg;
        let s_to_ns = |s: f64| (s * 1e9).round() as i64;
        // Cameras.
        let mut frames = Vec::with_capacity(self.cameras.len());
        let mut frame_age_ns = Vec::with_capacity(self.cameras.len());
        for (name, tr) in &self.cameras {
            let p = tr.as_of(t).ok_or_else(|| DropReason::CameraMissing(name.clone()))?;
            let age = t - tr.stamps[p];
            if age > s_to_ns(cfg.camera_max_age_s) {
                return Err(DropReason::CameraTooOld(name.clone()));
            }
            if tr.poisoned_in(tr.stamps[p], t) {
                return Err(DropReason::NonMonotonic(name.clone()));
            }
            frames.push(tr.orig[p]);
            frame_age_ns.push(age);
        }
        // Sensor window.
        let (sensor, sensor_age_ns) = self.sensor_window(t)?;
        // State at t.
        let (state, state_age_ns) = self.state_as_of(t)?;
        // Action chunk.
        let action = self.action_chunk(t, &state)?;
        Ok(AlignedSample {
            t_ns: t,
            frames,
            frame_age_ns,
            sensor,
            sensor_age_ns,
            state: state.iter().map(|&v| v as f32).collect(),
            state_age_ns,
            action,
        })
    }

    fn sensor_window(&self, t: i64) -> Result<(Vec<f32>, i64), DropReason> {
        let cfg = &self.cfg;
        let tr = &self.sensor_track;
        let c = self.sensor.channels;
        let n = cfg.sensor_samples;
        let spacing = cfg.sensor_window_s * 1e9 / n as f64;
        let span = self.window_span_ns();
        let hi = tr.as_of(t).ok_or(DropReason::SensorWindowIncomplete)?;
        let w0 = t - span.ceil() as i64;
        let lo = tr.as_of(w0).ok_or(DropReason::SensorWindowIncomplete)?;
        let age = t - tr.stamps[hi];
        if age > (cfg.sensor_max_age_s * 1e9).round() as i64 {
            return Err(DropReason::SensorTooOld);
        }
        let max_gap = (cfg.sensor_max_gap_s * 1e9).round() as i64;
        if tr.stamps[lo..=hi].windows(2).any(|w| w[1] - w[0] > max_gap) {
            return Err(DropReason::SensorGap);
        }
        if tr.poisoned_in(tr.stamps[lo], t) {
            return Err(DropReason::NonMonotonic(cfg.sensor.clone()));
        }
        let row = |p: usize| {
            let i = tr.orig[p];
            &self.sensor.values[i * c..(i + 1) * c]
        };
        if (lo..=hi).any(|p| row(p).iter().any(|v| !v.is_finite())) {
            return Err(DropReason::SensorNonFinite);
        }
        // Times relative to the first sample used, so that i64 epoch stamps keep ns precision.
        let base = tr.stamps[lo];
        let rel = |p: usize| (tr.stamps[p] - base) as f64;
        let t_rel = (t - base) as f64;
        let mut out = Vec::with_capacity(n * c);
        let mut j = lo;
        for k in 0..n {
            let tau = t_rel - (n - 1 - k) as f64 * spacing;
            while j < hi && rel(j + 1) <= tau {
                j += 1;
            }
            if j == hi {
                out.extend_from_slice(row(hi));
            } else {
                let (a, b) = (rel(j), rel(j + 1));
                let w = (tau - a) / (b - a);
                let (ra, rb) = (row(j), row(j + 1));
                out.extend(ra.iter().zip(rb).map(|(&x, &y)| (x as f64 + w * (y as f64 - x as f64)) as f32));
            }
        }
        Ok((out, age))
    }

    fn state_as_of(&self, t: i64) -> Result<(Vec<f64>, i64), DropReason> {
        let tr = &self.state_track;
        let p = tr.as_of(t).ok_or(DropReason::StateMissing)?;
        let age = t - tr.stamps[p];
        if age > (self.cfg.state_max_age_s * 1e9).round() as i64 {
            return Err(DropReason::StateTooOld);
        }
        if tr.poisoned_in(tr.stamps[p], t) {
            return Err(DropReason::NonMonotonic("state".into()));
        }
        let v = &self.state.values[tr.orig[p]];
        if v.iter().any(|x| !x.is_finite()) {
            return Err(DropReason::StateNonFinite);
        }
        Ok((v.clone(), age))
    }

    fn action_chunk(&self, t: i64, s0: &[f64]) -> Result<Vec<f32>, DropReason> {
        let cfg = &self.cfg;
        let dt = cfg.dt_ns();
        let mut out = Vec::with_capacity(cfg.horizon * self.action_dim);
        match &self.commands {
            Some((cmd, tr)) => {
                for k in 0..cfg.horizon as i64 {
                    let tk = t + (k + 1) * dt;
                    let p = tr.as_of(tk).ok_or(DropReason::CommandTooOld)?;
                    if tk - tr.stamps[p] > (cfg.command_max_age_s * 1e9).round() as i64 {
                        return Err(DropReason::CommandTooOld);
                    }
                    if tr.poisoned_in(tr.stamps[p], tk) {
                        return Err(DropReason::NonMonotonic("command".into()));
                    }
                    let v = &cmd.values[tr.orig[p]];
                    if v.iter().any(|x| !x.is_finite()) {
                        return Err(DropReason::CommandNonFinite);
                    }
                    out.extend(v.iter().map(|&x| x as f32));
                    out.extend(std::iter::repeat_n(cfg.action_pad_value, self.action_dim - v.len()));
                }
            }
            None => {
                let mut prev = s0.to_vec();
                for k in 1..=cfg.horizon as i64 {
                    let (sk, _) = self.state_as_of(t + k * dt)?;
                    let reference = match cfg.action {
                        ActionMode::StepDelta => &prev,
                        _ => s0,
                    };
                    for (d, (&a, &b)) in sk.iter().zip(reference).enumerate() {
                        let diff = a - b;
                        let diff = if self.state.is_angle_deg[d] { wrap_deg(diff) } else { diff };
                        out.push(diff as f32);
                    }
                    out.extend(std::iter::repeat_n(cfg.action_pad_value, self.action_dim - sk.len()));
                    prev = sk;
                }
            }
        }
        Ok(out)
    }
}

/// Names and units of the action dimensions: the state's names (delta modes; units known for a
/// pose state), `command<k>` (command mode) and `pad<k>` for the constant padding channels.
pub fn action_axes(mode: ActionMode, state_names: &[String], action_dim: usize) -> (Vec<String>, Vec<String>) {
    use super::mcap_episode::{POSE_STATE_NAMES, POSE_STATE_UNITS};
    let pose = state_names.iter().map(String::as_str).eq(POSE_STATE_NAMES);
    (0..action_dim)
        .map(|k| match (mode, state_names.get(k)) {
            (ActionMode::Command, _) => (format!("command{k}"), String::new()),
            (_, Some(n)) => (n.clone(), if pose { POSE_STATE_UNITS[k].to_string() } else { String::new() }),
            (_, None) => (format!("pad{k}"), String::new()),
        })
        .unzip()
}

/// Counts of dropped samples by reason key.
pub type DropCounts = BTreeMap<String, u64>;
