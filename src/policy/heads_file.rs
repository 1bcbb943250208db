//! Heads checkpoints: one safetensors file with every variable in f32 and the JSON metadata
//! (format version, stage, config, noise schedule, normalization, versions, extra entries) in the
//! header's `__metadata__` under [`META_KEY`]. Loading checks the metadata and every tensor's
//! name, dtype, shape and finiteness; nothing is loaded partially.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::config::PolicyConfig;
use super::error::PolicyError;
use super::heads::PolicyHeads;
use super::normalize::NormStats;
use super::schedule::NoiseSchedule;

/// `__metadata__` key holding the JSON [`HeadsFileMeta`].
pub const META_KEY: &str = "vla_finetune.policy_heads";
/// Value of [`HeadsFileMeta::format`].
pub const FORMAT: &str = "vla_finetune.policy_heads";
/// Newest format version this build reads and the one it writes.
pub const FORMAT_VERSION: u32 = 1;

/// Which training stage wrote the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum CheckpointStage {
    /// Heads only (VL backbone frozen).
    Stage1,
    /// Heads plus a LoRA adapter on the VL backbone.
    Stage2 {
        /// PEFT adapter directory, relative to the checkpoint file's folder.
        adapter_dir: String,
        /// Base model the adapter applies to (Hugging Face id or a content hash).
        base_model_id: String,
    },
}

/// Everything besides the weights that a loader needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadsFileMeta {
    /// Always [`FORMAT`].
    pub format: String,
    /// Format version (currently [`FORMAT_VERSION`]).
    pub format_version: u32,
    /// Version of the crate that wrote the file.
    pub crate_version: String,
    /// libtorch version of the writer.
    pub libtorch_version: String,
    /// Stage and, for stage 2, the adapter reference.
    pub stage: CheckpointStage,
    /// Heads configuration.
    pub config: PolicyConfig,
    /// Noise schedule the denoiser was trained with.
    pub schedule: NoiseSchedule,
    /// Normalization of sensor, state and action values.
    pub normalization: NormStats,
    /// Free-form entries of the writer (metrics, prompt template, epoch, ...).
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn ckpt_err(path: &Path, reason: impl Into<String>) -> PolicyError {
    PolicyError::Checkpoint { path: path.to_path_buf(), reason: reason.into() }
}

fn tensor_err(path: &Path, tensor: &str, reason: impl Into<String>) -> PolicyError {
    PolicyError::CheckpointTensor { path: path.to_path_buf(), tensor: tensor.into(), reason: reason.into() }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PolicyError + '_ {
    move |source| PolicyError::Io { path: path.to_path_buf(), source }
}

impl HeadsFileMeta {
    /// Reads and checks only the metadata of a checkpoint (cheap: the header).
    pub fn read(path: &Path) -> Result<Self, PolicyError> {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        // SAFETY: the map is read-only and only lives during this call.
        let buf = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
        Self::from_header(path, &buf)
    }

    fn from_header(path: &Path, buf: &[u8]) -> Result<Self, PolicyError> {
        let (_, header) =
            SafeTensors::read_metadata(buf).map_err(|e| ckpt_err(path, format!("not a safetensors file: {e:?}")))?;
        let json = header.metadata().as_ref().and_then(|m| m.get(META_KEY)).ok_or_else(|| {
            ckpt_err(path, format!("header has no `{META_KEY}` metadata (not a policy heads checkpoint)"))
        })?;
        let meta: Self =
            serde_json::from_str(json).map_err(|e| ckpt_err(path, format!("metadata `{META_KEY}`: {e}")))?;
        meta.check(path)?;
        Ok(meta)
    }

