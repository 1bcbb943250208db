//! Drift of cached VL features against fresh ones (computed with the current adapter) on a probe
//! set, and the decision to run a refresh epoch (fixed interval and/or drift threshold).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Errors of drift measurement.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    /// The two feature sets do not have the same `[N, D]` shape.
    #[error("drift: fresh features have shape {fresh:?}, cached have {cached:?} (expected equal [N, D], N >= 1)")]
    Shape { fresh: Vec<i64>, cached: Vec<i64> },
    /// A feature set holds NaN or infinity.
    #[error("drift: {which} features contain NaN or infinity")]
    NonFinite { which: &'static str },
}

/// Drift of a probe set: per-sample relative L2 `||fresh - cached|| / max(||cached||, 1e-12)` and
/// cosine distance `1 - cos(fresh, cached)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DriftStats {
    /// Mean relative L2 over samples.
    pub rel_l2_mean: f64,
    /// Largest relative L2.
    pub rel_l2_max: f64,
    /// Mean cosine distance.
    pub cosine_distance_mean: f64,
    /// Probe samples.
    pub samples: usize,
}

/// Measures drift between `fresh` and `cached` features, both `[N, D]` (any float dtype,
/// computed in f64).
pub fn feature_drift(fresh: &Tensor, cached: &Tensor) -> Result<DriftStats, DriftError> {
    let (fs, cs) = (fresh.size(), cached.size());
    if fs != cs || fs.len() != 2 || fs[0] < 1 {
        return Err(DriftError::Shape { fresh: fs, cached: cs });
    }
    tch::no_grad(|| {
        let f = fresh.to_kind(Kind::Double);
        let c = cached.to_kind(Kind::Double);
        for (which, t) in [("fresh", &f), ("cached", &c)] {
            if t.isfinite().all().int64_value(&[]) == 0 {
                return Err(DriftError::NonFinite { which });
            }
        }
        let norm = |t: &Tensor| t.square().sum_dim_intlist(1, false, Kind::Double).sqrt();
        let (nf, nc) = (norm(&f), norm(&c));
        let rel = norm(&(&f - &c)) / nc.clamp_min(1e-12);
        let dot = (&f * &c).sum_dim_intlist(1, false, Kind::Double);
        let cos = dot / (nf * &nc).clamp_min(1e-12);
        let cos_dist = cos.neg() + 1.0;
        Ok(DriftStats {
            rel_l2_mean: rel.mean(Kind::Double).double_value(&[]),
            rel_l2_max: rel.max().double_value(&[]),
            cosine_distance_mean: cos_dist.mean(Kind::Double).double_value(&[]),
            samples: fs[0] as usize,
        })
    })
}

/// Which drift number the threshold applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftMetric {
    /// [`DriftStats::rel_l2_mean`].
    RelL2Mean,
    /// [`DriftStats::rel_l2_max`].
    RelL2Max,
    /// [`DriftStats::cosine_distance_mean`].
    CosineDistance,
}

impl DriftMetric {
    /// The chosen number of `s`.
    pub fn value(self, s: &DriftStats) -> f64 {
        match self {
            DriftMetric::RelL2Mean => s.rel_l2_mean,
            DriftMetric::RelL2Max => s.rel_l2_max,
            DriftMetric::CosineDistance => s.cosine_distance_mean,
        }
    }
}

/// When `features` mode runs a refresh epoch (live VL with LoRA training, cache rewritten).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshPolicy {
    /// Refresh after this many feature-cached epochs since the last (re)build (reference: 5).
    pub interval_epochs: Option<u64>,
    /// Also refresh when the measured drift reaches this value.
    pub drift_threshold: Option<f64>,
    /// The drift number compared with the threshold.
    pub metric: DriftMetric,
}

/// Why a refresh was decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RefreshReason {
    /// `interval_epochs` cached epochs have run since the cache was built.
    Interval { cached_epochs: u64 },
    /// The drift reached the threshold.
    Drift { value: f64, threshold: f64 },
}

/// The decision for the next epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RefreshDecision {
    /// Run a refresh epoch.
    Refresh(RefreshReason),
    /// Train on the cache.
    UseCache,
}

impl RefreshPolicy {
    /// Decides for the next epoch, given the cached epochs run since the last (re)build and the
    /// drift measured after the last epoch (if any). The interval is checked first.
    pub fn decide(&self, cached_epochs_since_refresh: u64, drift: Option<&DriftStats>) -> RefreshDecision {
        if let Some(n) = self.interval_epochs {
            if cached_epochs_since_refresh >= n {
                return RefreshDecision::Refresh(RefreshReason::Interval {
                    cached_epochs: cached_epochs_since_refresh,
                });
            }
        }
        if let (Some(threshold), Some(d)) = (self.drift_threshold, drift) {
            let value = self.metric.value(d);
            if value >= threshold {
                return RefreshDecision::Refresh(RefreshReason::Drift { value, threshold });
            }
        }
        RefreshDecision::UseCache
    }
}
