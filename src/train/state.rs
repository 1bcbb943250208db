//! Training state for exact resume: trainable parameters, AdamW moments and step counts, schedule,
//! accumulation, epoch/step counters, the run seed and an opaque cache-state blob, in ONE
//! safetensors file whose `__metadata__["train_state"]` holds the JSON metadata. One file written
//! atomically (temporary sibling, fsync, rename, fsync folder) means a kill never leaves a state
//! whose tensors and counters disagree.
//!
//! Randomness: libtorch's generator is not saved. Instead every random draw of a step is made after
//! `tch::manual_seed(derive_seed(run_seed, &[STREAM, global_step, micro_index]))` (see
//! [`seed_torch`]), and data order comes from [`epoch_order`]`(run_seed, epoch, n)`. Both are pure
//! functions of the run seed and the counters stored here, so a resumed run draws exactly what the
//! uninterrupted run would have drawn. libtorch's generator is process-global, so only one
//! training job per process may draw from it (the job controller runs one job at a time).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Tensor;

use super::optim::{Accumulation, AdamW, AdamWState, CosineSchedule};
use super::tensor_io::{self, TensorIoError};

/// Version of the state file layout written by [`save_state`].
pub const STATE_FORMAT_VERSION: u32 = 1;
const META_KEY: &str = "train_state";
const PARAM_PREFIX: &str = "param/";
const EXP_AVG_PREFIX: &str = "adamw.exp_avg/";
const EXP_AVG_SQ_PREFIX: &str = "adamw.exp_avg_sq/";

/// Errors of saving and restoring training state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing the file failed.
    #[error(transparent)]
    Io(#[from] TensorIoError),
    /// The file is not a training state this code can resume from.
    #[error("training state `{path}`: {reason}")]
    Invalid { path: String, reason: String },
}

/// Where a run stands. `global_step` counts optimizer steps; `step_in_epoch` counts optimizer
/// steps done in the current `epoch` (the next one to run has this index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Optimizer steps completed within `epoch`.
    pub step_in_epoch: u64,
    /// Optimizer steps completed in the run.
    pub global_step: u64,
    /// Training samples consumed in the run.
    pub samples_seen: u64,
}

/// Everything but tensors: stored as JSON in the state file's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateMeta {
    /// [`STATE_FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The run seed every per-step seed derives from.
    pub run_seed: u64,
    /// Progress counters.
    pub counters: Counters,
    /// The learning-rate schedule of the run.
    pub schedule: CosineSchedule,
    /// Micro-batch and accumulation in use (after any out-of-memory halving).
    pub accumulation: Accumulation,
    /// Data-parallel ranks of the run that wrote it (1 in states written before it existed).
    #[serde(default = "one")]
    pub world_size: usize,
    /// AdamW step count per parameter.
    pub adamw_steps: BTreeMap<String, u64>,
    /// The caller's cache state (mode, adapter version of the cached features, epochs since the
    /// last refresh, ...); opaque here.
    pub cache_state: serde_json::Value,
    /// Anything else the caller needs to resume (best validation metric, ...); opaque here.
    pub extra: serde_json::Value,
}

/// What the caller supplies to [`save_state`] besides the optimizer.
#[derive(Debug, Clone, PartialEq)]
pub struct RunState {
    /// The run seed.
    pub run_seed: u64,
    /// Progress counters.
    pub counters: Counters,
    /// Schedule in use.
    pub schedule: CosineSchedule,
    /// Accumulation in use.
    pub accumulation: Accumulation,
    /// Data-parallel ranks.
    pub world_size: usize,
    /// Opaque cache state.
    pub cache_state: serde_json::Value,
    /// Opaque extras.
    pub extra: serde_json::Value,
}

impl From<StateMeta> for RunState {
    /// The run state a saved state resumes (the optimizer's part is restored by [`load_state`]).
    fn from(m: StateMeta) -> Self {
        Self {
            run_seed: m.run_seed,
            counters: m.counters,
            schedule: m.schedule,
            accumulation: m.accumulation,
            world_size: m.world_size,
            cache_state: m.cache_state,
            extra: m.extra,
        }
    }
}

/// Writes the optimizer's parameters and moments plus `run` to `path`, atomically.
pub fn save_state(path: &Path, opt: &AdamW, run: &RunState) -> Result<(), StateError> {
    let exported = opt.export_state();
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(3 * exported.moments.len());
    for ((name, _, _, param), (_, m, v)) in opt.params().zip(exported.moments) {
        tensors.push((format!("{PARAM_PREFIX}{name}"), param.detach()));
        tensors.push((format!("{EXP_AVG_PREFIX}{name}"), m));
        tensors.push((format!("{EXP_AVG_SQ_PREFIX}{name}"), v));
    }
    let meta = StateMeta {
        format_version: STATE_FORMAT_VERSION,
        run_seed: run.run_seed,
        counters: run.counters,
        schedule: run.schedule,
        accumulation: run.accumulation,
        world_size: run.world_size,
        adamw_steps: exported.steps,
        cache_state: run.cache_state.clone(),
        extra: run.extra.clone(),
    };
    let json = serde_json::to_string(&meta)
        .map_err(|e| StateError::Invalid { path: path.display().to_string(), reason: e.to_string() })?;
    let metadata = HashMap::from([(META_KEY.to_string(), json)]);
    tensor_io::write_safetensors_atomic(path, &tensors, Some(metadata))?;
    Ok(())
}