    /// Checks format, version, config, schedule and normalization.
    fn check(&self, path: &Path) -> Result<(), PolicyError> {
        if self.format != FORMAT {
            return Err(ckpt_err(path, format!("format `{}`, expected `{FORMAT}`", self.format)));
        }
        if self.format_version == 0 || self.format_version > FORMAT_VERSION {
            return Err(ckpt_err(
                path,
                format!("format version {} (this build reads 1..={FORMAT_VERSION})", self.format_version),
            ));
        }
        let wrap = |e: PolicyError| ckpt_err(path, e.to_string());
        self.config.validate().map_err(wrap)?;
        self.schedule.check_matches(&self.config.diffusion, "metadata").map_err(wrap)?;
        let c = &self.config;
        self.normalization
            .validate(c.sensor.in_channels as usize, c.state_dim as usize, c.expert.action_dim as usize)
            .map_err(wrap)?;
        Ok(())
    }
}

impl PolicyHeads {
    /// Writes every variable (f32) and the metadata to `path` atomically (temporary file in the
    /// same folder, fsync, rename). `extra` is stored as [`HeadsFileMeta::extra`].
    pub fn save(
        &self,
        path: &Path,
        stage: CheckpointStage,
        extra: BTreeMap<String, serde_json::Value>,
    ) -> Result<HeadsFileMeta, PolicyError> {
        let meta = HeadsFileMeta {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            crate_version: env!("CARGO_PKG_VERSION").into(),
            libtorch_version: crate::device::libtorch_version().into(),
            stage,
            config: self.config().clone(),
            schedule: self.schedule().clone(),
            normalization: self.norm().clone(),
            extra,
        };
        let json = serde_json::to_string(&meta).map_err(|e| ckpt_err(path, format!("metadata: {e}")))?;
        let mut vars: Vec<(String, Tensor)> = self.var_store().variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = vars
            .iter()
            .map(|(name, t)| {
                let t = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
                let shape = t.size().iter().map(|&d| d as usize).collect();
                let v = Vec::<f32>::try_from(t.flatten(0, -1))?;
                Ok((name.clone(), shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
            })
            .collect::<Result<_, tch::TchError>>()?;
        let views = data
            .iter()
            .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.as_str(), v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ckpt_err(path, format!("serialize: {e:?}")))?;
        let header = Some(HashMap::from([(META_KEY.to_string(), json)]));
        let bytes =
            safetensors::tensor::serialize(views, &header).map_err(|e| ckpt_err(path, format!("serialize: {e:?}")))?;
        write_atomic(path, &bytes)?;
        Ok(meta)
    }

    /// Loads heads from a checkpoint onto `device`: metadata checked, every variable of the
    /// config present with dtype F32 and the right shape and finite values, no extra tensors.
    pub fn load(path: &Path, device: Device) -> Result<(Self, HeadsFileMeta), PolicyError> {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        // SAFETY: read-only map; the file is not modified while loading (publication renames).
        let buf = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
        let meta = HeadsFileMeta::from_header(path, &buf)?;
        let st =
            SafeTensors::deserialize(&buf).map_err(|e| ckpt_err(path, format!("corrupt safetensors data: {e:?}")))?;
        let heads = Self::new(meta.config.clone(), meta.normalization.clone(), device)?;
        let vars = heads.var_store().variables();
        if let Some(extra) = st.names().into_iter().filter(|n| !vars.contains_key(n.as_str())).min() {
            return Err(tensor_err(path, extra, "is not a variable of the configured heads (unexpected tensor)"));
        }
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        let guard = tch::no_grad_guard();
        for name in names {
            let mut var = vars[name].shallow_clone();
            let view = st.tensor(name).map_err(|_| tensor_err(path, name, "is missing"))?;
            if view.dtype() != Dtype::F32 {
                return Err(tensor_err(path, name, format!("has dtype {:?}, expected F32", view.dtype())));
            }
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if shape != var.size() {
                return Err(tensor_err(path, name, format!("has shape {shape:?}, expected {:?}", var.size())));
            }
            let t = Tensor::f_from_data_size(view.data(), &shape, Kind::Float)?;
            let bad = t.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
            if bad > 0 {
                return Err(tensor_err(path, name, format!("has {bad} non-finite value(s)")));
            }
            var.copy_(&t.to_device(device));
        }
        drop(guard);
        Ok((heads, meta))
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PolicyError> {
    crate::atomic_file::write(path, bytes).map_err(|e| {
        let (path, source) = e.into_parts();
        PolicyError::Io { path, source }
    })
}
