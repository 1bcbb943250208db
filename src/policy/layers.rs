//! Building blocks with PyTorch's parameter names and initialization. Every forward computes in
//! the input's dtype (weights are cast on use, so fp32 masters serve bf16 compute); norms compute
//! in f32.

use tch::{nn, Kind, Tensor};

use super::sync_bn::SyncBatchNorm;
use crate::vlm::linear::Linear;

/// Casts `w` to `kind` when it differs (cheap shallow clone otherwise).
fn cast(w: &Tensor, kind: Kind) -> Tensor {
    if w.kind() == kind {
        w.shallow_clone()
    } else {
        w.to_kind(kind)
    }
}

/// `torch.nn.LayerNorm` over the last dimension (eps 1e-5).
#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    dim: i64,
}

impl LayerNorm {
    /// Creates `weight` (ones) and `bias` (zeros) under `p`.
    pub fn new(p: nn::Path, dim: i64) -> Self {
        Self { weight: p.ones("weight", &[dim]), bias: p.zeros("bias", &[dim]), dim }
    }

    /// Normalizes in f32, returns `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        x.to_kind(Kind::Float).layer_norm([self.dim], Some(&self.weight), Some(&self.bias), 1e-5, true).to_kind(k)
    }
}

/// `torch.nn.Conv1d(in, out, 3, stride=2, padding=1)`: `weight [out, in, 3]`, `bias [out]`.
#[derive(Debug)]
pub struct Conv1dS2 {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1dS2 {
    /// Creates the kernel under `p`, uniform in +-1/sqrt(in * 3) like PyTorch.
    pub fn new(p: nn::Path, inp: i64, out: i64) -> Self {
        let b = 1.0 / ((inp * 3) as f64).sqrt();
        let init = nn::Init::Uniform { lo: -b, up: b };
        Self { weight: p.var("weight", &[out, inp, 3], init), bias: p.var("bias", &[out], init) }
    }

    /// `x [B, C_in, L]` -> `[B, C_out, (L - 1) / 2 + 1]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        x.conv1d(&cast(&self.weight, k), Some(cast(&self.bias, k)), [2], [1], [1], 1)
    }
}

/// `torch.nn.BatchNorm1d` (momentum 0.1, eps 1e-5) with running statistics as non-trainable
/// variables `running_mean` / `running_var`.
#[derive(Debug)]
pub struct BatchNorm1d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

impl BatchNorm1d {
    /// Creates the affine parameters and running statistics under `p`.
    pub fn new(p: nn::Path, c: i64) -> Self {
        Self {
            weight: p.ones("weight", &[c]),
            bias: p.zeros("bias", &[c]),
            running_mean: p.zeros_no_train("running_mean", &[c]),
            running_var: p.ones_no_train("running_var", &[c]),
        }
    }

    /// `x [B, C, L]`; batch statistics (and running-stat update) when `train`, running
    /// statistics otherwise. Computes in f32.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let k = x.kind();
        x.to_kind(Kind::Float)
            .batch_norm(
                Some(&self.weight),
                Some(&self.bias),
                Some(&self.running_mean),
                Some(&self.running_var),
                train,
                0.1,
                1e-5,
                true,
            )
            .to_kind(k)
    }

    /// The running mean and variance (shallow clones).
    pub fn running(&self) -> (Tensor, Tensor) {
        (self.running_mean.shallow_clone(), self.running_var.shallow_clone())
    }

    /// Training-mode `x [B, C, L]` with the statistics of every rank's batch ([`SyncBatchNorm`]).
    pub fn forward_synced(&self, x: &Tensor, sync: &SyncBatchNorm) -> Tensor {
        let k = x.kind();
        sync.forward(&x.to_kind(Kind::Float), &self.weight, &self.bias, (&self.running_mean, &self.running_var), 1e-5)
            .to_kind(k)
    }
}

/// `torch.nn.MultiheadAttention(batch_first=True)`: packed `in_proj_weight [3D, D]`,
/// `in_proj_bias [3D]`, `out_proj.{weight,bias}`.
#[derive(Debug)]
pub struct MultiheadAttention {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Linear,
    n_heads: i64,
    dropout: f64,
}

