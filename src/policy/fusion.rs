//! Fusion of the VL feature, the sensor feature and (optionally) the robot state into the
//! denoiser's condition vector.

use tch::{nn, Tensor};

use super::config::{FusionKind, PolicyConfig};
use super::layers::MultiheadAttention;
use crate::vlm::linear::Linear;

/// Unpooled VL tokens for the cross-attention variant.
#[derive(Debug)]
pub struct VlTokens<'a> {
    /// `[B, L, vl_dim]`.
    pub tokens: &'a Tensor,
    /// `[B, L]` bool, true for real tokens (at least one per row).
    pub mask: &'a Tensor,
}

/// The fusion variants (see [`FusionKind`]); parameters live under `action_expert.fusion`.
#[derive(Debug)]
pub enum Fusion {
    /// `fusion = Linear(vl + sensor [+ state] -> d)`.
    Concat(Linear),
    /// `fusion.{vl_proj, sensor_proj, gate[, state_proj]}`.
    Gated {
        /// VL projection to `d`.
        vl_proj: Linear,
        /// Sensor projection to `d`.
        sensor_proj: Linear,
        /// Gate logits from `[vl; sensor]`.
        gate: Linear,
        /// State projection, when the policy takes state.
        state_proj: Option<Linear>,
    },
    /// `fusion.{query, kv_proj, attn, out}`: the sensor feature queries the VL tokens.
    CrossAttention {
        /// Sensor feature -> query `[B, 1, d]`.
        query: Linear,
        /// VL tokens -> keys/values input `[B, L, d]`.
        kv_proj: Linear,
        /// Multi-head attention.
        attn: MultiheadAttention,
        /// `[attended; sensor[; state]] -> d`.
        out: Linear,
    },
}

impl Fusion {
    /// Creates the variant the config names, under `p` (`action_expert / "fusion"`).
    pub fn new(p: nn::Path, cfg: &PolicyConfig) -> Self {
        let d = cfg.expert.d_model;
        let (vl, s, st) = (cfg.vl_dim, cfg.sensor.out_dim, cfg.state_dim);
        match cfg.fusion.kind {
            FusionKind::Concat => Fusion::Concat(Linear::new(p, vl + s + st, d)),
            FusionKind::Gated => Fusion::Gated {
                vl_proj: Linear::new(&p / "vl_proj", vl, d),
                sensor_proj: Linear::new(&p / "sensor_proj", s, d),
                gate: Linear::new(&p / "gate", vl + s, d),
                state_proj: (st > 0).then(|| Linear::new(&p / "state_proj", st, d)),
            },
            FusionKind::CrossAttention => Fusion::CrossAttention {
                query: Linear::new(&p / "query", s, d),
                kv_proj: Linear::new(&p / "kv_proj", vl, d),
                attn: MultiheadAttention::new(&p / "attn", d, cfg.fusion.n_heads, 0.0),
                out: Linear::new(&p / "out", d + s + st, d),
            },
        }
    }

    /// Condition `[B, d]` from `vl [B, vl_dim]` (pooled), `sensor [B, out_dim]`, optional
    /// normalized `state [B, state_dim]` and, for cross-attention, the VL tokens (the caller
    /// checks they are present).
    pub fn forward_t(
        &self,
        vl: &Tensor,
        tokens: Option<&VlTokens>,
        sensor: &Tensor,
        state: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let with_state = |parts: Vec<Tensor>| {
            let mut parts = parts;
            if let Some(s) = state {
                parts.push(s.to_kind(sensor.kind()));
            }
            Tensor::cat(&parts, -1)
        };
        match self {
            Fusion::Concat(l) => {
                l.forward_t(&with_state(vec![vl.to_kind(sensor.kind()), sensor.shallow_clone()]), train)
            }
            Fusion::Gated { vl_proj, sensor_proj, gate, state_proj } => {
                let vl = vl.to_kind(sensor.kind());
                let g = gate.forward_t(&Tensor::cat(&[&vl, sensor], -1), train).sigmoid();
                let mixed = &g * vl_proj.forward_t(&vl, train) + (1.0 - &g) * sensor_proj.forward_t(sensor, train);
                match (state_proj, state) {
                    (Some(p), Some(s)) => mixed + p.forward_t(&s.to_kind(sensor.kind()), train),
                    _ => mixed,
                }
            }
            Fusion::CrossAttention { query, kv_proj, attn, out } => {
                let t = tokens.expect("cross-attention fusion needs VL tokens (checked by the caller)");
                let q = query.forward_t(sensor, train).unsqueeze(1);
                let kv = kv_proj.forward_t(&t.tokens.to_kind(sensor.kind()), train);
                let attended = attn.forward_t(&q, &kv, Some(t.mask), train).squeeze_dim(1);
                out.forward_t(&with_state(vec![attended, sensor.shallow_clone()]), train)
            }
        }
    }
}
