//! Latest inputs of the policy: the newest frame per camera, a sensor ring buffer holding the last
//! window of samples, the newest robot state, each with the runtime-clock time it arrived, and the
//! staleness check against configured maximum ages.
//!
//! Staleness is judged on arrival time in the runtime's monotonic clock (an input is stale when
//! nothing arrived for longer than its maximum age), not on header stamps, so clock offsets
//! between machines cannot hide a silent camera. Header stamps travel on to the model.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::dataset::episode::RgbImage;

use super::clock::Clock;
use super::error::RuntimeError;
use super::types::{CameraFrame, Observation, RobotState, SensorWindow};

/// One camera input.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraInput {
    /// Camera name (the model's view name; the ROS node maps topics to it).
    pub name: String,
    /// Older frames count as stale.
    pub max_age: Duration,
}

/// The sensor input.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorInput {
    /// Sensor name.
    pub name: String,
    /// Values per sample (1026 = force + A-scan).
    pub channels: usize,
    /// Samples per window handed to the model (650 = 1 s at 650 Hz).
    pub window: usize,
    /// No sample for longer counts as stale.
    pub max_age: Duration,
}

/// The robot state input.
#[derive(Debug, Clone, PartialEq)]
pub struct StateInput {
    /// State input name.
    pub name: String,
    /// Values per state.
    pub dim: usize,
    /// Older state counts as stale.
    pub max_age: Duration,
}

/// Which inputs the policy reads.
#[derive(Debug, Clone, PartialEq)]
pub struct InputConfig {
    /// Cameras, in the model's view order.
    pub cameras: Vec<CameraInput>,
    /// The sensor.
    pub sensor: SensorInput,
    /// The robot state, if the model uses it.
    pub state: Option<StateInput>,
    /// Initial language instruction.
    pub instruction: String,
}

/// An input that is missing or too old.
#[derive(Debug, Clone, PartialEq)]
pub struct StaleInput {
    /// Camera, sensor or state input name.
    pub name: String,
    /// Time since its last arrival; `None` when it never arrived (or, for the sensor, the
    /// window is not full yet).
    pub age: Option<Duration>,
}

impl std::fmt::Display for StaleInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.age {
            Some(a) => write!(f, "{} ({:.3} s old)", self.name, a.as_secs_f64()),
            None => write!(f, "{} (no data yet)", self.name),
        }
    }
}

/// A fixed-capacity ring of sensor samples.
#[derive(Debug, Clone)]
pub struct SensorRing {
    channels: usize,
    capacity: usize,
    values: Vec<f32>,
    stamps: Vec<i64>,
    head: usize,
    len: usize,
}

impl SensorRing {
    /// An empty ring of `capacity` samples of `channels` values.
    pub fn new(channels: usize, capacity: usize) -> Self {
        Self { channels, capacity, values: vec![0.0; channels * capacity], stamps: vec![0; capacity], head: 0, len: 0 }
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no sample is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stamp of the newest sample.
    pub fn last_stamp(&self) -> Option<i64> {
        (self.len > 0).then(|| self.stamps[(self.head + self.capacity - 1) % self.capacity])
    }

    /// Appends one sample (`channels` values), overwriting the oldest when full.
    pub fn push(&mut self, sample: &[f32], stamp_ns: i64) {
        debug_assert_eq!(sample.len(), self.channels);
        let at = self.head * self.channels;
        self.values[at..at + self.channels].copy_from_slice(sample);
        self.stamps[self.head] = stamp_ns;
        self.head = (self.head + 1) % self.capacity;
        self.len = (self.len + 1).min(self.capacity);
    }

    /// The held samples, oldest first.
    pub fn window(&self) -> SensorWindow {
        let start = (self.head + self.capacity - self.len) % self.capacity;
        let mut values = Vec::with_capacity(self.len * self.channels);
        let mut stamps_ns = Vec::with_capacity(self.len);
        for k in 0..self.len {
            let i = (start + k) % self.capacity;
            values.extend_from_slice(&self.values[i * self.channels..(i + 1) * self.channels]);
            stamps_ns.push(self.stamps[i]);
        }
        SensorWindow { channels: self.channels, values, stamps_ns }
    }
}

#[derive(Debug)]
struct Latest {
    frames: Vec<Option<(CameraFrame, Duration)>>,
    sensor: SensorRing,
    sensor_arrived: Option<Duration>,
    state: Option<(RobotState, Duration)>,
    instruction: String,
}

/// The latest inputs, shared between the input callbacks (ROS subscriptions, a simulator) and the
/// control loop.
pub struct InputBuffers {
    cfg: InputConfig,
    clock: Arc<dyn Clock>,
    latest: Mutex<Latest>,
}

impl std::fmt::Debug for InputBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputBuffers").field("cfg", &self.cfg).finish()
    }
}

