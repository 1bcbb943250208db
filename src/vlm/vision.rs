//! The Qwen2.5-VL vision tower: 3D patch embedding, 2D rotary embedding, window attention with
//! the window reordering and full-attention blocks, RMSNorm, SwiGLU MLP with biases, patch merger.
//!
//! Segmentable for gradient checkpointing: [`VisionTower::prepare`] computes the per-forward
//! [`VisionContext`], [`VisionTower::embed`] the block input, [`VisionTower::forward_block`] one
//! block, and [`VisionTower::merge`] the output; [`VisionTower::forward`] chains them.

use tch::{Device, Kind, Tensor};

use super::config::VisionConfig;
use super::error::{Result, VlmError};
use super::layers::{rotate_half, RmsNorm};
use super::params::{LinearId, Params, Scope};
use super::weights::{Init, Loader};

/// Everything a vision block needs besides its input, computed once per forward.
pub struct VisionContext {
    /// Rotary cosines `[patches, head_dim]` (f32) in window order.
    pub cos: Tensor,
    /// Rotary sines `[patches, head_dim]` (f32) in window order.
    pub sin: Tensor,
    /// Boundaries of each image (frame) in the patch sequence, for full-attention blocks.
    pub cu_seqlens: Vec<i64>,
    /// Boundaries of each attention window in the reordered sequence.
    pub cu_window_seqlens: Vec<i64>,
    /// Merged-patch order used inside the blocks (`[patches / merge^2]`).
    pub window_index: Tensor,
    /// Inverse of `window_index`, restoring image order after the merger.
    pub reverse_index: Tensor,
    /// Training mode (adapter dropout).
    pub train: bool,
}

/// Self-attention of one vision block (fused qkv with bias, output projection with bias).
pub struct VisionAttention {
    /// `[3 * hidden, hidden]`.
    pub qkv: LinearId,
    /// `[hidden, hidden]`.
    pub proj: LinearId,
    num_heads: i64,
}

/// SwiGLU MLP with biases.
pub struct VisionMlp {
    /// Gate projection.
    pub gate_proj: LinearId,
    /// Up projection.
    pub up_proj: LinearId,
    /// Down projection.
    pub down_proj: LinearId,
}

/// One vision transformer block.
pub struct VisionBlock {
    /// Pre-attention norm.
    pub norm1: RmsNorm,
    /// Pre-MLP norm.
    pub norm2: RmsNorm,
    /// Attention.
    pub attn: VisionAttention,
    /// MLP.
    pub mlp: VisionMlp,
    /// Whether this block attends over whole images (else over windows).
    pub full_attention: bool,
}

/// RMSNorm + 2-layer GELU MLP mapping `merge^2` neighbouring patches to one LLM token.
pub struct PatchMerger {
    /// Norm over each patch before merging.
    pub ln_q: RmsNorm,
    /// `mlp.0`.
    pub fc1: LinearId,
    /// `mlp.2`.
    pub fc2: LinearId,
}

/// The whole vision tower.
pub struct VisionTower {
    /// Configuration.
    pub config: VisionConfig,
    /// Conv3d patch embedding weight `[hidden, C, T, P, P]` (stride = kernel, no bias).
    pub patch_embed: Tensor,
    /// The blocks, in order.
    pub blocks: Vec<VisionBlock>,
    /// The merger.
    pub merger: PatchMerger,
    /// Every weight by name and the linear layers the blocks and the merger refer to.
    pub params: Params,
    inv_freq: Tensor,
}

