//! The validation action error as users read it: one number, the mean over action dimensions of
//! the mean absolute error in units of each dimension's training-set standard deviation
//! (constant channels, such as padding, left out), beside the error of each dimension in its
//! physical unit under its name (`x (mm)`, `yaw (deg)`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::dataset::reader::Dataset;

/// The metric that selects the best checkpoint: the mean error in training-set stds.
pub const BEST_METRIC: &str = "val_action_error";
/// Prefix of the per-dimension metrics (physical units): `val_action_error/<label>`.
const PER_DIM_PREFIX: &str = "val_action_error/";
/// A dimension whose training-set std is below this is constant and left out of the mean.
const CONSTANT_STD: f64 = 1e-6;

/// The action dimensions of a dataset: names, units and training-set stds.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionAxes {
    names: Vec<String>,
    units: Vec<String>,
    std: Vec<f64>,
}

/// One dimension's error in a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DimError {
    /// Dimension name (`x`, `yaw`, `pad6`, or `dim<k>` when the dataset names none).
    pub name: String,
    /// Physical unit (`""` when unknown).
    pub unit: String,
    /// Mean absolute error, physical unit.
    pub error: f64,
    /// The same in training-set stds (None for a constant channel).
    pub error_std: Option<f64>,
}

impl ActionAxes {
    /// The axes of `ds`: its action names and units (`dim<k>` / `""` when it has none) and the
    /// training split's per-dimension std from its stats.
    pub fn from_dataset(ds: &Dataset) -> Self {
        let n = ds.index.action_shape[1];
        Self::new(&ds.index.action_names, &ds.index.action_units, &ds.stats.action.std, n)
    }

    /// Axes of `n` dimensions; missing names become `dim<k>`, missing units `""`, missing stds 0.
    pub fn new(names: &[String], units: &[String], std: &[f64], n: usize) -> Self {
        ActionAxes {
            names: (0..n).map(|k| names.get(k).cloned().unwrap_or_else(|| format!("dim{k}"))).collect(),
            units: (0..n).map(|k| units.get(k).cloned().unwrap_or_default()).collect(),
            std: (0..n).map(|k| std.get(k).copied().unwrap_or(0.0)).collect(),
        }
    }

    /// Label of dimension `k`: `name (unit)`, or the name when the unit is unknown.
    pub fn label(&self, k: usize) -> String {
        match self.units[k].as_str() {
            "" => self.names[k].clone(),
            u => format!("{} ({u})", self.names[k]),
        }
    }

    /// Whether dimension `k` varies in the training set (counts in the mean).
    pub fn varies(&self, k: usize) -> bool {
        self.std[k] >= CONSTANT_STD
    }

    /// Mean over the varying dimensions of `err[k] / std[k]` (0 when none varies).
    pub fn normalized(&self, err: &[f64]) -> f64 {
        let v: Vec<f64> =
            (0..self.std.len().min(err.len())).filter(|&k| self.varies(k)).map(|k| err[k] / self.std[k]).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }

    /// Validation metrics of per-dimension errors `err` (physical units): [`BEST_METRIC`] (the
    /// normalized mean) and `val_action_error/<label>` per dimension.
    pub fn metrics(&self, err: &[f64]) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::from([(BEST_METRIC.to_string(), self.normalized(err))]);
        for (k, e) in err.iter().enumerate().take(self.names.len()) {
            m.insert(format!("{PER_DIM_PREFIX}{}", self.label(k)), *e);
        }
        m
    }

    /// The per-dimension errors of `metrics` (from [`Self::metrics`]) in dimension order; empty
    /// when it holds none.
    pub fn per_dim(&self, metrics: &BTreeMap<String, f64>) -> Vec<f64> {
        let v: Option<Vec<f64>> = (0..self.names.len())
            .map(|k| metrics.get(&format!("{PER_DIM_PREFIX}{}", self.label(k))).copied())
            .collect();
        v.unwrap_or_default()
    }

    /// Named per-dimension errors for a report.
    pub fn report(&self, err: &[f64]) -> Vec<DimError> {
        err.iter()
            .enumerate()
            .take(self.names.len())
            .map(|(k, &e)| DimError {
                name: self.names[k].clone(),
                unit: self.units[k].clone(),
                error: e,
                error_std: self.varies(k).then(|| e / self.std[k]),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mean_is_in_stds_over_the_varying_dimensions_and_each_dimension_keeps_its_unit() {
        let names: Vec<String> = ["x", "yaw", "pad2"].map(String::from).to_vec();
        let units: Vec<String> = ["mm", "deg", ""].map(String::from).to_vec();
        let axes = ActionAxes::new(&names, &units, &[2.0, 10.0, 0.0], 3);
        let err = [1.0, 5.0, 0.3];
        // (1/2 + 5/10) / 2; the constant pad channel is left out.
        assert_eq!(axes.normalized(&err), 0.5);
        let m = axes.metrics(&err);
        assert_eq!(m[BEST_METRIC], 0.5);
        assert_eq!(m["val_action_error/x (mm)"], 1.0);
        assert_eq!(m["val_action_error/yaw (deg)"], 5.0);
        assert_eq!(m["val_action_error/pad2"], 0.3);
        assert_eq!(axes.per_dim(&m), err.to_vec());
        let r = axes.report(&err);
        assert_eq!((r[1].name.as_str(), r[1].unit.as_str(), r[1].error_std), ("yaw", "deg", Some(0.5)));
        assert_eq!(r[2].error_std, None);
        // A dataset without names.
        assert_eq!(ActionAxes::new(&[], &[], &[1.0], 2).label(1), "dim1");
    }
}
