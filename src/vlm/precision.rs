//! Mixed precision without autocast: frozen weights are stored in bf16, trainable parameters
//! (LoRA, heads) stay fp32 masters, and compute runs in the activations' dtype because every
//! layer casts its weights to its input's dtype ([`Linear::forward_t`](super::linear::Linear),
//! LoRA's `delta`). The casts are differentiable, so bf16 compute sends fp32 gradients to the
//! masters. tch's autocast is not used: it has no dtype argument and means fp16 on CUDA.

use tch::{nn, Kind, Tensor};

use super::linear::VisitLinears;

/// Errors of precision checks.
#[derive(Debug, thiserror::Error)]
pub enum PrecisionError {
    /// A trainable parameter is not an fp32 master.
    #[error("trainable parameter `{name}` is {found:?}, expected an fp32 master (Float)")]
    MasterNotF32 {
        /// The parameter's name.
        name: String,
        /// Its dtype.
        found: Kind,
    },
    /// Unknown precision name.
    #[error("unknown precision `{0}`, expected `f32` or `bf16`")]
    Unknown(String),
}

/// Training/inference precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Everything in fp32 (reference runs, tests).
    F32,
    /// Frozen weights and activations in bf16, trainable masters in fp32.
    #[default]
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = PrecisionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(PrecisionError::Unknown(other.to_string())),
        }
    }
}

impl Precision {
    /// dtype of frozen weights and of the activations.
    pub fn compute_kind(self) -> Kind {
        match self {
            Self::F32 => Kind::Float,
            Self::Bf16 => Kind::BFloat16,
        }
    }

    /// `x` in the compute dtype (a differentiable cast; no copy when it already is).
    pub fn cast_input(self, x: &Tensor) -> Tensor {
        if x.kind() == self.compute_kind() {
            x.shallow_clone()
        } else {
            x.to_kind(self.compute_kind())
        }
    }

    /// Casts the frozen weights of every linear layer of `model` to the compute dtype in place
    /// (see [`cast_frozen`]); trainable tensors and LoRA masters are left alone. Returns the
    /// number of tensors cast.
    pub fn apply_to_linears(self, model: &mut dyn VisitLinears) -> usize {
        let mut n = 0;
        model.visit_linears_mut(&mut |l| {
            n += usize::from(cast_frozen(&mut l.weight, self.compute_kind()));
            if let Some(b) = l.bias.as_mut() {
                n += usize::from(cast_frozen(b, self.compute_kind()));
            }
        });
        n
    }

    /// Casts the frozen floating-point variables of a VarStore (norms, embeddings, frozen heads)
    /// to the compute dtype in place; returns the number cast.
    pub fn apply_to_var_store(self, vs: &nn::VarStore) -> usize {
        vs.variables().into_values().map(|mut t| usize::from(cast_frozen(&mut t, self.compute_kind()))).sum()
    }
}

/// Casts `t` to `kind` in place when it is a frozen (no grad) floating-point tensor of another
/// dtype. The storage is replaced under the same tensor handle (`set_data`), so every alias
/// (VarStore entries, shallow clones) sees the new dtype and the old storage is freed.
/// Returns whether it cast.
pub fn cast_frozen(t: &mut Tensor, kind: Kind) -> bool {
    if t.requires_grad() || !t.is_floating_point() || t.kind() == kind {
        return false;
    }
    let cast = tch::no_grad(|| t.to_kind(kind));
    t.set_data(&cast);
    true
}

/// Checks that every trainable parameter is an fp32 master (the mixed-precision invariant).
pub fn check_fp32_masters(params: &[(String, Tensor)]) -> Result<(), PrecisionError> {
    match params.iter().find(|(_, t)| t.kind() != Kind::Float) {
        Some((name, t)) => Err(PrecisionError::MasterNotF32 { name: name.clone(), found: t.kind() }),
        None => Ok(()),
    }
}
