//! Building blocks shared by the vision tower and the text decoder: RMSNorm (made by
//! [`super::params::Scope::norm`]) and rotate-half.

use tch::{Kind, Tensor};

/// Root-mean-square norm computed in f32, scaled by a learned weight (Qwen2's `RMSNorm`).
pub struct RmsNorm {
    /// `[hidden]`.
    pub weight: Tensor,
    /// Epsilon added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    /// `weight * (x / sqrt(mean(x^2) + eps))`, the normalization in f32, the result in `x`'s dtype
    /// times the weight (as transformers does).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = (xf * (var + self.eps).rsqrt()).to_kind(kind);
        let w = if self.weight.kind() == kind { self.weight.shallow_clone() } else { self.weight.to_kind(kind) };
        w * normed
    }
}

/// `cat(-x2, x1)` over the last dimension's halves.
pub fn rotate_half(x: &Tensor) -> Tensor {
    let d = x.size()[x.dim() - 1];
    let x1 = x.narrow(-1, 0, d / 2);
    let x2 = x.narrow(-1, d / 2, d - d / 2);
    Tensor::cat(&[x2.neg(), x1], -1)
}
