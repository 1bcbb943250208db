//! The Qwen2.5-VL language model: token embedding, Qwen2 decoder layers (GQA attention with
//! biased q/k/v, M-RoPE, SwiGLU MLP, RMSNorm) and the final norm.
//!
//! Segmentable for gradient checkpointing: [`TextModel::prepare`] builds the per-forward
//! [`TextContext`] (rotary tables, attention mask), [`TextModel::forward_layer`] runs one layer,
//! [`TextModel::forward_embeds`] chains them and applies the final norm.

use tch::{Device, Kind, Tensor};

use crate::oom_injection::{self, Point};

use super::config::TextConfig;
use super::error::{Result, VlmError};
use super::layers::{rotate_half, RmsNorm};
use super::params::{LinearId, Params, Scope};
use super::rope::mrope_cos_sin;
use super::weights::{Init, Loader};

/// The token embedding's name under the language model.
const EMBED: &str = "embed_tokens.weight";

/// Everything a decoder layer needs besides its input, computed once per forward.
pub struct TextContext {
    /// Rotary cosines `[batch, len, head_dim]` in the compute dtype.
    pub cos: Tensor,
    /// Rotary sines `[batch, len, head_dim]` in the compute dtype.
    pub sin: Tensor,
    /// Boolean mask `[batch, 1, len, len]` (true = may attend), or `None` for plain causal
    /// attention without padding.
    pub mask: Option<Tensor>,
    /// Training mode (adapter dropout).
    pub train: bool,
}

/// Grouped-query self-attention.
pub struct TextAttention {
    /// Query projection (with bias).
    pub q_proj: LinearId,
    /// Key projection (with bias).
    pub k_proj: LinearId,
    /// Value projection (with bias).
    pub v_proj: LinearId,
    /// Output projection (no bias).
    pub o_proj: LinearId,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

/// SwiGLU MLP without biases.
pub struct TextMlp {
    /// Gate projection.
    pub gate_proj: LinearId,
    /// Up projection.
    pub up_proj: LinearId,
    /// Down projection.
    pub down_proj: LinearId,
}

/// One decoder layer.
pub struct DecoderLayer {
    /// Pre-attention norm.
    pub input_layernorm: RmsNorm,
    /// Attention.
    pub self_attn: TextAttention,
    /// Pre-MLP norm.
    pub post_attention_layernorm: RmsNorm,
    /// MLP.
    pub mlp: TextMlp,
}

/// The language model without `lm_head`.
pub struct TextModel {
    /// Configuration.
    pub config: TextConfig,
    /// Token embedding `[vocab, hidden]` (only the kept rows after
    /// [`TextModel::keep_embedding_rows`]).
    pub embed_tokens: Tensor,
    /// The decoder layers, in order.
    pub layers: Vec<DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Every weight by name and the linear layers the layers refer to.
    pub params: Params,
    embed_name: String,
    kept_rows: Option<KeptRows>,
}

/// The rows [`TextModel::keep_embedding_rows`] kept.
struct KeptRows {
    /// Token id -> row of the kept embedding (-1: dropped), on the model's device.
    row_of: Tensor,
    /// Whether each token id is kept (host copy, for the check).
    kept: Vec<bool>,
}

impl TextAttention {
    fn forward(&self, p: &Params, x: &Tensor, ctx: &TextContext) -> Tensor {
        let (b, l) = (x.size()[0], x.size()[1]);
        let heads = |t: Tensor, n: i64| t.reshape([b, l, n, self.head_dim]).transpose(1, 2);
        let q = heads(p[self.q_proj].forward_t(x, ctx.train), self.num_heads);
        let k = heads(p[self.k_proj].forward_t(x, ctx.train), self.num_kv_heads);
        let v = heads(p[self.v_proj].forward_t(x, ctx.train), self.num_kv_heads);
        let cos = ctx.cos.unsqueeze(1);
        let sin = ctx.sin.unsqueeze(1);
        let q = &q * &cos + rotate_half(&q) * &sin;
        let k = &k * &cos + rotate_half(&k) * &sin;
        // Grouped-query attention by SDPA itself (no repeated K/V copy).
        let gqa = self.num_heads != self.num_kv_heads;
        let out = match &ctx.mask {
            Some(m) => Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, None, gqa),
            None => Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, gqa),
        };
        let out = out.transpose(1, 2).reshape([b, l, self.num_heads * self.head_dim]);
        p[self.o_proj].forward_t(&out, ctx.train)
    }
}