/// The result of [`InputBuffers::snapshot`].
#[derive(Debug, Clone)]
pub enum Snapshot {
    /// Every input is present and fresh.
    Fresh(Observation),
    /// These inputs are missing or too old.
    Stale(Vec<StaleInput>),
}

fn input_err(name: &str, reason: String) -> RuntimeError {
    RuntimeError::Input { name: name.to_string(), reason }
}

impl InputBuffers {
    /// Empty buffers for `cfg`, timed by `clock`.
    pub fn new(cfg: InputConfig, clock: Arc<dyn Clock>) -> Result<Self, RuntimeError> {
        let bad = |field: &str, reason: &str| {
            Err(RuntimeError::Config { field: field.to_string(), reason: reason.to_string() })
        };
        if cfg.sensor.channels == 0 {
            return bad("sensor.channels", "must be at least 1");
        }
        if cfg.sensor.window == 0 {
            return bad("sensor.window", "must be at least 1");
        }
        let mut names: Vec<&str> = cfg.cameras.iter().map(|c| c.name.as_str()).collect();
        names.push(&cfg.sensor.name);
        names.extend(cfg.state.iter().map(|s| s.name.as_str()));
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != names.len() {
            return bad("cameras/sensor/state", "input names must be unique");
        }
        let latest = Latest {
            frames: vec![None; cfg.cameras.len()],
            sensor: SensorRing::new(cfg.sensor.channels, cfg.sensor.window),
            sensor_arrived: None,
            state: None,
            instruction: cfg.instruction.clone(),
        };
        Ok(Self { cfg, clock, latest: Mutex::new(latest) })
    }

    /// The configuration.
    pub fn config(&self) -> &InputConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, Latest> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores the newest frame of camera `camera` (RGB8, `width * height * 3` bytes).
    pub fn push_frame(&self, camera: &str, image: RgbImage, stamp_ns: i64) -> Result<(), RuntimeError> {
        let idx = self.cfg.cameras.iter().position(|c| c.name == camera).ok_or_else(|| {
            input_err(
                camera,
                format!(
                    "unknown camera; configured: {:?}",
                    self.cfg.cameras.iter().map(|c| &c.name).collect::<Vec<_>>()
                ),
            )
        })?;
        let want = image.width as usize * image.height as usize * 3;
        if image.data.len() != want || want == 0 {
            return Err(input_err(
                camera,
                format!(
                    "RGB8 image {}x{} needs {want} bytes (non-empty), got {}",
                    image.width,
                    image.height,
                    image.data.len()
                ),
            ));
        }
        let now = self.clock.now();
        let frame = CameraFrame { name: camera.to_string(), image: Arc::new(image), stamp_ns };
        self.lock().frames[idx] = Some((frame, now));
        Ok(())
    }

    /// Appends sensor samples: `values` holds `stamps_ns.len()` samples of the configured channel
    /// count, sample-major. Stamps must increase; non-finite values are refused (the whole call).
    pub fn push_sensor(&self, values: &[f32], stamps_ns: &[i64]) -> Result<(), RuntimeError> {
        let name = &self.cfg.sensor.name;
        let c = self.cfg.sensor.channels;
        if values.len() != stamps_ns.len() * c {
            return Err(input_err(
                name,
                format!("{} values for {} samples of {c} channels", values.len(), stamps_ns.len()),
            ));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(input_err(
                name,
                format!("non-finite value {} in sample {}, channel {}", values[i], i / c, i % c),
            ));
        }
        let now = self.clock.now();
        let mut latest = self.lock();
        let mut prev = latest.sensor.last_stamp();
        for &s in stamps_ns {
            if prev.is_some_and(|p| s <= p) {
                return Err(input_err(
                    name,
                    format!("sample stamp {s} ns does not increase (previous {} ns)", prev.unwrap_or(0)),
                ));
            }
            prev = Some(s);
        }
        for (i, &s) in stamps_ns.iter().enumerate() {
            latest.sensor.push(&values[i * c..(i + 1) * c], s);
        }
        if !stamps_ns.is_empty() {
            latest.sensor_arrived = Some(now);
        }
        Ok(())
    }

