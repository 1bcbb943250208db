//! What a front-end sets of the runtime: the ROS policy node from its parameters and stream
//! mapping, `vla_finetune policy` from its flags and the simulated robot. Each checks its own
//! values (naming its parameter or flag) and fills [`RuntimeSettings`]; the one
//! [`RuntimeConfig::from_settings`] builds the configuration from it.

use std::time::Duration;

use super::control::{ControlConfig, StaleBehavior};
use super::inputs::{CameraInput, InputConfig, SensorInput};
use super::runner::{RuntimeConfig, WatchConfig};

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

/// The runtime settings both front-ends give, already checked (positive, finite rate and ages).
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeSettings {
    /// Camera input names, in the model's view order.
    pub cameras: Vec<String>,
    /// Sensor input name.
    pub sensor: String,
    /// Values per sensor sample.
    pub sensor_channels: usize,
    /// Sensor window, horizon and action size.
    pub shapes: Shapes,
    /// Initial language instruction.
    pub instruction: String,
    /// Control loop rate, Hz (the tick budget is one period).
    pub control_rate_hz: f64,
    /// Older camera frames count as stale, s.
    pub max_camera_age_s: f64,
    /// No sensor sample for longer than this counts as stale, s.
    pub max_sensor_age_s: f64,
    /// Recompute VL features every N control ticks.
    pub vl_refresh_ticks: u32,
    /// Behaviour on stale input.
    pub stale_behavior: StaleBehavior,
    /// Publish actions from the start; false: none until an operator enables them.
    pub start_enabled: bool,
    /// Also watch a checkpoints folder.
    pub watch: Option<WatchConfig>,
}

impl RuntimeConfig {
    /// The runtime configuration of `s` (no state input, checkpoints of any base model).
    pub fn from_settings(s: RuntimeSettings) -> Self {
        let period = Duration::from_secs_f64(1.0 / s.control_rate_hz);
        let camera_age = Duration::from_secs_f64(s.max_camera_age_s);
        RuntimeConfig {
            inputs: InputConfig {
                cameras: s.cameras.into_iter().map(|name| CameraInput { name, max_age: camera_age }).collect(),
                sensor: SensorInput {
                    name: s.sensor,
                    channels: s.sensor_channels,
                    window: s.shapes.sensor_window,
                    max_age: Duration::from_secs_f64(s.max_sensor_age_s),
                },
                state: None,
                instruction: s.instruction,
            },
            control: ControlConfig {
                period,
                tick_budget: period,
                vl_refresh_ticks: s.vl_refresh_ticks,
                stale_behavior: s.stale_behavior,
                start_enabled: s.start_enabled,
            },
            horizon: s.shapes.horizon,
            action_dim: s.shapes.action_dim,
            base_model_id: None,
            watch: s.watch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn settings_become_the_runtime_configuration() {
        let watch = WatchConfig { root: PathBuf::from("ckpt"), poll: Duration::from_millis(100) };
        let cfg = RuntimeConfig::from_settings(RuntimeSettings {
            cameras: vec!["camera0".into(), "camera1".into()],
            sensor: "oct".into(),
            sensor_channels: 3,
            shapes: Shapes { sensor_window: 65, horizon: 8, action_dim: 7 },
            instruction: "pick".into(),
            control_rate_hz: 4.0,
            max_camera_age_s: 0.5,
            max_sensor_age_s: 0.1,
            vl_refresh_ticks: 2,
            stale_behavior: StaleBehavior::Hold,
            start_enabled: true,
            watch: Some(watch.clone()),
        });
        let camera = |name: &str| CameraInput { name: name.into(), max_age: Duration::from_millis(500) };
        assert_eq!(cfg.inputs.cameras, vec![camera("camera0"), camera("camera1")]);
        let sensor = SensorInput { name: "oct".into(), channels: 3, window: 65, max_age: Duration::from_millis(100) };
        assert_eq!((cfg.inputs.sensor, cfg.inputs.state, cfg.inputs.instruction.as_str()), (sensor, None, "pick"));
        let control = ControlConfig {
            period: Duration::from_millis(250),
            tick_budget: Duration::from_millis(250),
            vl_refresh_ticks: 2,
            stale_behavior: StaleBehavior::Hold,
            start_enabled: true,
        };
        assert_eq!(cfg.control, control);
        assert_eq!((cfg.horizon, cfg.action_dim, cfg.base_model_id, cfg.watch), (8, 7, None, Some(watch)));
    }
}
