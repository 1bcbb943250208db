//! The real model behind the runtime: deployable checkpoints (train::deploy) of the VLA policy.
//! The base VL model is loaded once and shared by every version; a version brings its heads
//! (and, for Stage 2, its adapter). VL features = the base model's pooled last hidden state on
//! the camera frames (in the checkpoint's camera order) with the instruction, built with the
//! same processor and prompt as training; actions = DDIM over the heads, in physical units.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};

use super::error::RuntimeError;
use super::model::{ActionModel, LoadedModel, ModelLoader, VlEncoder};
use super::types::{ActionChunk, CheckpointMeta, IoSpec, Observation, VlFeatures};
use crate::policy::heads::{CondInput, PolicyHeads, VlFeatures as HeadFeatures};
use crate::train::deploy::{DeployInfo, HEADS_FILE};
use crate::vlm::{Pooling, Qwen25VL, VlProcessor};

/// Loads deployable checkpoints against one base model folder.
pub struct VlaLoader {
    base_dir: PathBuf,
    base_id: String,
    vlm: Arc<Mutex<Qwen25VL>>,
    processor: Arc<VlProcessor>,
    ddim_steps: usize,
}

impl VlaLoader {
    /// Loads the base model (f32, CPU) once; `ddim_steps` 0 = the checkpoint's own setting.
    pub fn new(base_dir: &Path, ddim_steps: usize) -> anyhow::Result<Self> {
        let config = crate::vlm::Config::from_file(&base_dir.join("config.json"))?;
        Ok(Self {
            base_dir: base_dir.to_path_buf(),
            base_id: crate::train::heads_job::base_model_id(base_dir)?,
            vlm: Arc::new(Mutex::new(Qwen25VL::load(base_dir, Kind::Float, Device::Cpu)?)),
            processor: Arc::new(VlProcessor::from_model_dir(base_dir, &config, None, None)?),
            ddim_steps,
        })
    }

    /// Identity of the loaded base model (checkpoints must name the same).
    pub fn base_model_id(&self) -> &str {
        &self.base_id
    }
}

fn ck_err(dir: &Path, reason: impl ToString) -> RuntimeError {
    RuntimeError::Checkpoint { dir: dir.to_path_buf(), reason: reason.to_string() }
}

impl ModelLoader for VlaLoader {
    fn verify(&self, dir: &Path) -> Result<CheckpointMeta, RuntimeError> {
        let manifest = crate::train::publish::verify(dir).map_err(|e| ck_err(dir, e))?;
        let deploy = DeployInfo::read(dir).map_err(|e| ck_err(dir, e))?;
        if let Some(adapter) = &deploy.adapter {
            return Err(ck_err(dir, format!("has a LoRA adapter `{adapter}`; this loader runs heads-only checkpoints on the frozen base model")));
        }
        if deploy.base_model_id != self.base_id {
            return Err(ck_err(dir, format!("trained on base model {}, loaded base model {} is {}", deploy.base_model_id, self.base_dir.display(), self.base_id)));
        }
        use sha2::Digest;
        let manifest_bytes = std::fs::read(dir.join("manifest.json")).map_err(|e| ck_err(dir, e))?;
        Ok(CheckpointMeta {
            version: manifest.version,
            base_model_id: deploy.base_model_id.clone(),
            io: IoSpec {
                cameras: deploy.cameras.clone(),
                sensor_channels: deploy.sensor_channels,
                sensor_window: deploy.sensor_window,
                state_dim: deploy.state_dim,
                horizon: deploy.horizon,
                action_dim: deploy.action_dim,
            },
            manifest_sha256: hex::encode(sha2::Sha256::digest(&manifest_bytes)),
        })
    }