    /// Stores the newest robot state.
    pub fn push_state(&self, values: Vec<f64>, stamp_ns: i64) -> Result<(), RuntimeError> {
        let Some(cfg) = &self.cfg.state else {
            return Err(input_err("state", "no state input is configured".to_string()));
        };
        if values.len() != cfg.dim {
            return Err(input_err(&cfg.name, format!("{} values, expected {}", values.len(), cfg.dim)));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(input_err(&cfg.name, format!("non-finite value {} at index {i}", values[i])));
        }
        let now = self.clock.now();
        self.lock().state = Some((RobotState { values, stamp_ns }, now));
        Ok(())
    }

    /// Replaces the language instruction.
    pub fn set_instruction(&self, instruction: impl Into<String>) {
        self.lock().instruction = instruction.into();
    }

    /// Inputs missing or older than their maximum age now.
    pub fn stale_inputs(&self) -> Vec<StaleInput> {
        let now = self.clock.now();
        Self::stale_in(&self.cfg, &self.lock(), now)
    }

    fn stale_in(cfg: &InputConfig, latest: &Latest, now: Duration) -> Vec<StaleInput> {
        let check = |name: &str, arrived: Option<Duration>, max_age: Duration| {
            let age = arrived.map(|t| now.saturating_sub(t));
            match age {
                Some(a) if a <= max_age => None,
                _ => Some(StaleInput { name: name.to_string(), age }),
            }
        };
        let mut stale = Vec::new();
        for (cam, f) in cfg.cameras.iter().zip(&latest.frames) {
            stale.extend(check(&cam.name, f.as_ref().map(|f| f.1), cam.max_age));
        }
        if latest.sensor.len() < cfg.sensor.window {
            stale.push(StaleInput { name: cfg.sensor.name.clone(), age: None });
        } else {
            stale.extend(check(&cfg.sensor.name, latest.sensor_arrived, cfg.sensor.max_age));
        }
        if let Some(s) = &cfg.state {
            stale.extend(check(&s.name, latest.state.as_ref().map(|s| s.1), s.max_age));
        }
        stale
    }

