//! The real model behind the runtime: deployable checkpoints (train::deploy) of the VLA policy.
//! The base VL model is loaded once and never modified; a version brings its heads and, for
//! Stage 2, a PEFT LoRA adapter. A heads-only version runs on the base model itself; an adapter
//! version gets its own [`Qwen25VL`] whose weights share storage with the base
//! ([`Qwen25VL::share_weights`]) plus the adapter's LoRA layers (unmerged), so a version costs
//! only its LoRA and heads parameters and the running version is untouched while the next one
//! loads. VL features = the model's pooled last hidden state on the camera frames (in the
//! checkpoint's camera order) with the instruction, built with the same processor and prompt as
//! training; actions = DDIM over the heads, in physical units. The VL model runs on the loader's
//! device in its dtype (bf16 on a GPU, f32 on the CPU by default); the heads run in f32 on the
//! same device.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tch::{nn, Device, Kind, Tensor};

use super::error::RuntimeError;
use super::model::{ActionModel, LoadedModel, ModelLoader, VlEncoder};
use super::types::{ActionChunk, CheckpointMeta, IoSpec, Observation, VlFeatures};
use crate::checkpoint::deploy::{DeployInfo, HEADS_FILE};
use crate::policy::heads::{CondInput, PolicyHeads, VlInput};
use crate::vlm::linear::VisitLinears;
use crate::vlm::peft::{load_adapter, read_adapter_config, ADAPTER_CONFIG};
use crate::vlm::{Pooling, Qwen25VL, VlProcessor};

/// Loads deployable checkpoints against one base model folder.
pub struct VlaLoader {
    base_dir: PathBuf,
    base_id: String,
    vlm: Arc<Mutex<Qwen25VL>>,
    /// Module paths of the base model's linear layers (adapter targets are checked against it
    /// without locking the model).
    linears: Vec<String>,
    processor: Arc<VlProcessor>,
    ddim_steps: usize,
    device: Device,
    kind: Kind,
}

impl VlaLoader {
    /// Loads the base model once, its weights in `kind` on `device`; `ddim_steps` 0 = the
    /// checkpoint's own setting.
    pub fn new(base_dir: &Path, ddim_steps: usize, device: Device, kind: Kind) -> anyhow::Result<Self> {
        let config = crate::vlm::Config::from_file(&base_dir.join("config.json"))?;
        let mut vlm = Qwen25VL::load(base_dir, kind, device)?;
        let mut linears = Vec::new();
        vlm.visit_linears_mut(&mut |l| linears.push(l.path.clone()));
        Ok(Self {
            base_dir: base_dir.to_path_buf(),
            base_id: crate::checkpoint::model_id::base_model_id(base_dir)?,
            vlm: Arc::new(Mutex::new(vlm)),
            linears,
            processor: Arc::new(VlProcessor::from_model_dir(base_dir, &config, None, None)?),
            ddim_steps,
            device,
            kind,
        })
    }

    /// Where the models run and the VL model's dtype.
    pub fn placement(&self) -> (Device, Kind) {
        (self.device, self.kind)
    }

    /// Identity of the loaded base model (checkpoints must name the same).
    pub fn base_model_id(&self) -> &str {
        &self.base_id
    }

    /// The VL model a version computes features with: the shared base for a heads-only version,
    /// a weight-sharing copy with the adapter's LoRA layers otherwise.
    fn version_model(
        &self,
        dir: &Path,
        adapter: Option<&str>,
    ) -> Result<(Arc<Mutex<Qwen25VL>>, Option<nn::VarStore>), RuntimeError> {
        let Some(rel) = adapter else { return Ok((self.vlm.clone(), None)) };
        let mut model = {
            let base = self.vlm.lock().map_err(|_| ck_err(dir, "base VL model lock poisoned"))?;
            base.share_weights().map_err(|e| ck_err(dir, format!("sharing the base model's weights: {e}")))?
        };
        let vars = nn::VarStore::new(self.device);
        load_adapter(&mut model, &dir.join(rel), &vars.root()).map_err(|e| ck_err(dir, format!("adapter: {e}")))?;
        Ok((Arc::new(Mutex::new(model)), Some(vars)))
    }