/// Attention inside each `[cu[i], cu[i+1])` segment of `q`, `k`, `v` `[1, heads, seq, head_dim]`
/// (the segments cover the sequence in order). Each maximal run of consecutive segments of
/// equal length (most windows are full-sized and adjacent) is one batched call on a view of the
/// run, so nothing is gathered or scattered.
fn attention_segments(q: &Tensor, k: &Tensor, v: &Tensor, cu: &[i64]) -> Tensor {
    let sdpa = |q: &Tensor, k: &Tensor, v: &Tensor| {
        Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, false, None, false)
    };
    // (start, segment length, segments) per run.
    let mut runs: Vec<(i64, i64, i64)> = Vec::new();
    for w in cu.windows(2).filter(|w| w[1] > w[0]) {
        let (start, len) = (w[0], w[1] - w[0]);
        match runs.last_mut() {
            Some((s, l, n)) if *l == len && *s + *l * *n == start => *n += 1,
            _ => runs.push((start, len, 1)),
        }
    }
    if let [(_, _, 1)] = runs[..] {
        return sdpa(q, k, v);
    }
    let (heads, head_dim) = (q.size()[1], q.size()[3]);
    let outs: Vec<Tensor> = runs
        .iter()
        .map(|&(start, len, n)| {
            let run = |t: &Tensor| t.narrow(2, start, n * len).reshape([heads, n, len, head_dim]).transpose(0, 1);
            sdpa(&run(q), &run(k), &run(v)).transpose(0, 1).reshape([1, heads, n * len, head_dim])
        })
        .collect();
    Tensor::cat(&outs, 2)
}

impl VisionAttention {
    fn forward(&self, p: &Params, x: &Tensor, ctx: &VisionContext, cu: &[i64]) -> Tensor {
        let s = x.size()[0];
        let qkv = p[self.qkv].forward_t(x, ctx.train).reshape([s, 3, self.num_heads, -1]).permute([1, 0, 2, 3]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let kind = q.kind();
        let cos = ctx.cos.unsqueeze(-2);
        let sin = ctx.sin.unsqueeze(-2);
        let rope = |t: &Tensor| {
            let t = t.to_kind(Kind::Float);
            (&t * &cos + rotate_half(&t) * &sin).to_kind(kind)
        };
        let (q, k) = (rope(&q), rope(&k));
        let to_heads = |t: &Tensor| t.transpose(0, 1).unsqueeze(0);
        let out = attention_segments(&to_heads(&q), &to_heads(&k), &to_heads(&v), cu);
        let out = out.squeeze_dim(0).transpose(0, 1).reshape([s, -1]);
        p[self.proj].forward_t(&out, ctx.train)
    }
}

impl VisionMlp {
    fn forward(&self, p: &Params, x: &Tensor, train: bool) -> Tensor {
        let g = p[self.gate_proj].forward_t(x, train).silu();
        p[self.down_proj].forward_t(&(g * p[self.up_proj].forward_t(x, train)), train)
    }
}

impl VisionBlock {
    fn new(s: &mut Scope, cfg: &VisionConfig, full_attention: bool) -> Result<Self> {
        let h = cfg.hidden_size;
        let i = cfg.intermediate_size;
        let norm1 = s.norm("norm1", h, 1e-6)?;
        let norm2 = s.norm("norm2", h, 1e-6)?;
        let mut a = s.pp("attn");
        let attn = VisionAttention {
            qkv: a.linear("qkv", h, 3 * h, true)?,
            proj: a.linear("proj", h, h, true)?,
            num_heads: cfg.num_heads,
        };
        let mut m = s.pp("mlp");
        let mlp = VisionMlp {
            gate_proj: m.linear("gate_proj", h, i, true)?,
            up_proj: m.linear("up_proj", h, i, true)?,
            down_proj: m.linear("down_proj", i, h, true)?,
        };
        Ok(VisionBlock { norm1, norm2, attn, mlp, full_attention })
    }

