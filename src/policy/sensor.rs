//! Sensor encoder: windows of `T x C` samples (force + A-scan) -> one feature vector.

use tch::{nn, Kind, Tensor};

use super::config::SensorEncoderConfig;
use super::layers::{BatchNorm1d, Conv1dS2, Encoder};
use super::sync_bn::SyncBatchNorm;
use crate::vlm::linear::Linear;

/// The statistics the BatchNorm layers normalise with.
#[derive(Clone, Copy, Debug)]
pub enum BatchStats<'a> {
    /// The running statistics (inference, or frozen for fine-tuning).
    Running,
    /// This batch's (training).
    Batch,
    /// The batch of every data-parallel rank (training).
    Synced(&'a SyncBatchNorm),
}

/// Conv1d stack (k3, s2, BatchNorm, GELU; names `conv.{3i}` / `conv.{3i+1}` as in a PyTorch
/// `Sequential`), learned positional embedding `pos_embed [tokens, d_model]` (absent in the
/// reference), transformer encoder `transformer.layers.*`, mean pool, MLP `proj.0` / `proj.2`.
#[derive(Debug)]
pub struct SensorEncoder {
    conv: Vec<(Conv1dS2, BatchNorm1d)>,
    pos_embed: Tensor,
    transformer: Encoder,
    proj: (Linear, Linear),
    window: i64,
}

impl SensorEncoder {
    /// Creates the parameters under `p` (e.g. `root / "sensor_encoder"`).
    pub fn new(p: nn::Path, cfg: &SensorEncoderConfig) -> Self {
        let cp = &p / "conv";
        let mut inp = cfg.in_channels;
        let conv = cfg
            .conv_channels
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let i = i as i64;
                let layer = (Conv1dS2::new(&cp / (3 * i), inp, out), BatchNorm1d::new(&cp / (3 * i + 1), out));
                inp = out;
                layer
            })
            .collect();
        let pp = &p / "proj";
        Self {
            conv,
            pos_embed: p.randn("pos_embed", &[cfg.tokens(), cfg.d_model], 0.0, 0.02),
            transformer: Encoder::new(
                &p / "transformer",
                cfg.n_layers,
                cfg.d_model,
                cfg.n_heads,
                cfg.ff_dim,
                cfg.dropout,
            ),
            proj: (Linear::new(&pp / 0, cfg.d_model, cfg.out_dim), Linear::new(&pp / 2, cfg.out_dim, cfg.out_dim)),
            window: cfg.window,
        }
    }

    /// `x [B, T, C]` (already normalized, any `T >= 2`; resampled linearly to the configured
    /// window when it differs) -> `[B, out_dim]`. Computes in `x`'s dtype.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.forward_bn(x, train, if train { BatchStats::Batch } else { BatchStats::Running })
    }

    /// The BatchNorm layers' running mean and variance, in forward order.
    pub fn batch_norm_running(&self) -> Vec<(Tensor, Tensor)> {
        self.conv.iter().map(|(_, bn)| bn.running()).collect()
    }

    /// Like [`SensorEncoder::forward_t`], with BatchNorm on `stats`.
    pub fn forward_bn(&self, x: &Tensor, train: bool, stats: BatchStats<'_>) -> Tensor {
        let mut h = x.transpose(1, 2);
        if h.size()[2] != self.window {
            let k = h.kind();
            h = h.to_kind(Kind::Float).upsample_linear1d([self.window], true, None).to_kind(k);
        }
        for (conv, bn) in &self.conv {
            let z = conv.forward(&h);
            h = match stats {
                BatchStats::Running => bn.forward_t(&z, false),
                BatchStats::Batch => bn.forward_t(&z, true),
                BatchStats::Synced(sync) => bn.forward_synced(&z, sync),
            }
            .gelu("none");
        }
        let h = h.transpose(1, 2) + self.pos_embed.to_kind(x.kind());
        let h = self.transformer.forward_t(&h, train).mean_dim(1, false, None);
        self.proj.1.forward_t(&self.proj.0.forward_t(&h, train).gelu("none"), train)
    }
}