    /// Checks a version's adapter folder against the base model before anything is loaded:
    /// the folder stays inside the checkpoint, its config parses, and its `target_modules`
    /// select linear layers of the base model. (Tensor keys and shapes are checked by
    /// [`load_adapter`] before it changes the version's model.)
    fn check_adapter(&self, dir: &Path, rel: &str) -> Result<(), RuntimeError> {
        let inside = Path::new(rel).components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if rel.is_empty() || !inside {
            return Err(ck_err(
                dir,
                format!("deploy.json: adapter `{rel}`: expected a folder name inside the checkpoint"),
            ));
        }
        let adir = dir.join(rel);
        let (config, _) = read_adapter_config(&adir).map_err(|e| ck_err(dir, format!("adapter: {e}")))?;
        let mut selected = 0;
        for path in &self.linears {
            if config
                .selects(path)
                .map_err(|e| ck_err(dir, format!("adapter: {}: {e}", adir.join(ADAPTER_CONFIG).display())))?
            {
                selected += 1;
            }
        }
        if selected == 0 {
            return Err(ck_err(
                dir,
                format!(
                    "adapter: {}: target_modules {} select none of the {} linear layers of base model {}",
                    adir.join(ADAPTER_CONFIG).display(),
                    config.target_modules,
                    self.linears.len(),
                    self.base_dir.display()
                ),
            ));
        }
        Ok(())
    }
}

fn ck_err(dir: &Path, reason: impl ToString) -> RuntimeError {
    RuntimeError::Checkpoint { dir: dir.to_path_buf(), reason: reason.to_string() }
}

impl ModelLoader for VlaLoader {
    fn verify(&self, dir: &Path) -> Result<CheckpointMeta, RuntimeError> {
        let manifest = crate::checkpoint::publish::verify(dir).map_err(|e| {
            // The publisher's errors already name the folder.
            let text = e.to_string();
            ck_err(dir, text.strip_prefix(&format!("checkpoint `{}`: ", dir.display())).unwrap_or(&text))
        })?;
        let deploy = DeployInfo::read(dir).map_err(|e| ck_err(dir, e))?;
        if deploy.base_model_id != self.base_id {
            let note = crate::checkpoint::model_id::older_scheme_note(&deploy.base_model_id);
            return Err(ck_err(
                dir,
                format!(
                    "deploy.json: base_model_id {}, but the loaded base model {} is {}{note}",
                    deploy.base_model_id,
                    self.base_dir.display(),
                    self.base_id
                ),
            ));
        }
        let image = &self.processor.image;
        if (deploy.processor.min_pixels, deploy.processor.max_pixels) != (image.min_pixels, image.max_pixels) {
            return Err(ck_err(
                dir,
                format!(
                    "deploy.json: processor min_pixels/max_pixels {}/{}, but the base model's processor uses {}/{}",
                    deploy.processor.min_pixels, deploy.processor.max_pixels, image.min_pixels, image.max_pixels
                ),
            ));
        }
        if let Some(rel) = &deploy.adapter {
            self.check_adapter(dir, rel)?;
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
        let (heads, _) = PolicyHeads::load(&dir.join(HEADS_FILE), self.device).map_err(|e| ck_err(dir, e))?;
        let c = heads.config();
        let io = &meta.io;
        let checks = [
            ("sensor.in_channels", c.sensor.in_channels as usize, io.sensor_channels),
            ("expert.horizon", c.expert.horizon as usize, io.horizon),
            ("expert.action_dim", c.expert.action_dim as usize, io.action_dim),
        ];
        for (field, heads_value, deploy_value) in checks {
            if heads_value != deploy_value {
                return Err(RuntimeError::Incompatible {
                    version: meta.version.clone(),
                    field: field.into(),
                    expected: deploy_value.to_string(),
                    actual: heads_value.to_string(),
                });
            }
        }
        let pooling = Pooling::parse(&deploy.pooling).ok_or_else(|| {
            ck_err(dir, format!("deploy.json: pooling `{}`: expected {}", deploy.pooling, Pooling::NAMES))
        })?;
        let steps = if self.ddim_steps > 0 { self.ddim_steps } else { deploy.ddim_steps };
        let (vlm, adapter_vars) = self.version_model(dir, deploy.adapter.as_deref())?;
        Ok(LoadedModel {
            encoder: Box::new(Encoder {
                vlm,
                _adapter_vars: adapter_vars,
                processor: self.processor.clone(),
                pooling,
                version: meta.version.clone(),
            }),
            model: Box::new(Heads {
                heads,
                version: meta.version.clone(),
                steps,
                step_period_s: deploy.step_period_s as f32,
            }),
        })
    }
}

struct Encoder {
    vlm: Arc<Mutex<Qwen25VL>>,
    /// Owner of the version's LoRA parameters (adapter versions only).
    _adapter_vars: Option<nn::VarStore>,
    processor: Arc<VlProcessor>,
    pooling: Pooling,
    version: String,
}

impl VlEncoder for Encoder {
    fn features(&mut self, obs: &Observation) -> Result<VlFeatures, RuntimeError> {
        let err = |e: &dyn std::fmt::Display| RuntimeError::Model {
            version: self.version.clone(),
            reason: format!("VL features: {e}"),
        };
        let images: Vec<_> = obs.frames.iter().map(|f| f.image.as_ref().clone()).collect();
        let sample = self.processor.sample(&images, &obs.instruction).map_err(|e| err(&e))?;
        let batch = self.processor.collate(&[sample]).map_err(|e| err(&e))?;
        let vlm = self.vlm.lock().map_err(|_| err(&"VL model lock poisoned"))?;
        let pooled =
            tch::no_grad(|| vlm.forward(&batch, false)).and_then(|f| f.pooled(self.pooling)).map_err(|e| err(&e))?;
        Ok(VlFeatures::new(pooled.detach()))
    }
}

struct Heads {
    heads: PolicyHeads,
    version: String,
    steps: usize,
    step_period_s: f32,
}

/// The DDIM noise seed of the action chunk for `obs`: its snapshot time in ns, so a chunk is
/// reproducible from the observation alone (`PolicyHeads::sample(.., steps, action_seed(obs))`).
pub fn action_seed(obs: &Observation) -> u64 {
    obs.taken_at.as_nanos() as u64
}

impl ActionModel for Heads {
    fn version(&self) -> &str {
        &self.version
    }