impl DecoderLayer {
    /// Norms first, then attention and MLP (the order of [`TextModel::named_tensors`]).
    fn new(s: &mut Scope, cfg: &TextConfig) -> Result<Self> {
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let input_layernorm = s.norm("input_layernorm", h, cfg.rms_norm_eps)?;
        let post_attention_layernorm = s.norm("post_attention_layernorm", h, cfg.rms_norm_eps)?;
        let mut a = s.pp("self_attn");
        let self_attn = TextAttention {
            q_proj: a.linear("q_proj", h, nh * hd, true)?,
            k_proj: a.linear("k_proj", h, nkv * hd, true)?,
            v_proj: a.linear("v_proj", h, nkv * hd, true)?,
            o_proj: a.linear("o_proj", nh * hd, h, false)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        };
        let mut m = s.pp("mlp");
        let mlp = TextMlp {
            gate_proj: m.linear("gate_proj", h, i, false)?,
            up_proj: m.linear("up_proj", h, i, false)?,
            down_proj: m.linear("down_proj", i, h, false)?,
        };
        Ok(DecoderLayer { input_layernorm, self_attn, post_attention_layernorm, mlp })
    }

    /// One layer on `x` `[batch, len, hidden]`, its linears taken from `p`.
    fn forward(&self, p: &Params, x: &Tensor, ctx: &TextContext) -> Tensor {
        let x = x + self.self_attn.forward(p, &self.input_layernorm.forward(x), ctx);
        let h = self.post_attention_layernorm.forward(&x);
        let m = &self.mlp;
        let g = p[m.gate_proj].forward_t(&h, ctx.train).silu() * p[m.up_proj].forward_t(&h, ctx.train);
        &x + p[m.down_proj].forward_t(&g, ctx.train)
    }
}

impl TextModel {
    /// Builds the language model from `prefix` (normally `model.language_model`).
    pub fn new(loader: &mut Loader, prefix: &str, cfg: &TextConfig) -> Result<Self> {
        let mut params = Params::default();
        let mut s = Scope::new(loader, &mut params, prefix);
        let embed_name = s.name(EMBED);
        let embed_tokens = s.tensor(EMBED, &[cfg.vocab_size, cfg.hidden_size], Init::Normal)?;
        let mut ls = s.pp("layers");
        let layers =
            (0..cfg.num_hidden_layers).map(|i| DecoderLayer::new(&mut ls.pp(i), cfg)).collect::<Result<Vec<_>>>()?;
        let norm = s.norm("norm", cfg.hidden_size, cfg.rms_norm_eps)?;
        Ok(TextModel { config: cfg.clone(), embed_tokens, layers, norm, params, embed_name, kept_rows: None })
    }

