//! One benchmark case: its parameters ([`CaseSpec`]), the inputs it runs on, and the measured
//! [`Record`].

use serde::{Deserialize, Serialize};

use super::shapes::ModelSize;

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CaseKind {
    /// One Stage 2 training step: VL forward (LoRA on the LLM's q/k/v/o) -> pooled features ->
    /// policy heads diffusion loss -> backward -> AdamW step.
    Step,
    /// Building the vision cache: images through the vision tower (no gradient).
    VisionCache,
    /// Policy `act()`: heads DDIM sampling from pooled features and a sensor window.
    Act,
}

impl CaseKind {
    /// Name as in the JSON records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Step => "step",
            Self::VisionCache => "vision_cache",
            Self::Act => "act",
        }
    }

    /// Unit of `samples_per_s` for this kind.
    pub fn unit(self) -> &'static str {
        match self {
            Self::Step => "samples/s",
            Self::VisionCache => "images/s",
            Self::Act => "chunks/s",
        }
    }
}

/// What the Stage 2 step recomputes each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum StepCache {
    /// Full VL forward each step (vision tower + LLM with LoRA).
    #[serde(rename = "off")]
    #[value(name = "off")]
    Off,
    /// Vision embeddings precomputed; the LLM with LoRA runs each step.
    #[serde(rename = "vision")]
    #[value(name = "vision")]
    Vision,
    /// Pooled VL features precomputed; heads-only step.
    #[serde(rename = "features")]
    #[value(name = "features")]
    Features,
    /// The periodic refresh step of the features cache: the same work as `off`.
    #[serde(rename = "features-refresh")]
    #[value(name = "features-refresh")]
    FeaturesRefresh,
}

impl StepCache {
    /// Name as on the command line and in the JSON records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Vision => "vision",
            Self::Features => "features",
            Self::FeaturesRefresh => "features-refresh",
        }
    }
}

/// Compute precision of the frozen weights and activations (trainable masters stay fp32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BenchPrecision {
    /// Everything fp32.
    F32,
    /// bf16 weights and activations, fp32 masters.
    Bf16,
}

impl BenchPrecision {
    /// The library's precision setting.
    pub fn precision(self) -> crate::vlm::precision::Precision {
        match self {
            Self::F32 => crate::vlm::precision::Precision::F32,
            Self::Bf16 => crate::vlm::precision::Precision::Bf16,
        }
    }
}

/// Every parameter of one case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseSpec {
    /// What is measured.
    pub kind: CaseKind,
    /// Backbone shapes.
    pub model: ModelSize,
    /// A Hugging Face model directory to load instead of random weights (its config must match
    /// `model`'s); `None` for random init.
    pub model_dir: Option<String>,
    /// Camera views per sample.
    pub views: usize,
    /// Side of the square synthetic frames, pixels (resized to a multiple of 28).
    pub image_size: u32,
    /// Samples per step.
    pub batch: usize,
    /// LoRA rank.
    pub lora_rank: i64,
    /// Cache mode (step only; `None` for the other kinds).
    pub cache: Option<StepCache>,
    /// Gradient checkpointing of every decoder layer (step only).
    pub checkpointing: bool,
    /// Precision.
    pub precision: BenchPrecision,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Timed iterations (the median is reported).
    pub steps: usize,
    /// Untimed iterations first.
    pub warmup: usize,
    /// DDIM steps of `act`.
    pub ddim_steps: usize,
}

/// One measured case: its parameters and results, the schema shared with
/// scripts/reference_bench.py.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// `ours` or `reference`.
    #[serde(rename = "impl")]
    pub implementation: String,
    /// The case's parameters.
    #[serde(flatten)]
    pub spec: CaseSpec,
    /// Throughput in [`CaseKind::unit`]: batch (or images) over the median iteration time.
    pub samples_per_s: f64,
    /// Unit of `samples_per_s`.
    pub unit: String,
    /// Median iteration time, milliseconds.
    pub step_ms: f64,
    /// Accelerator allocator peak over the whole case (weights included), bytes; `None` on CPU.
    pub peak_accel_bytes: Option<u64>,
    /// Host resident-set peak of the process running the case, bytes.
    pub peak_host_bytes: Option<u64>,
    /// Tokens per sample through the LLM (0 when the LLM does not run).
    pub tokens_per_sample: i64,
    /// Trainable scalars updated by the step (LoRA + heads; heads only for `features`).
    pub trainable_params: i64,
    /// Of which LoRA scalars.
    pub lora_params: i64,
    /// Of which policy-heads scalars.
    pub heads_params: i64,
    /// Loss of the last timed step (step only).
    pub loss: Option<f64>,
}

/// The median of `values` (NaN when empty).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