    fn load(&self, dir: &Path, meta: &CheckpointMeta) -> Result<LoadedModel, RuntimeError> {
        let deploy = DeployInfo::read(dir).map_err(|e| ck_err(dir, e))?;
        let (heads, _) = PolicyHeads::load(&dir.join(HEADS_FILE), Device::Cpu).map_err(|e| ck_err(dir, e))?;
        let c = heads.config();
        let io = &meta.io;
        let checks = [
            ("sensor.in_channels", c.sensor.in_channels as usize, io.sensor_channels),
            ("expert.horizon", c.expert.horizon as usize, io.horizon),
            ("expert.action_dim", c.expert.action_dim as usize, io.action_dim),
        ];
        for (field, heads_value, deploy_value) in checks {
            if heads_value != deploy_value {
                return Err(RuntimeError::Incompatible { version: meta.version.clone(), field: field.into(), expected: deploy_value.to_string(), actual: heads_value.to_string() });
            }
        }
        let pooling = match deploy.pooling.as_str() {
            "all" => Pooling::All,
            "image" => Pooling::Image,
            "text" => Pooling::Text,
            other => return Err(ck_err(dir, format!("deploy.json: pooling `{other}`: expected all, image or text"))),
        };
        let steps = if self.ddim_steps > 0 { self.ddim_steps } else { deploy.ddim_steps };
        Ok(LoadedModel {
            encoder: Box::new(Encoder { vlm: self.vlm.clone(), processor: self.processor.clone(), pooling, version: meta.version.clone() }),
            model: Box::new(Heads { heads, version: meta.version.clone(), steps, step_period_s: deploy.step_period_s as f32, tick: 0 }),
        })
    }
}

struct Encoder {
    vlm: Arc<Mutex<Qwen25VL>>,
    processor: Arc<VlProcessor>,
    pooling: Pooling,
    version: String,
}

impl VlEncoder for Encoder {
    fn features(&mut self, obs: &Observation) -> Result<VlFeatures, RuntimeError> {
        let err = |e: &dyn std::fmt::Display| RuntimeError::Model { version: self.version.clone(), reason: format!("VL features: {e}") };
        let images: Vec<_> = obs.frames.iter().map(|f| f.image.as_ref().clone()).collect();
        let sample = self.processor.sample(&images, &obs.instruction).map_err(|e| err(&e))?;
        let batch = self.processor.collate(&[sample]).map_err(|e| err(&e))?;
        let vlm = self.vlm.lock().map_err(|_| err(&"VL model lock poisoned"))?;
        let pooled = tch::no_grad(|| vlm.forward(&batch, false)).and_then(|f| f.pooled(self.pooling)).map_err(|e| err(&e))?;
        Ok(VlFeatures::new(pooled.detach()))
    }
}

struct Heads {
    heads: PolicyHeads,
    version: String,
    steps: usize,
    step_period_s: f32,
    tick: u64,
}

impl ActionModel for Heads {
    fn version(&self) -> &str {
        &self.version
    }

    fn act_with(&mut self, features: &VlFeatures, obs: &Observation) -> Result<ActionChunk, RuntimeError> {
        let err = |e: &dyn std::fmt::Display| RuntimeError::Model { version: self.version.clone(), reason: e.to_string() };
        let pooled = features.get::<Tensor>().ok_or_else(|| err(&"VL features of another model type"))?;
        let ch = obs.sensor.channels;
        let sensor = Tensor::from_slice(&obs.sensor.values).reshape([1, (obs.sensor.values.len() / ch.max(1)) as i64, ch as i64]);
        let vl = HeadFeatures::pooled(pooled.shallow_clone());
        let seed = self.tick;
        self.tick += 1;
        let out = self.heads.sample(&CondInput { vl: &vl, sensor: &sensor, state: None }, self.steps, seed).map_err(|e| err(&e))?;
        let c = self.heads.config();
        let values = Vec::<f32>::try_from(out.to_kind(Kind::Float).reshape([-1])).map_err(|e| err(&e))?;
        Ok(ActionChunk { version: self.version.clone(), horizon: c.expert.horizon as usize, action_dim: c.expert.action_dim as usize, step_period_s: self.step_period_s, values })
    }
}