    fn act_with(&mut self, features: &VlFeatures, obs: &Observation) -> Result<ActionChunk, RuntimeError> {
        let err =
            |e: &dyn std::fmt::Display| RuntimeError::Model { version: self.version.clone(), reason: e.to_string() };
        let pooled = features.get::<Tensor>().ok_or_else(|| err(&"VL features of another model type"))?;
        let ch = obs.sensor.channels;
        // Host tensors: the heads move their inputs to their own device.
        let sensor = Tensor::from_slice(&obs.sensor.values).reshape([
            1,
            (obs.sensor.values.len() / ch.max(1)) as i64,
            ch as i64,
        ]);
        let vl = VlInput::pooled(pooled.shallow_clone());
        let c = self.heads.config();
        let state = match (&obs.state, c.state_dim) {
            (_, 0) => None,
            (Some(s), d) => Some(Tensor::from_slice(&s.values).to_kind(Kind::Float).reshape([1, d])),
            (None, d) => {
                return Err(err(&format!(
                    "the heads use a robot state of {d} values, but no state input is configured"
                )))
            }
        };
        let seed = action_seed(obs);
        let out = self
            .heads
            .sample(&CondInput { vl: &vl, sensor: &sensor, state: state.as_ref() }, self.steps, seed)
            .map_err(|e| err(&e))?;
        let values =
            Vec::<f32>::try_from(out.to_device(Device::Cpu).to_kind(Kind::Float).reshape([-1])).map_err(|e| err(&e))?;
        Ok(ActionChunk {
            version: self.version.clone(),
            horizon: c.expert.horizon as usize,
            action_dim: c.expert.action_dim as usize,
            step_period_s: self.step_period_s,
            values,
        })
    }
}