    /// One block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`; `x` is `[patches, hidden]` in
    /// window order, the linears taken from `p`.
    fn forward(&self, p: &Params, x: &Tensor, ctx: &VisionContext) -> Tensor {
        let cu = if self.full_attention { &ctx.cu_seqlens } else { &ctx.cu_window_seqlens };
        let x = x + self.attn.forward(p, &self.norm1.forward(x), ctx, cu);
        &x + self.mlp.forward(p, &self.norm2.forward(&x), ctx.train)
    }
}

/// Window attention order for the given grids: (merged-patch permutation, window boundaries in
/// patches), exactly as transformers' `get_vision_window_index`.
pub fn window_index(grids: &[[i64; 3]], cfg: &VisionConfig) -> (Vec<i64>, Vec<i64>) {
    let m = cfg.spatial_merge_size;
    let unit = m * m;
    let ws = cfg.window_size / m / cfg.patch_size;
    let mut index = Vec::new();
    let mut cu = vec![0i64];
    let mut offset = 0;
    for &[t, gh, gw] in grids {
        let (lh, lw) = (gh / m, gw / m);
        let (nwh, nww) = ((lh + ws - 1) / ws, (lw + ws - 1) / ws);
        for ti in 0..t {
            for wh in 0..nwh {
                for ww in 0..nww {
                    let mut n = 0;
                    for y in wh * ws..((wh + 1) * ws).min(lh) {
                        for x in ww * ws..((ww + 1) * ws).min(lw) {
                            index.push(offset + ti * lh * lw + y * lw + x);
                            n += 1;
                        }
                    }
                    if n > 0 {
                        let last = *cu.last().expect("non-empty");
                        cu.push(last + n * unit);
                    }
                }
            }
        }
        offset += t * lh * lw;
    }
    (index, cu)
}

/// Per-patch (row, column) positions in the processor's block-major patch order.
fn patch_positions(grids: &[[i64; 3]], m: i64) -> Vec<[i64; 2]> {
    let mut pos = Vec::new();
    for &[t, gh, gw] in grids {
        for _ in 0..t {
            for bh in 0..gh / m {
                for bw in 0..gw / m {
                    for ih in 0..m {
                        for iw in 0..m {
                            pos.push([bh * m + ih, bw * m + iw]);
                        }
                    }
                }
            }
        }
    }
    pos
}

impl VisionTower {
    /// Builds the tower from `prefix` (normally `model.visual`).
    pub fn new(loader: &mut Loader, prefix: &str, cfg: &VisionConfig) -> Result<Self> {
        let mut params = Params::default();
        let mut s = Scope::new(loader, &mut params, prefix);
        let patch_embed = s.tensor(
            "patch_embed.proj.weight",
            &[cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size],
            Init::Normal,
        )?;
        let mut bs = s.pp("blocks");
        let blocks = (0..cfg.depth)
            .map(|i| VisionBlock::new(&mut bs.pp(i), cfg, cfg.fullatt_block_indexes.contains(&i)))
            .collect::<Result<Vec<_>>>()?;
        let merged = cfg.hidden_size * cfg.spatial_merge_size * cfg.spatial_merge_size;
        let mut ms = s.pp("merger");
        let merger = PatchMerger {
            ln_q: ms.norm("ln_q", cfg.hidden_size, 1e-6)?,
            fc1: ms.linear("mlp.0", merged, merged, true)?,
            fc2: ms.linear("mlp.2", merged, cfg.out_hidden_size, true)?,
        };
        let half = cfg.head_dim() / 2;
        let exps = Tensor::arange_start_step(0, half, 2, (Kind::Float, s.device())) / (half as f64);
        let inv_freq = Tensor::from(cfg.rope_theta as f32).to_device(s.device()).pow(&exps).reciprocal();
        Ok(VisionTower { config: cfg.clone(), patch_embed, blocks, merger, params, inv_freq })
    }

