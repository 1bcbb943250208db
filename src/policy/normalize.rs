//! Per-dimension normalization statistics for sensor, state and action values.
//!
//! The dataset compiler fills [`FeatureStats`] (mean, std, min, max, 1 % and 99 % quantiles per
//! dimension), the trainer picks a [`NormMode`] per group, and the checkpoint stores both, so
//! inference normalizes exactly as training did. De-normalization is affine and never clamps.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::error::PolicyError;

/// Statistics of one group of values, one entry per dimension (channel).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureStats {
    /// Mean.
    pub mean: Vec<f32>,
    /// Standard deviation (population).
    pub std: Vec<f32>,
    /// Minimum.
    pub min: Vec<f32>,
    /// Maximum.
    pub max: Vec<f32>,
    /// 1 % quantile.
    pub q01: Vec<f32>,
    /// 99 % quantile.
    pub q99: Vec<f32>,
}

impl FeatureStats {
    /// Statistics that make every [`NormMode`] the identity map (mean 0, std 1, range [-1, 1]).
    pub fn identity(dim: usize) -> Self {
        Self {
            mean: vec![0.0; dim],
            std: vec![1.0; dim],
            min: vec![-1.0; dim],
            max: vec![1.0; dim],
            q01: vec![-1.0; dim],
            q99: vec![1.0; dim],
        }
    }

    /// Computes the statistics of row-major samples `values` (`values.len() / dim` rows of `dim`).
    pub fn from_samples(values: &[f32], dim: usize) -> Result<Self, PolicyError> {
        let err = |reason: String| PolicyError::Stats { name: "samples".into(), reason };
        if dim == 0 || values.is_empty() || values.len() % dim != 0 {
            return Err(err(format!("{} values do not form rows of {dim}", values.len())));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(err(format!("value {i} (row {}, dim {}) is not finite", i / dim, i % dim)));
        }
        let rows = values.len() / dim;
        let mut s = Self { mean: vec![], std: vec![], min: vec![], max: vec![], q01: vec![], q99: vec![] };
        let mut col = Vec::with_capacity(rows);
        for d in 0..dim {
            col.clear();
            col.extend(values.iter().skip(d).step_by(dim).map(|&v| v as f64));
            let mean = col.iter().sum::<f64>() / rows as f64;
            let var = col.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / rows as f64;
            col.sort_by(f64::total_cmp);
            s.mean.push(mean as f32);
            s.std.push(var.sqrt() as f32);
            s.min.push(col[0] as f32);
            s.max.push(col[rows - 1] as f32);
            s.q01.push(quantile(&col, 0.01) as f32);
            s.q99.push(quantile(&col, 0.99) as f32);
        }
        Ok(s)
    }

    /// Number of dimensions.
    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// Checks lengths (all `dim`), finiteness and ordering; `name` labels the error.
    pub fn validate(&self, name: &str, dim: usize) -> Result<(), PolicyError> {
        let fields = [
            ("mean", &self.mean),
            ("std", &self.std),
            ("min", &self.min),
            ("max", &self.max),
            ("q01", &self.q01),
            ("q99", &self.q99),
        ];
        for (f, v) in fields {
            let err = |reason: String| PolicyError::Stats { name: format!("{name}.{f}"), reason };
            if v.len() != dim {
                return Err(err(format!("has {} entries, expected {dim}", v.len())));
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(err(format!("entry {i} is not finite")));
            }
        }
        for d in 0..dim {
            let err = |f: &str, reason: String| PolicyError::Stats { name: format!("{name}.{f}"), reason };
            if self.std[d] < 0.0 {
                return Err(err("std", format!("entry {d} is negative ({})", self.std[d])));
            }
            if self.min[d] > self.max[d] {
                return Err(err("min", format!("entry {d}: min {} > max {}", self.min[d], self.max[d])));
            }
            if self.q01[d] > self.q99[d] {
                return Err(err("q01", format!("entry {d}: q01 {} > q99 {}", self.q01[d], self.q99[d])));
            }
        }
        Ok(())
    }
}

/// Linear-interpolated quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// How values are mapped to the network's range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NormMode {
    /// `(x - mean) / std`.
    #[default]
    MeanStd,
    /// `[min, max]` -> `[-1, 1]`.
    MinMax,
    /// `[q01, q99]` -> `[-1, 1]` (robust to outliers; values outside map beyond +-1).
    Quantile,
}

/// Statistics plus the mode that uses them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalizer {
    /// Mapping.
    pub mode: NormMode,
    /// Per-dimension statistics.
    pub stats: FeatureStats,
}