fn one() -> usize {
    1
}

/// Reads only the metadata of a state file.
pub fn read_state_meta(path: &Path) -> Result<StateMeta, StateError> {
    let loaded = tensor_io::read_safetensors(path)?;
    parse_meta(path, &loaded.metadata)
}

fn parse_meta(path: &Path, metadata: &HashMap<String, String>) -> Result<StateMeta, StateError> {
    let invalid = |reason: String| StateError::Invalid { path: path.display().to_string(), reason };
    let json = metadata.get(META_KEY).ok_or_else(|| invalid(format!("no `{META_KEY}` metadata")))?;
    let meta: StateMeta = serde_json::from_str(json).map_err(|e| invalid(format!("metadata: {e}")))?;
    if meta.format_version != STATE_FORMAT_VERSION {
        return Err(invalid(format!("format version {} (expected {STATE_FORMAT_VERSION})", meta.format_version)));
    }
    Ok(meta)
}

/// Loads `path` into `opt`: copies every parameter in place (its device and dtype are kept, so the
/// model sharing the tensors sees the restored values) and restores the moments and step counts.
/// The file must hold exactly the optimizer's parameters with the same shapes.
pub fn load_state(path: &Path, opt: &mut AdamW) -> Result<StateMeta, StateError> {
    let invalid = |reason: String| StateError::Invalid { path: path.display().to_string(), reason };
    let loaded = tensor_io::read_safetensors(path)?;
    let meta = parse_meta(path, &loaded.metadata)?;
    let mut by_name: HashMap<String, Tensor> = loaded.tensors.into_iter().collect();
    let mut params = Vec::new();
    let mut moments = Vec::new();
    for (name, _, _, target) in opt.params() {
        let take = |map: &mut HashMap<String, Tensor>, prefix: &str| {
            map.remove(&format!("{prefix}{name}")).ok_or_else(|| invalid(format!("tensor `{prefix}{name}` is missing")))
        };
        let p = take(&mut by_name, PARAM_PREFIX)?;
        if p.size() != target.size() {
            return Err(invalid(format!(
                "`{PARAM_PREFIX}{name}` has shape {:?}, model has {:?}",
                p.size(),
                target.size()
            )));
        }
        let m = take(&mut by_name, EXP_AVG_PREFIX)?;
        let v = take(&mut by_name, EXP_AVG_SQ_PREFIX)?;
        params.push((target.shallow_clone(), p));
        moments.push((name.to_string(), m.to_device(target.device()), v.to_device(target.device())));
    }
    if let Some(extra) = by_name.keys().next() {
        return Err(invalid(format!("tensor `{extra}` belongs to no parameter of the optimizer")));
    }
    opt.import_state(AdamWState { moments, steps: meta.adamw_steps.clone() }).map_err(|e| invalid(e.to_string()))?;
    tch::no_grad(|| {
        for (mut target, p) in params {
            target.copy_(&p);
        }
    });
    Ok(meta)
}

/// A seed derived from the run seed and any counters (sha256 of their little-endian bytes).
pub fn derive_seed(run_seed: u64, parts: &[u64]) -> u64 {
    let mut h = Sha256::new();
    h.update(b"vla_finetune.seed.v1");
    h.update(run_seed.to_le_bytes());
    for p in parts {
        h.update(p.to_le_bytes());
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("sha256 has 32 bytes"))
}

/// Stream id for the per-micro-batch torch seed (dropout, diffusion noise and timesteps).
pub const STREAM_TORCH: u64 = 1;
/// Stream id for the per-epoch data order.
pub const STREAM_ORDER: u64 = 2;

/// Seeds libtorch (CPU and every CUDA device) for micro-batch `micro` of optimizer step
/// `global_step` (data-parallel: each rank's micro-batches have indices of their own). Call it
/// before the micro-batch's forward pass.
pub fn seed_torch(run_seed: u64, global_step: u64, micro: u64) {
    tch::manual_seed((derive_seed(run_seed, &[STREAM_TORCH, global_step, micro]) >> 1) as i64);
}

/// The order in which epoch `epoch` visits `n` samples: a Fisher-Yates shuffle driven by a
/// splitmix64 stream seeded from `(run_seed, epoch)`. Independent of crate versions.
pub fn epoch_order(run_seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut state = derive_seed(run_seed, &[STREAM_ORDER, epoch]);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}
