//! Untrained, stage-1, Stage 2 and oracle validation errors side by side (the demo's report and
//! the evidence that Stage 2 improves the policy), with the verdict the numbers support.

use serde_json::{json, Value};

use super::action_error::DimError;

/// Stage 2 counts as an improvement when it lowers the error by at least this fraction.
pub const GAIN_THRESHOLD: f64 = 0.2;
/// Stage 1's heads count as not reading their VL features when another sample's change their
/// error by less than this fraction.
pub const VL_USE_THRESHOLD: f64 = 0.05;

/// Each model's validation error: the mean in training-set stds and per dimension.
#[derive(Debug, Clone, Copy)]
pub struct Errors<'a> {
    /// Fresh heads.
    pub untrained: (f64, &'a [DimError]),
    /// The stage-1 checkpoint (Stage 2's start).
    pub stage1: (f64, &'a [DimError]),
    /// Stage 2's last epoch.
    pub stage2: (f64, &'a [DimError]),
    /// The oracle floor.
    pub oracle: (f64, &'a [DimError]),
    /// Stage 1 with each validation sample's VL features taken from another sample
    /// (`HeadsResult::val_action_error_conditioning_swapped`), when measured.
    pub stage1_vl_swapped: Option<f64>,
}

impl Errors<'_> {
    fn rows(&self) -> [(&'static str, (f64, &[DimError])); 4] {
        [("untrained", self.untrained), ("stage1", self.stage1), ("stage2", self.stage2), ("oracle", self.oracle)]
    }

    /// Per dimension: `{name, unit, untrained, stage1, stage2, oracle}` (physical units).
    pub fn per_dim(&self) -> Vec<Value> {
        (0..self.stage1.1.len())
            .map(|k| {
                let d = &self.stage1.1[k];
                let mut v = json!({ "name": d.name, "unit": d.unit });
                for (model, (_, dims)) in self.rows() {
                    v[model] = json!(dims.get(k).map(|d| d.error));
                }
                v
            })
            .collect()
    }

    /// A text table: one row per model, the mean in stds then each dimension in its unit.
    pub fn table(&self) -> String {
        let dims = self.stage1.1;
        let mut out = format!("{:<10} {:>9}", "val error", "mean/std");
        for d in dims {
            let label = if d.unit.is_empty() { d.name.clone() } else { format!("{} {}", d.name, d.unit) };
            out += &format!(" {label:>10}");
        }
        for (model, (mean, per)) in self.rows() {
            out += &format!("\n{model:<10} {mean:>9.3}");
            for d in per {
                out += &format!(" {:>10.3}", d.error);
            }
        }
        out
    }

    /// Whether Stage 2 beat stage 1 by [`GAIN_THRESHOLD`], or stage 1 was already within it of
    /// the oracle floor, or below the oracle (which then is no floor), or none, with the numbers;
    /// then, when measured, whether stage 1's heads read their VL features ([`VL_USE_THRESHOLD`]).
    pub fn verdict(&self) -> String {
        let Some(swapped) = self.stage1_vl_swapped else { return self.gain_verdict() };
        let change = swapped / self.stage1.0 - 1.0;
        let reads = if change.abs() < VL_USE_THRESHOLD { "barely read" } else { "read" };
        format!(
            "{}; stage 1's heads {reads} their VL features (another sample's give {swapped:.3} stds, {:+.1} %)",
            self.gain_verdict(),
            100.0 * change
        )
    }

    fn gain_verdict(&self) -> String {
        let (s1, s2, floor) = (self.stage1.0, self.stage2.0, self.oracle.0);
        let gain = 1.0 - s2 / s1;
        let pct = |v: f64| format!("{:.1} %", 100.0 * v);
        if gain >= GAIN_THRESHOLD {
            format!("Stage 2 lowered the validation action error by {} versus stage 1 ({s1:.3} -> {s2:.3} stds; oracle floor {floor:.3})", pct(gain))
        } else if s1 < floor {
            format!(
                "stage 1 is below the oracle \"floor\" ({s1:.3} vs {floor:.3} stds, {} under it): with this few samples the oracle's heads reached no floor, so this run cannot tell how much Stage 2 could gain (it changed the error by {})",
                pct(1.0 - s1 / floor),
                pct(-gain)
            )
        } else if s1 <= (1.0 + GAIN_THRESHOLD) * floor {
            format!(
                "stage 1 is already within {} of the oracle floor ({s1:.3} vs {floor:.3} stds): little is left for Stage 2 to gain (it changed the error by {})",
                pct(s1 / floor - 1.0),
                pct(-gain)
            )
        } else {
            format!(
                "Stage 2 lowered the validation action error by only {} versus stage 1 ({s1:.3} -> {s2:.3} stds) although stage 1 is {} above the oracle floor ({floor:.3})",
                pct(gain),
                pct(s1 / floor - 1.0)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(e: f64) -> Vec<DimError> {
        vec![DimError { name: "x".into(), unit: "mm".into(), error: e, error_std: Some(e / 2.0) }]
    }

    #[test]
    fn the_verdict_follows_the_thresholds() {
        let (u, a, b, c) = (dims(9.0), dims(2.0), dims(1.0), dims(0.5));
        let e = Errors {
            untrained: (9.0, &u),
            stage1: (2.0, &a),
            stage2: (1.5, &b),
            oracle: (0.5, &c),
            stage1_vl_swapped: None,
        };
        assert!(e.verdict().starts_with("Stage 2 lowered the validation action error by 25.0 %"), "{}", e.verdict());
        let e = Errors { stage2: (1.9, &b), ..e };
        assert!(e.verdict().contains("only 5.0 %") && e.verdict().contains("300.0 % above"), "{}", e.verdict());
        let e = Errors { oracle: (1.8, &c), ..e };
        assert!(e.verdict().starts_with("stage 1 is already within 11.1 % of the oracle floor"), "{}", e.verdict());
        let e2 = Errors { oracle: (2.5, &c), ..e };
        assert!(
            e2.verdict().starts_with("stage 1 is below the oracle \"floor\" (2.000 vs 2.500 stds, 20.0 % under it)"),
            "{}",
            e2.verdict()
        );
        assert!(e2.verdict().ends_with("(it changed the error by -5.0 %)"), "{}", e2.verdict());
        assert_eq!(
            e.per_dim()[0],
            json!({"name": "x", "unit": "mm", "untrained": 9.0, "stage1": 2.0, "stage2": 1.0, "oracle": 0.5})
        );
        assert!(e.table().contains("x mm") && e.table().lines().count() == 5, "{}", e.table());
        let read = Errors { stage1_vl_swapped: Some(2.5), ..e };
        assert_eq!(
            read.verdict(),
            format!(
                "{}; stage 1's heads read their VL features (another sample's give 2.500 stds, +25.0 %)",
                e.verdict()
            )
        );
        let ignored = Errors { stage1_vl_swapped: Some(1.98), ..e };
        assert!(
            ignored
                .verdict()
                .ends_with("stage 1's heads barely read their VL features (another sample's give 1.980 stds, -1.0 %)"),
            "{}",
            ignored.verdict()
        );
    }
}
