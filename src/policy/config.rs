//! Configuration of the policy heads, with the reference pipeline's sizes as defaults.
//!
//! Every struct deserializes from partial JSON/YAML (missing fields take the defaults) and is
//! saved with each checkpoint, so a loader can check that weights and config agree.

use serde::{Deserialize, Serialize};

use super::error::PolicyError;

/// Sensor encoder: Conv1d stack (k3, s2, BatchNorm, GELU) -> transformer encoder with learned
/// positional embedding -> mean pool -> MLP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SensorEncoderConfig {
    /// Samples per window (reference: 650, or 65 for the fast variant). Other lengths are
    /// resampled to this.
    pub window: i64,
    /// Channels per sample (reference: 1026 = force + 1025-value A-scan).
    pub in_channels: i64,
    /// Output channels of each conv layer; the last must equal `d_model`.
    pub conv_channels: Vec<i64>,
    /// Transformer width.
    pub d_model: i64,
    /// Attention heads.
    pub n_heads: i64,
    /// Transformer encoder layers.
    pub n_layers: i64,
    /// Feed-forward width inside the transformer.
    pub ff_dim: i64,
    /// Output feature size (after the MLP).
    pub out_dim: i64,
    /// Dropout in the transformer (training only).
    pub dropout: f64,
}

impl Default for SensorEncoderConfig {
    fn default() -> Self {
        Self {
            window: 650,
            in_channels: 1026,
            conv_channels: vec![512, 1024, 1024, 1024],
            d_model: 1024,
            n_heads: 8,
            n_layers: 2,
            ff_dim: 4096,
            out_dim: 3072,
            dropout: 0.1,
        }
    }
}

impl SensorEncoderConfig {
    /// Sequence length after the conv stack (each layer: k3, s2, padding 1).
    pub fn tokens(&self) -> i64 {
        self.conv_channels.iter().fold(self.window, |l, _| (l - 1) / 2 + 1)
    }
}

/// How the VL feature and the sensor feature (and the robot state, if used) become the
/// denoiser's condition vector of size `ActionExpertConfig::d_model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FusionKind {
    /// `Linear(concat(vl, sensor[, state]))` (the reference's default).
    #[default]
    Concat,
    /// Per-feature projections mixed by a learned sigmoid gate:
    /// `g * P_vl(vl) + (1 - g) * P_s(sensor) [+ P_state(state)]`, `g = sigmoid(W [vl; sensor])`.
    Gated,
    /// The sensor feature queries the unpooled VL tokens (multi-head attention with a padding
    /// mask); `Linear(concat(attended, sensor[, state]))`. Needs VL tokens in the input.
    CrossAttention,
}

/// Fusion settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FusionConfig {
    /// Variant.
    pub kind: FusionKind,
    /// Attention heads of the cross-attention variant.
    pub n_heads: i64,
}

impl Default for FusionConfig {
    fn default() -> Self {
        Self { kind: FusionKind::Concat, n_heads: 8 }
    }
}

/// Diffusion action expert (denoiser): sum of action embedding, horizon positional embedding,
/// sinusoidal-timestep MLP and condition, through a transformer encoder, to epsilon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActionExpertConfig {
    /// Steps in an action chunk (reference: 8).
    pub horizon: i64,
    /// Values per action (reference: 7).
    pub action_dim: i64,
    /// Transformer width (also the condition size).
    pub d_model: i64,
    /// Attention heads.
    pub n_heads: i64,
    /// Transformer encoder layers.
    pub n_layers: i64,
    /// Feed-forward width.
    pub ff_dim: i64,
    /// Dropout in the transformer (training only).
    pub dropout: f64,
}

impl Default for ActionExpertConfig {
    fn default() -> Self {
        Self { horizon: 8, action_dim: 7, d_model: 1024, n_heads: 8, n_layers: 4, ff_dim: 4096, dropout: 0.1 }
    }
}

/// DDPM noise schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiffusionConfig {
    /// Training timesteps T (reference: 100).
    pub train_steps: i64,
    /// Offset `s` of the cosine schedule (Nichol & Dhariwal: 0.008).
    pub cosine_s: f64,
    /// Upper bound on each beta (0.999 as usual for the cosine schedule).
    pub max_beta: f64,
    /// DDIM steps `act()` uses when the caller does not say (reference: 10).
    pub default_ddim_steps: i64,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self { train_steps: 100, cosine_s: 0.008, max_beta: 0.999, default_ddim_steps: 10 }
    }
}

