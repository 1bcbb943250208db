//! The whole VLA policy: an optional VL feature source (the backbone) plus the heads.

use tch::Tensor;

use crate::dataset::episode::RgbImage;

use super::error::PolicyError;
use super::heads::{CondInput, PolicyHeads, VlInput};

/// What the VL backbone sees for one sample: the camera views and the instruction.
#[derive(Debug, Clone)]
pub struct VlObservation {
    /// One image per configured camera, in configured order.
    pub images: Vec<RgbImage>,
    /// Language instruction.
    pub instruction: String,
}

/// Produces VL features for a batch of observations (the Qwen2.5-VL backbone, a feature cache,
/// or a test double). Implemented outside this module.
pub trait VlFeatureSource: Send {
    /// Size of the pooled feature (must equal the heads' `vl_dim`).
    fn vl_dim(&self) -> i64;
    /// Features of `obs` (batch order kept): pooled `[B, vl_dim]`, plus tokens when available.
    fn features(&self, obs: &[VlObservation]) -> Result<VlInput, crate::vlm::VlmError>;
}

/// A batch of observations for [`VlaPolicy::act`].
#[derive(Debug)]
pub struct ObservationBatch {
    /// Precomputed VL features (e.g. refreshed every N control ticks); when `None` the policy's
    /// [`VlFeatureSource`] computes them from `vl_inputs`.
    pub vl: Option<VlInput>,
    /// Inputs for the VL feature source, one per sample (unused when `vl` is given).
    pub vl_inputs: Vec<VlObservation>,
    /// Raw sensor windows `[B, T, in_channels]`.
    pub sensor: Tensor,
    /// Raw robot state `[B, state_dim]`, when the config uses state.
    pub state: Option<Tensor>,
}

/// A training batch: conditioning inputs and target actions, physical units.
#[derive(Debug)]
pub struct PolicyBatch {
    /// VL features (cached, or live from the backbone and carrying gradient).
    pub vl: VlInput,
    /// Raw sensor windows `[B, T, in_channels]`.
    pub sensor: Tensor,
    /// Raw robot state `[B, state_dim]`, when the config uses state.
    pub state: Option<Tensor>,
    /// Target action chunks `[B, horizon, action_dim]`.
    pub actions: Tensor,
    /// One noise seed per sample (timestep + noise draw of the diffusion loss).
    pub sample_seeds: Vec<u64>,
}

impl PolicyBatch {
    /// The conditioning part as the heads take it.
    pub fn cond(&self) -> CondInput<'_> {
        CondInput { vl: &self.vl, sensor: &self.sensor, state: self.state.as_ref() }
    }
}

/// Heads plus an optional VL feature source.
pub struct VlaPolicy {
    /// Sensor encoder, fusion and action expert.
    pub heads: PolicyHeads,
    vl_source: Option<Box<dyn VlFeatureSource>>,
}

impl std::fmt::Debug for VlaPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VlaPolicy").field("heads", &self.heads).field("vl_source", &self.vl_source.is_some()).finish()
    }
}

impl VlaPolicy {
    /// A policy without a VL source (observations must carry VL features).
    pub fn new(heads: PolicyHeads) -> Self {
        Self { heads, vl_source: None }
    }

    /// Attaches a VL feature source; its `vl_dim` must match the heads'.
    pub fn with_vl_source(mut self, source: Box<dyn VlFeatureSource>) -> Result<Self, PolicyError> {
        let want = self.heads.config().vl_dim;
        if source.vl_dim() != want {
            return Err(PolicyError::Config {
                field: "vl_dim".into(),
                reason: format!("is {want}, but the VL feature source produces {}", source.vl_dim()),
            });
        }
        self.vl_source = Some(source);
        Ok(self)
    }

    /// The attached VL feature source, if any.
    pub fn vl_source(&self) -> Option<&dyn VlFeatureSource> {
        self.vl_source.as_deref()
    }

    /// Diffusion training loss of a batch (f32 scalar, differentiable).
    pub fn loss(&self, batch: &PolicyBatch, train: bool) -> Result<Tensor, PolicyError> {
        self.heads.loss(&batch.cond(), &batch.actions, &batch.sample_seeds, train)
    }

    /// An action chunk `[B, horizon, action_dim]` in physical units from deterministic DDIM with
    /// `ddim_steps` steps (`None`: the config's default) and initial noise from `seed`.
    pub fn act(&self, obs: &ObservationBatch, ddim_steps: Option<usize>, seed: u64) -> Result<Tensor, PolicyError> {
        let steps = ddim_steps.unwrap_or(self.heads.config().diffusion.default_ddim_steps as usize);
        let computed;
        let vl = match (&obs.vl, &self.vl_source) {
            (Some(v), _) => v,
            (None, Some(src)) => {
                let b = obs.sensor.size().first().copied().unwrap_or(0);
                if obs.vl_inputs.len() as i64 != b {
                    return Err(PolicyError::Input {
                        name: "vl_inputs".into(),
                        reason: format!("{} observations for a sensor batch of {b}", obs.vl_inputs.len()),
                    });
                }
                let _guard = tch::no_grad_guard();
                computed = src.features(&obs.vl_inputs).map_err(PolicyError::VlSource)?;
                &computed
            }
            (None, None) => return Err(PolicyError::NoVlFeatures),
        };
        let cond = CondInput { vl, sensor: &obs.sensor, state: obs.state.as_ref() };
        self.heads.sample(&cond, steps, seed)
    }
}
