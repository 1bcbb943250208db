//! The deployable checkpoint: what `train` publishes as `checkpoints/<version>/` and what a
//! policy loads. Next to `manifest.json` (publish.rs) the folder holds:
//! - `deploy.json`: [`DeployInfo`], everything a policy needs to use the weights the way training did;
//! - `heads.safetensors`: sensor encoder + fusion + action expert with config, schedule and
//!   normalization (`policy::PolicyHeads::save`);
//! - `adapter/`: the PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`),
//!   absent for a heads-only (stage-1) checkpoint;
//! - `stats.json`: the dataset's normalization statistics (for inspection).

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Name of the deploy description file.
pub const DEPLOY_FILE: &str = "deploy.json";
/// Name of the heads weights file.
pub const HEADS_FILE: &str = "heads.safetensors";
/// Name of the PEFT adapter folder.
pub const ADAPTER_DIR: &str = "adapter";
/// Name of the dataset statistics file.
pub const STATS_FILE: &str = "stats.json";
/// Format version written by this build.
pub const DEPLOY_FORMAT_VERSION: u32 = 1;

/// Image processor settings used in training (the policy must use the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessorSettings {
    /// Minimum pixels after smart resize.
    pub min_pixels: i64,
    /// Maximum pixels after smart resize.
    pub max_pixels: i64,
}

/// How a checkpoint is to be run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployInfo {
    /// [`DEPLOY_FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// Identity of the base VL model the adapter and heads were trained with.
    pub base_model_id: String,
    /// Adapter folder relative to the checkpoint, if the VL model was fine-tuned.
    pub adapter: Option<String>,
    /// Camera stream names, in the order their images enter the prompt.
    pub cameras: Vec<String>,
    /// Image processor settings.
    pub processor: ProcessorSettings,
    /// VL feature pooling: `all`, `image`, `text` or `last` ([`crate::vlm::Pooling`]).
    pub pooling: String,
    /// Sensor channels per sample.
    pub sensor_channels: usize,
    /// Samples per sensor window.
    pub sensor_window: usize,
    /// Sensor window length in seconds.
    pub sensor_window_s: f64,
    /// Robot state values fed to the policy (0 = none).
    pub state_dim: usize,
    /// Steps per action chunk.
    pub horizon: usize,
    /// Values per action step.
    pub action_dim: usize,
    /// Seconds between action steps (1 / control rate).
    pub step_period_s: f64,
    /// DDIM steps used in validation.
    pub ddim_steps: usize,
    /// Compute dtype used in training: `f32` or `bf16`.
    pub dtype: String,
}

/// Errors reading or writing deploy.json.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a valid deploy description.
    #[error("{path}: invalid deploy description: {reason}")]
    Invalid {
        /// File.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl DeployInfo {
    /// Reads `<dir>/deploy.json` and checks its format version.
    pub fn read(dir: &Path) -> Result<DeployInfo, DeployError> {
        let path = dir.join(DEPLOY_FILE);
        let p = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|source| DeployError::Io { path: p.clone(), source })?;
        let info: DeployInfo =
            serde_json::from_str(&text).map_err(|e| DeployError::Invalid { path: p.clone(), reason: e.to_string() })?;
        if info.format_version > DEPLOY_FORMAT_VERSION {
            return Err(DeployError::Invalid {
                path: p,
                reason: format!(
                    "format_version {} is newer than this build's {DEPLOY_FORMAT_VERSION}",
                    info.format_version
                ),
            });
        }
        Ok(info)
    }

    /// Why a dataset with sensor windows `sensor` (`[T, C]`) and action chunks `action`
    /// (`[H, A]`) cannot train heads of this checkpoint, if it cannot.
    pub fn layout_mismatch(&self, sensor: [usize; 2], action: [usize; 2]) -> Option<String> {
        let mine = ([self.sensor_window, self.sensor_channels], [self.horizon, self.action_dim]);
        (mine != (sensor, action)).then(|| {
            format!(
                "expects sensor {:?} and actions {:?}; the dataset has sensor {sensor:?} and actions {action:?}",
                mine.0, mine.1
            )
        })
    }

    /// The JSON text written as deploy.json.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("DeployInfo serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeployInfo {
        DeployInfo {
            format_version: DEPLOY_FORMAT_VERSION,
            base_model_id: "qwen2_5_vl@sha256:00".into(),
            adapter: Some(ADAPTER_DIR.into()),
            cameras: vec!["camera0".into()],
            processor: ProcessorSettings { min_pixels: 3136, max_pixels: 12845056 },
            pooling: "all".into(),
            sensor_channels: 1026,
            sensor_window: 65,
            sensor_window_s: 0.1,
            state_dim: 0,
            horizon: 8,
            action_dim: 7,
            step_period_s: 0.1,
            ddim_steps: 10,
            dtype: "f32".into(),
        }
    }

    #[test]
    fn round_trips_and_rejects_newer_or_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DEPLOY_FILE), sample().to_json()).unwrap();
        assert_eq!(DeployInfo::read(dir.path()).unwrap(), sample());
        let mut newer = sample();
        newer.format_version = DEPLOY_FORMAT_VERSION + 1;
        std::fs::write(dir.path().join(DEPLOY_FILE), newer.to_json()).unwrap();
        assert!(DeployInfo::read(dir.path()).unwrap_err().to_string().contains("newer"));
        let text = sample().to_json().replacen('{', "{\"extra\": 1,", 1);
        std::fs::write(dir.path().join(DEPLOY_FILE), text).unwrap();
        assert!(DeployInfo::read(dir.path()).unwrap_err().to_string().contains("extra"));
    }
}