    /// Checks `pixel_values` `[patches, patch_dim]` against `grids` and computes the per-forward
    /// context (rotary tables, window order, attention segments).
    pub fn prepare(&self, pixel_values: &Tensor, grids: &[[i64; 3]], train: bool) -> Result<VisionContext> {
        let cfg = &self.config;
        let m = cfg.spatial_merge_size;
        for g in grids {
            if g.iter().any(|&d| d <= 0) || g[1] % m != 0 || g[2] % m != 0 {
                return Err(VlmError::Input(format!(
                    "image_grid_thw {g:?}: every entry must be positive and h, w multiples of {m}"
                )));
            }
        }
        let n: i64 = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let size = pixel_values.size();
        if size.len() != 2 || size[0] != n || size[1] != cfg.patch_dim() {
            return Err(VlmError::Input(format!(
                "pixel_values shape {size:?} does not match image_grid_thw (expected [{n}, {}])",
                cfg.patch_dim()
            )));
        }
        if n > 0 && pixel_values.isfinite().all().int64_value(&[]) == 0 {
            return Err(VlmError::Input("pixel_values contain NaN or infinite values".into()));
        }
        let device = pixel_values.device();
        let (widx, cu_window_seqlens) = window_index(grids, cfg);
        let window_index = Tensor::from_slice(&widx).to_device(device);
        let reverse_index = window_index.argsort(0, false);
        let mut cu_seqlens = vec![0i64];
        for &[t, h, w] in grids {
            for _ in 0..t {
                cu_seqlens.push(cu_seqlens.last().expect("non-empty") + h * w);
            }
        }
        let pos: Vec<i64> = patch_positions(grids, m).into_iter().flatten().collect();
        let pos = Tensor::from_slice(&pos).reshape([n, 2]).to_device(device).to_kind(Kind::Float);
        // freqs [n, 2, head_dim/4] -> [n, head_dim/2] (h then w) -> doubled to head_dim.
        let freqs = pos.unsqueeze(-1) * &self.inv_freq;
        let recompose = |f: Tensor| {
            let hw = f.reshape([n, -1]);
            Tensor::cat(&[&hw, &hw], -1)
        };
        let cos = self.to_window_order(&recompose(freqs.cos()), &window_index);
        let sin = self.to_window_order(&recompose(freqs.sin()), &window_index);
        Ok(VisionContext { cos, sin, cu_seqlens, cu_window_seqlens, window_index, reverse_index, train })
    }

    fn to_window_order(&self, x: &Tensor, window_index: &Tensor) -> Tensor {
        let unit = self.config.spatial_merge_size * self.config.spatial_merge_size;
        let s = x.size();
        x.reshape([s[0] / unit, unit, -1]).index_select(0, window_index).reshape([s[0], -1])
    }

    /// Patch embedding in window order: the first blocks' input `[patches, hidden]`.
    pub fn embed(&self, pixel_values: &Tensor, ctx: &VisionContext) -> Tensor {
        let kind = self.patch_embed.kind();
        let w = self.patch_embed.reshape([self.config.hidden_size, -1]);
        let x = pixel_values.to_kind(kind).matmul(&w.tr());
        self.to_window_order(&x, &ctx.window_index)
    }

    /// The merger on the last block's output, back in image order: `[tokens, out_hidden]`.
    pub fn merge(&self, x: &Tensor, ctx: &VisionContext) -> Tensor {
        let unit = self.config.spatial_merge_size * self.config.spatial_merge_size;
        let x = self.merger.ln_q.forward(x).reshape([-1, self.config.hidden_size * unit]);
        let x = self.params[self.merger.fc1].forward_t(&x, ctx.train).gelu("none");
        self.params[self.merger.fc2].forward_t(&x, ctx.train).index_select(0, &ctx.reverse_index)
    }

    /// Merged image embeddings `[sum(t*h*w)/merge^2, out_hidden]` for `pixel_values` `[patches,
    /// patch_dim]` of the images in `grids` (`[t, h, w]` in patches), in image order.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[i64; 3]], train: bool) -> Result<Tensor> {
        let ctx = self.prepare(pixel_values, grids, train)?;
        let mut x = self.embed(pixel_values, &ctx);
        for b in &self.blocks {
            x = b.forward(&self.params, &x, &ctx);
        }
        Ok(self.merge(&x, &ctx))
    }

    /// Block `i` on `x` `[patches, hidden]` in window order.
    pub fn forward_block(&self, i: usize, x: &Tensor, ctx: &VisionContext) -> Tensor {
        self.blocks[i].forward(&self.params, x, ctx)
    }

    /// Every base weight with its transformers>=4.52 name (`model.visual.*`), adapters excluded.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params.named_tensors()
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.patch_embed.device()
    }
}