/// A spread below this is treated as a constant dimension: centred, not scaled.
const MIN_SCALE: f32 = 1e-6;

impl Normalizer {
    /// The identity normalizer of `dim` dimensions.
    pub fn identity(dim: usize) -> Self {
        Self { mode: NormMode::MeanStd, stats: FeatureStats::identity(dim) }
    }

    /// Per-dimension `(offset, scale)` with `normalized = (x - offset) / scale`.
    pub fn affine(&self) -> (Vec<f32>, Vec<f32>) {
        let s = &self.stats;
        let (offset, scale): (Vec<f32>, Vec<f32>) = (0..s.dim())
            .map(|d| match self.mode {
                NormMode::MeanStd => (s.mean[d], s.std[d]),
                NormMode::MinMax => ((s.min[d] + s.max[d]) / 2.0, (s.max[d] - s.min[d]) / 2.0),
                NormMode::Quantile => ((s.q01[d] + s.q99[d]) / 2.0, (s.q99[d] - s.q01[d]) / 2.0),
            })
            .unzip();
        let scale = scale.into_iter().map(|v| if v > MIN_SCALE { v } else { 1.0 }).collect();
        (offset, scale)
    }

    /// The affine map as f32 tensors `[dim]` on `device`.
    pub fn affine_tensors(&self, device: Device) -> (Tensor, Tensor) {
        let (o, s) = self.affine();
        (Tensor::from_slice(&o).to_device(device), Tensor::from_slice(&s).to_device(device))
    }
}

/// The normalizers of every group the policy sees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormStats {
    /// Sensor channels (`sensor.in_channels`).
    pub sensor: Normalizer,
    /// Robot state values (`state_dim`), when the policy takes state.
    pub state: Option<Normalizer>,
    /// Action values (`expert.action_dim`), shared across the horizon.
    pub action: Normalizer,
}

impl NormStats {
    /// Identity normalization for the given sizes (`state_dim` 0: no state).
    pub fn identity(sensor_channels: usize, state_dim: usize, action_dim: usize) -> Self {
        Self {
            sensor: Normalizer::identity(sensor_channels),
            state: (state_dim > 0).then(|| Normalizer::identity(state_dim)),
            action: Normalizer::identity(action_dim),
        }
    }

    /// Checks every group against the expected sizes (`state_dim` 0: state must be absent).
    pub fn validate(&self, sensor_channels: usize, state_dim: usize, action_dim: usize) -> Result<(), PolicyError> {
        self.sensor.stats.validate("sensor", sensor_channels)?;
        self.action.stats.validate("action", action_dim)?;
        match (&self.state, state_dim) {
            (None, 0) => Ok(()),
            (Some(s), d) if d > 0 => s.stats.validate("state", d),
            (Some(_), _) => Err(PolicyError::Stats {
                name: "state".into(),
                reason: "present but the config has state_dim 0".into(),
            }),
            (None, d) => Err(PolicyError::Stats {
                name: "state".into(),
                reason: format!("missing, the config has state_dim {d}"),
            }),
        }
    }
}

/// Normalizes the last dimension of `x` with precomputed `(offset, scale)` (f32 result).
pub fn apply(x: &Tensor, affine: &(Tensor, Tensor)) -> Tensor {
    (x.to_kind(Kind::Float) - &affine.0) / &affine.1
}

/// Inverse of [`apply`]: `x * scale + offset`, unclamped.
pub fn invert(x: &Tensor, affine: &(Tensor, Tensor)) -> Tensor {
    x.to_kind(Kind::Float) * &affine.1 + &affine.0
}

impl From<&crate::dataset::stats::FieldStats> for FeatureStats {
    /// The compiled dataset's statistics (f64) as the policy's (f32).
    fn from(s: &crate::dataset::stats::FieldStats) -> Self {
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect();
        Self { mean: f(&s.mean), std: f(&s.std), min: f(&s.min), max: f(&s.max), q01: f(&s.q01), q99: f(&s.q99) }
    }
}

impl NormStats {
    /// Mean/std normalization from a compiled dataset's training-split statistics
    /// (`state_dim` 0: the policy takes no state).
    pub fn from_dataset(stats: &crate::dataset::stats::DatasetStats, state_dim: usize) -> Self {
        let n = |s: &crate::dataset::stats::FieldStats| Normalizer { mode: NormMode::MeanStd, stats: s.into() };
        Self { sensor: n(&stats.sensor), state: (state_dim > 0).then(|| n(&stats.state)), action: n(&stats.action) }
    }
}