    /// An observation of the latest inputs, or the list of stale ones.
    pub fn snapshot(&self) -> Snapshot {
        let now = self.clock.now();
        let latest = self.lock();
        let stale = Self::stale_in(&self.cfg, &latest, now);
        if !stale.is_empty() {
            return Snapshot::Stale(stale);
        }
        Snapshot::Fresh(Observation {
            frames: latest.frames.iter().flatten().map(|f| f.0.clone()).collect(),
            sensor: latest.sensor.window(),
            state: latest.state.as_ref().map(|s| s.0.clone()),
            instruction: latest.instruction.clone(),
            taken_at: now,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::clock::ManualClock;

    fn cfg() -> InputConfig {
        InputConfig {
            cameras: vec![
                CameraInput { name: "wrist".into(), max_age: Duration::from_millis(500) },
                CameraInput { name: "top".into(), max_age: Duration::from_millis(500) },
            ],
            sensor: SensorInput { name: "oct".into(), channels: 3, window: 4, max_age: Duration::from_millis(100) },
            state: Some(StateInput { name: "pose".into(), dim: 2, max_age: Duration::from_millis(200) }),
            instruction: "insert".into(),
        }
    }

    fn img(v: u8) -> RgbImage {
        RgbImage { width: 2, height: 1, data: vec![v; 6] }
    }

    #[test]
    fn ring_keeps_the_last_window_in_order() {
        let mut r = SensorRing::new(2, 3);
        for i in 0..5 {
            r.push(&[i as f32, 10.0 * i as f32], 100 + i);
        }
        let w = r.window();
        assert_eq!(w.stamps_ns, vec![102, 103, 104]);
        assert_eq!(w.values, vec![2.0, 20.0, 3.0, 30.0, 4.0, 40.0]);
        assert_eq!(w.sample(1), &[3.0, 30.0]);
        assert_eq!(r.last_stamp(), Some(104));
    }

    #[test]
    fn stale_guard_triggers_and_clears() {
        let clock = Arc::new(ManualClock::new());
        let b = InputBuffers::new(cfg(), clock.clone()).unwrap();
        let names = |s: Vec<StaleInput>| s.into_iter().map(|s| s.name).collect::<Vec<_>>();
        assert_eq!(names(b.stale_inputs()), vec!["wrist", "top", "oct", "pose"]);
        b.push_frame("wrist", img(1), 1).unwrap();
        b.push_frame("top", img(2), 1).unwrap();
        b.push_state(vec![1.0, 2.0], 1).unwrap();
        // Three of four window samples: the sensor is still not ready.
        b.push_sensor(&[0.0; 9], &[1, 2, 3]).unwrap();
        assert_eq!(names(b.stale_inputs()), vec!["oct"]);
        b.push_sensor(&[1.0, 2.0, 3.0], &[4]).unwrap();
        let Snapshot::Fresh(obs) = b.snapshot() else { panic!("expected fresh inputs") };
        assert_eq!(obs.frames.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), vec!["wrist", "top"]);
        assert_eq!(obs.sensor.stamps_ns, vec![1, 2, 3, 4]);
        assert_eq!(obs.sensor.sample(3), &[1.0, 2.0, 3.0]);
        assert_eq!(obs.instruction, "insert");
        // The sensor goes silent: at exactly max age still fresh, 1 ms later stale with its age.
        clock.advance(Duration::from_millis(100));
        assert!(b.stale_inputs().is_empty());
        clock.advance(Duration::from_millis(1));
        let Snapshot::Stale(s) = b.snapshot() else { panic!("expected stale sensor") };
        assert_eq!(s, vec![StaleInput { name: "oct".into(), age: Some(Duration::from_millis(101)) }]);
        // Silence continues past the state's age too.
        clock.advance(Duration::from_millis(100));
        assert_eq!(names(b.stale_inputs()), vec!["oct", "pose"]);
        // Data resumes: the guard clears.
        b.push_sensor(&[0.0; 3], &[5]).unwrap();
        b.push_state(vec![0.0, 0.0], 2).unwrap();
        assert!(matches!(b.snapshot(), Snapshot::Fresh(_)));
    }

    #[test]
    fn bad_input_is_refused_with_its_name() {
        let b = InputBuffers::new(cfg(), Arc::new(ManualClock::new())).unwrap();
        let e = b.push_frame("side", img(0), 0).unwrap_err().to_string();
        assert!(e.contains("`side`") && e.contains("unknown camera"), "{e}");
        let e = b.push_frame("top", RgbImage { width: 2, height: 2, data: vec![0; 6] }, 0).unwrap_err().to_string();
        assert!(e.contains("`top`") && e.contains("needs 12 bytes"), "{e}");
        let e = b.push_sensor(&[0.0; 4], &[1]).unwrap_err().to_string();
        assert!(e.contains("`oct`") && e.contains("4 values for 1 samples of 3"), "{e}");
        let e = b.push_sensor(&[0.0, f32::NAN, 0.0], &[1]).unwrap_err().to_string();
        assert!(e.contains("non-finite value NaN in sample 0, channel 1"), "{e}");
        b.push_sensor(&[0.0; 3], &[5]).unwrap();
        let e = b.push_sensor(&[0.0; 3], &[5]).unwrap_err().to_string();
        assert!(e.contains("does not increase"), "{e}");
        let e = b.push_state(vec![1.0], 0).unwrap_err().to_string();
        assert!(e.contains("`pose`") && e.contains("1 values, expected 2"), "{e}");
        let mut dup = cfg();
        dup.cameras[1].name = "oct".into();
        assert!(InputBuffers::new(dup, Arc::new(ManualClock::new())).unwrap_err().to_string().contains("unique"));
    }
}
