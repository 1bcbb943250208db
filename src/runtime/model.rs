//! What the runtime needs from a model and a checkpoint loader. The real VLA policy (VL backbone
//! + LoRA, sensor encoder, DDIM action expert) implements these; tests use small doubles.
//!
//! A loaded checkpoint is split in two owned halves so the expensive VL step can run on a
//! background thread while the control thread runs the cheap per-tick head step, without locks
//! (tch tensors are `Send` but not `Sync`).

use std::path::Path;

use super::error::RuntimeError;
use super::types::{ActionChunk, CheckpointMeta, Observation, VlFeatures};

/// The expensive half: VL features from the camera frames and the instruction. Runs on the
/// runtime's refresh thread every N control ticks (and once on the hot-swap thread to validate a
/// new checkpoint before it acts).
pub trait VlEncoder: Send {
    /// Features of `obs` (may take longer than a control period).
    fn features(&mut self, obs: &Observation) -> Result<VlFeatures, RuntimeError>;
}

/// The cheap half: an action chunk from the latest VL features and the current sensor window and
/// state. Runs on the control thread at every tick.
pub trait ActionModel: Send {
    /// Checkpoint version of this model.
    fn version(&self) -> &str;
    /// An action chunk in physical units (`horizon x action_dim` of the checkpoint's [`IoSpec`](super::types::IoSpec)).
    /// `features` were computed by this checkpoint's encoder, possibly a few ticks ago.
    fn act_with(&mut self, features: &VlFeatures, obs: &Observation) -> Result<ActionChunk, RuntimeError>;
}

/// A loaded checkpoint.
pub struct LoadedModel {
    /// The VL half.
    pub encoder: Box<dyn VlEncoder>,
    /// The per-tick half.
    pub model: Box<dyn ActionModel>,
}

/// Verifies and loads checkpoint folders. Called on the hot-swap thread only.
pub trait ModelLoader: Send + Sync {
    /// Checks a checkpoint folder without loading weights: manifest present, every file's sha256,
    /// metadata readable. Returns what the runtime checks compatibility against.
    fn verify(&self, dir: &Path) -> Result<CheckpointMeta, RuntimeError>;
    /// Loads a folder that `verify` accepted as `meta`. Must fail (naming the tensor or file)
    /// when the weights do not match the declared shapes.
    fn load(&self, dir: &Path, meta: &CheckpointMeta) -> Result<LoadedModel, RuntimeError>;
}
