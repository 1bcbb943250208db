//! Building blocks shared by the vision tower and the text decoder: RMSNorm, linear layers made
//! from a [`Loader`], rotate-half and attention over a list of segments.

use tch::{Kind, Tensor};

use super::error::Result;
use super::linear::Linear;
use super::weights::{Init, Loader};

/// Root-mean-square norm computed in f32, scaled by a learned weight (Qwen2's `RMSNorm`).
pub struct RmsNorm {
    /// Module path (without `.weight`).
    pub path: String,
    /// `[hidden]`.
    pub weight: Tensor,
    /// Epsilon added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    /// Loads `path.weight` of width `dim`.
    pub fn new(loader: &mut Loader, path: &str, dim: i64, eps: f64) -> Result<Self> {
        let weight = loader.tensor(&format!("{path}.weight"), &[dim], Init::Ones)?;
        Ok(RmsNorm { path: path.to_string(), weight, eps })
    }

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

/// A [`Linear`] named `path` with weight `[out, in]` (and bias `[out]` when `bias`).
pub fn linear(loader: &mut Loader, path: &str, in_features: i64, out_features: i64, bias: bool) -> Result<Linear> {
    let weight = loader.tensor(&format!("{path}.weight"), &[out_features, in_features], Init::Normal)?;
    let bias = if bias { Some(loader.tensor(&format!("{path}.bias"), &[out_features], Init::Zeros)?) } else { None };
    Ok(Linear { path: path.to_string(), weight, bias, adapter: None })
}

/// `cat(-x2, x1)` over the last dimension's halves.
pub fn rotate_half(x: &Tensor) -> Tensor {
    let d = x.size()[x.dim() - 1];
    let x1 = x.narrow(-1, 0, d / 2);
    let x2 = x.narrow(-1, d / 2, d - d / 2);
    Tensor::cat(&[x2.neg(), x1], -1)
}

/// Appends a linear layer's `weight` (and `bias`) under its module path.
pub fn push_linear(out: &mut Vec<(String, Tensor)>, l: &Linear) {
    out.push((format!("{}.weight", l.path), l.weight.shallow_clone()));
    if let Some(b) = &l.bias {
        out.push((format!("{}.bias", l.path), b.shallow_clone()));
    }
}

/// Appends a norm's `weight` under its module path.
pub fn push_norm(out: &mut Vec<(String, Tensor)>, n: &RmsNorm) {
    out.push((format!("{}.weight", n.path), n.weight.shallow_clone()));
}
