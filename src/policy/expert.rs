//! Diffusion action expert: the denoiser `eps(x_t, t, cond)` over an action chunk.

use tch::{nn, Kind, Tensor};

use super::config::PolicyConfig;
use super::fusion::Fusion;
use super::layers::Encoder;
use crate::vlm::linear::Linear;

/// Sinusoidal embedding of (possibly fractional) timesteps `t [B]` -> `[B, dim]` (f32):
/// `[sin(t f_i), cos(t f_i)]` with `f_i = exp(-ln(10000) i / (dim/2 - 1))`.
pub fn timestep_embedding(t: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let scale = -(10000f64.ln()) / ((half - 1).max(1) as f64);
    let freqs = (Tensor::arange(half, (Kind::Float, t.device())) * scale).exp();
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    Tensor::cat(&[args.sin(), args.cos()], 1)
}

/// Names under `action_expert`: `fusion*`, `time_mlp.1` / `time_mlp.3` (Linear, GELU, Linear
/// after the sinusoidal embedding), `action_embed`, `pos_embed [horizon, d_model]` (absent in
/// the reference), `transformer.layers.*`, `output`.
#[derive(Debug)]
pub struct ActionExpert {
    /// Condition from VL + sensor (+ state).
    pub fusion: Fusion,
    time_mlp: (Linear, Linear),
    action_embed: Linear,
    pos_embed: Tensor,
    transformer: Encoder,
    output: Linear,
    d_model: i64,
}

impl ActionExpert {
    /// Creates the parameters under `p` (e.g. `root / "action_expert"`).
    pub fn new(p: nn::Path, cfg: &PolicyConfig) -> Self {
        let e = &cfg.expert;
        let tp = &p / "time_mlp";
        Self {
            fusion: Fusion::new(&p / "fusion", cfg),
            time_mlp: (Linear::new(&tp / 1, e.d_model, e.d_model), Linear::new(&tp / 3, e.d_model, e.d_model)),
            action_embed: Linear::new(&p / "action_embed", e.action_dim, e.d_model),
            pos_embed: p.randn("pos_embed", &[e.horizon, e.d_model], 0.0, 0.02),
            transformer: Encoder::new(&p / "transformer", e.n_layers, e.d_model, e.n_heads, e.ff_dim, e.dropout),
            output: Linear::new(&p / "output", e.d_model, e.action_dim),
            d_model: e.d_model,
        }
    }

    /// Predicted noise `[B, H, A]` for normalized noisy actions `x_t [B, H, A]`, timesteps
    /// `t [B]` and condition `cond [B, d_model]`. Computes in `cond`'s dtype, returns f32.
    pub fn forward_t(&self, x_t: &Tensor, t: &Tensor, cond: &Tensor, train: bool) -> Tensor {
        let k = cond.kind();
        let temb = timestep_embedding(t, self.d_model).to_kind(k);
        let temb = self.time_mlp.1.forward_t(&self.time_mlp.0.forward_t(&temb, train).gelu("none"), train);
        let h = self.action_embed.forward_t(&x_t.to_kind(k), train)
            + self.pos_embed.to_kind(k).unsqueeze(0)
            + temb.unsqueeze(1)
            + cond.unsqueeze(1);
        self.output.forward_t(&self.transformer.forward_t(&h, train), train).to_kind(Kind::Float)
    }
}