impl MultiheadAttention {
    /// Creates the projections under `p` (xavier-uniform input projection, zero biases).
    pub fn new(p: nn::Path, d: i64, n_heads: i64, dropout: f64) -> Self {
        let b = (6.0 / (4 * d) as f64).sqrt();
        let op = &p / "out_proj";
        let wb = 1.0 / (d as f64).sqrt();
        let out_proj = Linear::in_path(
            &op,
            op.var("weight", &[d, d], nn::Init::Uniform { lo: -wb, up: wb }),
            Some(op.zeros("bias", &[d])),
        );
        Self {
            in_proj_weight: p.var("in_proj_weight", &[3 * d, d], nn::Init::Uniform { lo: -b, up: b }),
            in_proj_bias: p.zeros("in_proj_bias", &[3 * d]),
            out_proj,
            n_heads,
            dropout,
        }
    }

    /// Attention of `q [B, Lq, D]` over `kv [B, Lk, D]`; `key_mask [B, Lk]` (bool, true = attend)
    /// masks padding. Returns `[B, Lq, D]`.
    pub fn forward_t(&self, q: &Tensor, kv: &Tensor, key_mask: Option<&Tensor>, train: bool) -> Tensor {
        let k = q.kind();
        let (b, lq, d) = q.size3().expect("attention query must be [B, L, D]");
        let lk = kv.size()[1];
        let w = cast(&self.in_proj_weight, k).chunk(3, 0);
        let bias = cast(&self.in_proj_bias, k).chunk(3, 0);
        let hd = d / self.n_heads;
        let heads = |x: Tensor, l: i64| x.view([b, l, self.n_heads, hd]).transpose(1, 2);
        let qh = heads(q.linear(&w[0], Some(&bias[0])), lq);
        let kh = heads(kv.linear(&w[1], Some(&bias[1])), lk);
        let vh = heads(kv.linear(&w[2], Some(&bias[2])), lk);
        let mask = key_mask.map(|m| m.view([b, 1, 1, lk]));
        let p = if train { self.dropout } else { 0.0 };
        let o = Tensor::scaled_dot_product_attention(&qh, &kh, &vh, mask, p, false, None, false);
        self.out_proj.forward_t(&o.transpose(1, 2).reshape([b, lq, d]), train)
    }
}

/// `torch.nn.TransformerEncoderLayer(batch_first=True)` with its defaults: post-norm, ReLU,
/// dropout after attention, inside and after the feed-forward block.
#[derive(Debug)]
pub struct EncoderLayer {
    self_attn: MultiheadAttention,
    linear1: Linear,
    linear2: Linear,
    norm1: LayerNorm,
    norm2: LayerNorm,
    dropout: f64,
}

impl EncoderLayer {
    /// Creates the layer under `p` with PyTorch's module names.
    pub fn new(p: nn::Path, d: i64, n_heads: i64, ff: i64, dropout: f64) -> Self {
        Self {
            self_attn: MultiheadAttention::new(&p / "self_attn", d, n_heads, dropout),
            linear1: Linear::new(&p / "linear1", d, ff),
            linear2: Linear::new(&p / "linear2", ff, d),
            norm1: LayerNorm::new(&p / "norm1", d),
            norm2: LayerNorm::new(&p / "norm2", d),
            dropout,
        }
    }

    /// `x [B, L, D]` -> `[B, L, D]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let a = self.self_attn.forward_t(x, x, None, train).dropout(self.dropout, train);
        let x = self.norm1.forward(&(x + a));
        let h = self.linear1.forward_t(&x, train).relu().dropout(self.dropout, train);
        let f = self.linear2.forward_t(&h, train).dropout(self.dropout, train);
        self.norm2.forward(&(x + f))
    }
}

/// `torch.nn.TransformerEncoder`: `layers.{i}` of [`EncoderLayer`].
#[derive(Debug)]
pub struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    /// Creates `n` layers under `p / "layers"`.
    pub fn new(p: nn::Path, n: i64, d: i64, n_heads: i64, ff: i64, dropout: f64) -> Self {
        let lp = &p / "layers";
        Self { layers: (0..n).map(|i| EncoderLayer::new(&lp / i, d, n_heads, ff, dropout)).collect() }
    }

    /// Runs every layer.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.layers.iter().fold(x.shallow_clone(), |h, l| l.forward_t(&h, train))
    }
}