/// The whole heads configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Size of the (pooled) VL feature (Qwen2.5-VL-3B hidden size: 2048).
    pub vl_dim: i64,
    /// Robot state values fed to the fusion (0: no state input, as in the reference).
    pub state_dim: i64,
    /// Sensor encoder.
    pub sensor: SensorEncoderConfig,
    /// Fusion.
    pub fusion: FusionConfig,
    /// Denoiser.
    pub expert: ActionExpertConfig,
    /// Noise schedule.
    pub diffusion: DiffusionConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            vl_dim: 2048,
            state_dim: 0,
            sensor: SensorEncoderConfig::default(),
            fusion: FusionConfig::default(),
            expert: ActionExpertConfig::default(),
            diffusion: DiffusionConfig::default(),
        }
    }
}

impl PolicyConfig {
    /// Checks that the sizes fit together; the error names the offending field.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |field: &str, why: String| Err(PolicyError::Config { field: field.into(), reason: why });
        let s = &self.sensor;
        let e = &self.expert;
        let positive = [
            ("vl_dim", self.vl_dim),
            ("sensor.window", s.window),
            ("sensor.in_channels", s.in_channels),
            ("sensor.d_model", s.d_model),
            ("sensor.n_heads", s.n_heads),
            ("sensor.n_layers", s.n_layers),
            ("sensor.ff_dim", s.ff_dim),
            ("sensor.out_dim", s.out_dim),
            ("expert.horizon", e.horizon),
            ("expert.action_dim", e.action_dim),
            ("expert.d_model", e.d_model),
            ("expert.n_heads", e.n_heads),
            ("expert.n_layers", e.n_layers),
            ("expert.ff_dim", e.ff_dim),
            ("diffusion.train_steps", self.diffusion.train_steps),
            ("diffusion.default_ddim_steps", self.diffusion.default_ddim_steps),
        ];
        for (name, v) in positive {
            if v <= 0 {
                return bad(name, format!("must be positive, got {v}"));
            }
        }
        if self.state_dim < 0 {
            return bad("state_dim", format!("must be >= 0, got {}", self.state_dim));
        }
        if s.conv_channels.is_empty() || s.conv_channels.iter().any(|&c| c <= 0) {
            return bad("sensor.conv_channels", format!("need one or more positive sizes, got {:?}", s.conv_channels));
        }
        if s.conv_channels.last() != Some(&s.d_model) {
            return bad("sensor.conv_channels", format!("last entry must equal sensor.d_model {}", s.d_model));
        }
        if s.d_model % s.n_heads != 0 {
            return bad("sensor.n_heads", format!("{} does not divide sensor.d_model {}", s.n_heads, s.d_model));
        }
        if e.d_model % e.n_heads != 0 {
            return bad("expert.n_heads", format!("{} does not divide expert.d_model {}", e.n_heads, e.d_model));
        }
        if e.d_model % 2 != 0 {
            return bad("expert.d_model", format!("must be even (sinusoidal embedding), got {}", e.d_model));
        }
        if self.fusion.kind == FusionKind::CrossAttention
            && (self.fusion.n_heads <= 0 || e.d_model % self.fusion.n_heads != 0)
        {
            return bad("fusion.n_heads", format!("{} must divide expert.d_model {}", self.fusion.n_heads, e.d_model));
        }
        for (name, p) in [("sensor.dropout", s.dropout), ("expert.dropout", e.dropout)] {
            if !(0.0..1.0).contains(&p) {
                return bad(name, format!("must be in [0, 1), got {p}"));
            }
        }
        let d = &self.diffusion;
        if !(d.cosine_s > 0.0 && d.cosine_s.is_finite()) {
            return bad("diffusion.cosine_s", format!("must be positive, got {}", d.cosine_s));
        }
        if !(d.max_beta > 0.0 && d.max_beta < 1.0) {
            return bad("diffusion.max_beta", format!("must be in (0, 1), got {}", d.max_beta));
        }
        Ok(())
    }
}