    /// Token embeddings `[batch, len, hidden]`, on the model's device, of `input_ids` `[batch,
    /// len]`, whose range is checked where they are (on the host for a batch from the processor,
    /// so without a device synchronisation).
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let vocab = self.config.vocab_size;
        if input_ids.numel() > 0 {
            let (lo, hi) = (input_ids.min().int64_value(&[]), input_ids.max().int64_value(&[]));
            if lo < 0 || hi >= vocab {
                return Err(VlmError::Input(format!(
                    "input_ids hold ids in [{lo}, {hi}], outside the vocabulary 0..{vocab}"
                )));
            }
        }
        let device = self.embed_tokens.device();
        let Some(k) = &self.kept_rows else {
            return Ok(Tensor::embedding(&self.embed_tokens, &input_ids.to_device(device), -1, false, false));
        };
        let ids = Vec::<i64>::try_from(input_ids.to_device(Device::Cpu).flatten(0, -1))?;
        if let Some(id) = ids.iter().find(|&&i| !k.kept[i as usize]) {
            return Err(VlmError::Input(format!("token id {id} is not among the embedding rows kept for this run")));
        }
        let rows =
            k.row_of.index_select(0, &Tensor::from_slice(&ids).to_device(device)).view(input_ids.size().as_slice());
        Ok(Tensor::embedding(&self.embed_tokens, &rows, -1, false, false))
    }

    /// Keeps only the embedding rows of `ids` (every token a run will feed: the embedding is
    /// frozen and its other rows are never read), freeing the rest of the `[vocab, hidden]`
    /// matrix (about 0.6 GB in bf16 at 3B). [`TextModel::embed`] refuses other ids from then on;
    /// [`TextModel::named_tensors`] then holds the kept rows only (no longer a checkpoint).
    pub fn keep_embedding_rows(&mut self, ids: &[i64]) -> Result<()> {
        let vocab = self.config.vocab_size;
        if self.kept_rows.is_some() {
            return Err(VlmError::Input("the embedding rows were already reduced".into()));
        }
        let mut kept = vec![false; vocab as usize];
        for &id in ids {
            if !(0..vocab).contains(&id) {
                return Err(VlmError::Input(format!("token id {id} is outside the vocabulary 0..{vocab}")));
            }
            kept[id as usize] = true;
        }
        let keep: Vec<i64> = (0..vocab).filter(|&i| kept[i as usize]).collect();
        let mut row_of = vec![-1i64; vocab as usize];
        for (row, &id) in keep.iter().enumerate() {
            row_of[id as usize] = row as i64;
        }
        let device = self.embed_tokens.device();
        self.embed_tokens = self.embed_tokens.index_select(0, &Tensor::from_slice(&keep).to_device(device));
        self.params.replace(&self.embed_name, &self.embed_tokens)?;
        self.kept_rows = Some(KeptRows { row_of: Tensor::from_slice(&row_of).to_device(device), kept });
        Ok(())
    }

    /// Rotary tables and mask, on the device of `position_ids` `[3, batch, len]`, for an
    /// attention mask `[batch, len]` (1 = token, 0 = padding; read where it is, the host for a
    /// batch from the processor), in compute dtype `kind`.
    pub fn prepare(&self, position_ids: &Tensor, attention_mask: &Tensor, kind: Kind, train: bool) -> TextContext {
        let c = &self.config;
        let (cos, sin) = mrope_cos_sin(position_ids, c.head_dim(), c.rope_theta, c.mrope_section, kind);
        let valid = attention_mask.to_kind(Kind::Bool);
        let all_valid = valid.all().int64_value(&[]) != 0;
        let valid = valid.to_device(position_ids.device());
        let mask = if all_valid {
            None
        } else {
            let l = valid.size()[1];
            let causal = Tensor::ones([l, l], (Kind::Bool, valid.device())).tril(0);
            // [b, 1, 1, l] keys that exist, combined with causality.
            Some(causal.unsqueeze(0).unsqueeze(0).logical_and(&valid.unsqueeze(1).unsqueeze(1)))
        };
        TextContext { cos, sin, mask, train }
    }

    /// Every weight with its transformers>=4.52 name (`model.language_model.*`), adapters excluded.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params.named_tensors()
    }

    /// Decoder layer `i` on `x` `[batch, len, hidden]`.
    pub fn forward_layer(&self, i: usize, x: &Tensor, ctx: &TextContext) -> Tensor {
        self.layers[i].forward(&self.params, x, ctx)
    }

    /// Runs every layer and the final norm on input embeddings `[batch, len, hidden]`.
    pub fn forward_embeds(&self, embeds: &Tensor, ctx: &TextContext) -> Tensor {
        let mut x = embeds.shallow_clone();
        for layer in &self.layers {
            oom_injection::reach(Point::Forward);
            x = layer.forward(&self.params, &x, ctx);
        }
        self.norm.forward(&x)
    }
}
