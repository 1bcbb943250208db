//! Per-dimension normalization statistics (mean, std, min, max, q01, q99) of the sensor (per
//! channel, pooled over the window's time steps), the state and the action (per action channel,
//! pooled over the horizon steps), computed on the training split only.
//!
//! Mean and standard deviation (population, ddof 0) are exact, accumulated in f64 (Welford).
//! Quantiles interpolate linearly between order statistics (numpy's default) of a uniform
//! reservoir sample of rows: exact while the rows seen fit the reservoir, an unbiased sample
//! estimate beyond it.

use serde::{Deserialize, Serialize};

use super::rng::SplitMix64;

/// Statistics of one field, one entry per dimension.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FieldStats {
    /// Rows (vectors) accumulated.
    pub count: u64,
    /// Mean per dimension.
    pub mean: Vec<f64>,
    /// Population standard deviation per dimension.
    pub std: Vec<f64>,
    /// Minimum per dimension.
    pub min: Vec<f64>,
    /// Maximum per dimension.
    pub max: Vec<f64>,
    /// 1 % quantile per dimension.
    pub q01: Vec<f64>,
    /// 99 % quantile per dimension.
    pub q99: Vec<f64>,
}

/// Statistics unusable for normalization; each names the list and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StatsError {
    /// A per-dimension list has another length than `mean`.
    #[error("`{list}` has {len} values; expected {expected} (as many as `mean`)")]
    Length {
        /// The list (`std`, `min`, ...).
        list: &'static str,
        /// Its length.
        len: usize,
        /// The length of `mean`.
        expected: usize,
    },
    /// A mean or standard deviation is NaN or infinite.
    #[error("`{list}[{index}]` is {value}; expected a finite number")]
    NotFinite {
        /// `mean` or `std`.
        list: &'static str,
        /// The dimension.
        index: usize,
        /// The value found.
        value: f64,
    },
    /// A field's statistics come from no training sample.
    #[error("`{field}` statistics come from no training sample; cannot normalize")]
    Empty {
        /// `sensor`, `state` or `action`.
        field: &'static str,
    },
    /// A field's statistics do not fit the values to normalize.
    #[error("`{field}` statistics have {dims} dimensions; expected {expected} (last axis of {shape:?})")]
    Dims {
        /// `sensor`, `state` or `action`.
        field: &'static str,
        /// Dimensions of the statistics.
        dims: usize,
        /// Last axis of the values.
        expected: usize,
        /// Shape of the values.
        shape: Vec<usize>,
    },
    /// A field's statistics are unusable.
    #[error("{field}: {source}")]
    Field {
        /// `sensor`, `state` or `action`.
        field: &'static str,
        /// What is wrong with it.
        source: Box<StatsError>,
    },
}

/// Smallest standard deviation divided by when normalizing (constant channels map to 0).
pub const MIN_STD: f64 = 1e-6;

impl FieldStats {
    /// Dimensions.
    pub fn dims(&self) -> usize {
        self.mean.len()
    }

    /// Checks that every per-dimension list has `dims()` finite entries; the error names the
    /// list, its length and the expected one.
    pub fn validate(&self) -> Result<(), StatsError> {
        let d = self.dims();
        for (list, v) in
            [("std", &self.std), ("min", &self.min), ("max", &self.max), ("q01", &self.q01), ("q99", &self.q99)]
        {
            if v.len() != d {
                return Err(StatsError::Length { list, len: v.len(), expected: d });
            }
        }
        for (list, v) in [("mean", &self.mean), ("std", &self.std)] {
            if let Some(index) = v.iter().position(|x| !x.is_finite()) {
                return Err(StatsError::NotFinite { list, index, value: v[index] });
            }
        }
        Ok(())
    }

    /// Normalizes `x` in place, `(x - mean) / max(std, MIN_STD)`; `x` holds whole rows of
    /// `dims()` values. Returns false (leaving `x` unchanged) when its length is not a multiple
    /// or `std` does not have `dims()` values.
    pub fn normalize(&self, x: &mut [f32]) -> bool {
        let d = self.dims();
        if d == 0 || x.len() % d != 0 || self.std.len() != d {
            return false;
        }
        for row in x.chunks_mut(d) {
            for (i, v) in row.iter_mut().enumerate() {
                *v = ((*v as f64 - self.mean[i]) / self.std[i].max(MIN_STD)) as f32;
            }
        }
        true
    }
}

/// Statistics of a compiled dataset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetStats {
    /// Per sensor channel.
    pub sensor: FieldStats,
    /// Per state value.
    pub state: FieldStats,
    /// Per action channel.
    pub action: FieldStats,
}

impl DatasetStats {
    /// [`FieldStats::validate`] of every field, the error naming the field.
    pub fn validate(&self) -> Result<(), StatsError> {
        for (field, f) in [("sensor", &self.sensor), ("state", &self.state), ("action", &self.action)] {
            f.validate().map_err(|e| StatsError::Field { field, source: Box::new(e) })?;
        }
        Ok(())
    }
}

/// Streaming accumulator for [`FieldStats`].
#[derive(Debug, Clone)]
pub struct StatsAccumulator {
    dims: usize,
    count: u64,
    mean: Vec<f64>,
    m2: Vec<f64>,
    min: Vec<f64>,
    max: Vec<f64>,
    reservoir: Vec<f32>,
    capacity: usize,
    rng: SplitMix64,
}

/// Reservoir rows kept per field for quantiles by default.
pub const DEFAULT_RESERVOIR_ROWS: usize = 10_000;

impl StatsAccumulator {
    /// An empty accumulator of `dims`-value rows keeping up to `reservoir_rows` rows for
    /// quantiles, sampling with `seed`.
    pub fn new(dims: usize, reservoir_rows: usize, seed: u64) -> Self {
        Self {
            dims,
            count: 0,
            mean: vec![0.0; dims],
            m2: vec![0.0; dims],
            min: vec![f64::INFINITY; dims],
            max: vec![f64::NEG_INFINITY; dims],
            reservoir: Vec::new(),
            capacity: reservoir_rows.max(1),
            rng: SplitMix64::new(seed),
        }
    }

    /// Adds rows (`values.len()` must be a multiple of the dimensions; extra values are ignored).
    pub fn add_rows(&mut self, values: &[f32]) {
        if self.dims == 0 {
            return;
        }
        for row in values.chunks_exact(self.dims) {
            self.count += 1;
            let inv_n = 1.0 / self.count as f64;
            for (i, &v) in row.iter().enumerate() {
                let v = v as f64;
                let d = v - self.mean[i];
                self.mean[i] += d * inv_n;
                self.m2[i] += d * (v - self.mean[i]);
                self.min[i] = self.min[i].min(v);
                self.max[i] = self.max[i].max(v);
            }
            let kept = self.reservoir.len() / self.dims;
            if kept < self.capacity {
                self.reservoir.extend_from_slice(row);
            } else {
                let j = self.rng.below(self.count) as usize;
                if j < self.capacity {
                    self.reservoir[j * self.dims..(j + 1) * self.dims].copy_from_slice(row);
                }
            }
        }
    }

    /// Per quantile of `qs`, one value per dimension, from the reservoir as in
    /// [`StatsAccumulator::finish`] (zeros when no row was added).
    pub fn quantiles(&self, qs: &[f64]) -> Vec<Vec<f64>> {
        let d = self.dims;
        let rows = self.reservoir.len().checked_div(d).unwrap_or(0);
        let mut out = vec![Vec::with_capacity(d); qs.len()];
        let mut col = Vec::with_capacity(rows);
        for i in 0..d {
            col.clear();
            col.extend((0..rows).map(|r| self.reservoir[r * d + i] as f64));
            col.sort_unstable_by(|a, b| a.total_cmp(b));
            for (o, &q) in out.iter_mut().zip(qs) {
                o.push(quantile_sorted(&col, q));
            }
        }
        out
    }

    /// The statistics so far (all vectors empty-valued zeros when no row was added).
    pub fn finish(&self) -> FieldStats {
        let d = self.dims;
        if self.count == 0 {
            let z = vec![0.0; d];
            return FieldStats {
                count: 0,
                mean: z.clone(),
                std: z.clone(),
                min: z.clone(),
                max: z.clone(),
                q01: z.clone(),
                q99: z,
            };
        }
        let [q01, q99]: [Vec<f64>; 2] = self.quantiles(&[0.01, 0.99]).try_into().unwrap_or_default();
        FieldStats {
            count: self.count,
            mean: self.mean.clone(),
            std: self.std(),
            min: self.min.clone(),
            max: self.max.clone(),
            q01,
            q99,
        }
    }

    /// Mean, minimum and maximum per dimension (no sorting; see [`StatsAccumulator::quantiles`]).
    pub fn mean_min_max(&self) -> [&[f64]; 3] {
        [&self.mean, &self.min, &self.max]
    }

    /// Population standard deviation per dimension.
    pub fn std(&self) -> Vec<f64> {
        self.m2.iter().map(|m| (m / self.count.max(1) as f64).max(0.0).sqrt()).collect()
    }
}

/// Quantile `q` of sorted values with linear interpolation (numpy `linear`); 0 for none.
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let pos = q.clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            sorted[lo] + (pos - lo as f64) * (sorted[hi] - sorted[lo])
        }
    }
}
