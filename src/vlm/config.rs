//! `Config`: a Qwen2.5-VL `config.json`, in the flat transformers 4.x layout (text fields at the top,
//! `rope_scaling.mrope_section`) or the nested 5.x layout (`text_config`, `vision_config`,
//! `rope_parameters`).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::error::{Result, VlmError};

/// The language model part.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Rows of the token embedding.
    pub vocab_size: i64,
    /// Model width.
    pub hidden_size: i64,
    /// SwiGLU inner width.
    pub intermediate_size: i64,
    /// Decoder layers.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads (GQA).
    pub num_key_value_heads: i64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// M-RoPE split of the `head_dim / 2` frequencies into temporal, height, width.
    pub mrope_section: [i64; 3],
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl TextConfig {
    /// Per-head width.
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
}

/// The vision tower part.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Vision blocks.
    pub depth: i64,
    /// Vision width.
    pub hidden_size: i64,
    /// SwiGLU inner width of the vision MLP.
    pub intermediate_size: i64,
    /// Attention heads.
    pub num_heads: i64,
    /// Image channels.
    pub in_channels: i64,
    /// Spatial patch size in pixels.
    pub patch_size: i64,
    /// Patches merged per side into one LLM token.
    pub spatial_merge_size: i64,
    /// Frames per temporal patch.
    pub temporal_patch_size: i64,
    /// Window attention side in pixels.
    pub window_size: i64,
    /// Merger output width (the LLM's hidden size).
    pub out_hidden_size: i64,
    /// Blocks that attend over the whole image instead of windows.
    pub fullatt_block_indexes: Vec<i64>,
    /// Temporal position step per second of video (used for videos only).
    pub tokens_per_second: i64,
    /// 2D RoPE base.
    pub rope_theta: f64,
}

impl VisionConfig {
    /// Per-head width.
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_heads
    }
    /// Values per flattened patch: `in_channels * temporal_patch_size * patch_size^2`.
    pub fn patch_dim(&self) -> i64 {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// A whole Qwen2.5-VL configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Language model.
    pub text: TextConfig,
    /// Vision tower.
    pub vision: VisionConfig,
    /// `<|image_pad|>`.
    pub image_token_id: i64,
    /// `<|video_pad|>`.
    pub video_token_id: i64,
    /// `<|vision_start|>`.
    pub vision_start_token_id: i64,
    /// `<|vision_end|>`.
    pub vision_end_token_id: i64,
}

/// `config.json`'s top level as this crate reads it (absent and `null` alike are `None`). The
/// text fields are read separately: from `text_config` (5.x) or from the top level (4.x).
#[derive(Deserialize)]
struct RawTop {
    text_config: Option<Value>,
    vision_config: RawVision,
    rope_scaling: Option<RawRope>,
    rope_theta: Option<f64>,
    tie_word_embeddings: Option<bool>,
    image_token_id: Option<i64>,
    video_token_id: Option<i64>,
    vision_start_token_id: Option<i64>,
    vision_end_token_id: Option<i64>,
}

/// The language model's fields.
#[derive(Deserialize)]
struct RawText {
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<RawRope>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
}

/// RoPE settings: 5.x `rope_parameters`, 4.x `rope_scaling`.
#[derive(Deserialize)]
struct RawRope {
    rope_theta: Option<f64>,
    mrope_section: Option<Vec<i64>>,
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// `vision_config`, where transformers versions name some fields two ways (the first wins).
#[derive(Deserialize)]
struct RawVision {
    depth: Option<i64>,
    num_hidden_layers: Option<i64>,
    hidden_size: Option<i64>,
    embed_dim: Option<i64>,
    intermediate_size: Option<i64>,
    num_heads: Option<i64>,
    num_attention_heads: Option<i64>,
    in_channels: Option<i64>,
    in_chans: Option<i64>,
    patch_size: Option<i64>,
    spatial_patch_size: Option<i64>,
    spatial_merge_size: Option<i64>,
    temporal_patch_size: Option<i64>,
    window_size: Option<i64>,
    out_hidden_size: Option<i64>,
    fullatt_block_indexes: Option<Vec<i64>>,
    tokens_per_second: Option<i64>,
    hidden_act: Option<String>,
    rope_parameters: Option<RawRope>,
}

/// Deserializes `value` (found at `scope`, "" for the top level), naming the field in errors.
fn parse<T: serde::de::DeserializeOwned>(value: &Value, scope: &str, path: &Path) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let at = e.path().to_string();
        let field = match (scope, at.as_str()) {
            (s, ".") => s.to_string(),
            ("", a) => a.to_string(),
            (s, a) => format!("{s}.{a}"),
        };
        let msg = if field.is_empty() { e.inner().to_string() } else { format!("field `{field}`: {}", e.inner()) };
        VlmError::Config { path: path.to_path_buf(), msg }
    })
}

fn check_silu(act: &Option<String>, field: &str) -> std::result::Result<(), String> {
    match act.as_deref() {
        None | Some("silu") => Ok(()),
        Some(a) => Err(format!("{field} `{a}` is not supported (expected silu)")),
    }
}

impl Config {
    /// Reads `config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| VlmError::Io { path: path.to_path_buf(), error })?;
        Self::from_json_str(&text, path)
    }

    /// Parses a `config.json` text; `path` only names the source in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| VlmError::Config { path: path.to_path_buf(), msg: format!("invalid JSON: {e}") })?;
        Self::from_json(&value, path)
    }

    /// Builds the config from parsed JSON (either layout).
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let err = |msg: String| VlmError::Config { path: path.to_path_buf(), msg };
        if !value.is_object() {
            return Err(err("expected a JSON object".into()));
        }
        // Another model's config says so before any missing field does.
        if let Some(mt) = value.get("model_type").and_then(Value::as_str).filter(|&m| m != "qwen2_5_vl") {
            return Err(err(format!("model_type `{mt}` is not `qwen2_5_vl`")));
        }
        let top: RawTop = parse(value, "", path)?;
        let text: RawText = match &top.text_config {
            Some(t @ Value::Object(_)) => parse(t, "text_config", path)?,
            None => parse(value, "", path)?,
            Some(v) => return Err(err(format!("field `text_config` must be an object, found {v}"))),
        };
        let v = top.vision_config;
        check_silu(&text.hidden_act, "hidden_act").map_err(err)?;
        check_silu(&v.hidden_act, "vision_config.hidden_act").map_err(err)?;

        let rope = text.rope_parameters.as_ref().or(text.rope_scaling.as_ref()).or(top.rope_scaling.as_ref());
        let kind = rope.and_then(|r| r.rope_type.as_deref().or(r.kind.as_deref())).unwrap_or("default");
        if kind != "default" && kind != "mrope" {
            return Err(err(format!("rope type `{kind}` is not supported (expected default or mrope)")));
        }
        let mrope = rope.and_then(|r| r.mrope_section.clone()).unwrap_or_else(|| vec![16, 24, 24]);
        let mrope_section: [i64; 3] =
            mrope.clone().try_into().map_err(|_| err(format!("mrope_section must have 3 entries, found {mrope:?}")))?;
        let cfg = Config {
            text: TextConfig {
                vocab_size: text.vocab_size,
                hidden_size: text.hidden_size,
                intermediate_size: text.intermediate_size,
                num_hidden_layers: text.num_hidden_layers,
                num_attention_heads: text.num_attention_heads,
                num_key_value_heads: text.num_key_value_heads.unwrap_or(text.num_attention_heads),
                rms_norm_eps: text.rms_norm_eps.unwrap_or(1e-6),
                rope_theta: rope
                    .and_then(|r| r.rope_theta)
                    .or(text.rope_theta)
                    .or(top.rope_theta)
                    .unwrap_or(1_000_000.0),
                mrope_section,
                // As transformers: tied when either level says so.
                tie_word_embeddings: text.tie_word_embeddings.unwrap_or(false)
                    || top.tie_word_embeddings.unwrap_or(false),
            },
            vision: VisionConfig {
                depth: v.depth.or(v.num_hidden_layers).unwrap_or(32),
                hidden_size: v.hidden_size.or(v.embed_dim).unwrap_or(3584),
                intermediate_size: v.intermediate_size.unwrap_or(3420),
                num_heads: v.num_heads.or(v.num_attention_heads).unwrap_or(16),
                in_channels: v.in_channels.or(v.in_chans).unwrap_or(3),
                patch_size: v.patch_size.or(v.spatial_patch_size).unwrap_or(14),
                spatial_merge_size: v.spatial_merge_size.unwrap_or(2),
                temporal_patch_size: v.temporal_patch_size.unwrap_or(2),
                window_size: v.window_size.unwrap_or(112),
                out_hidden_size: v.out_hidden_size.unwrap_or(3584),
                fullatt_block_indexes: v.fullatt_block_indexes.unwrap_or_else(|| vec![7, 15, 23, 31]),
                tokens_per_second: v.tokens_per_second.unwrap_or(4),
                rope_theta: v.rope_parameters.and_then(|r| r.rope_theta).unwrap_or(10_000.0),
            },
            image_token_id: top.image_token_id.unwrap_or(151_655),
            video_token_id: top.video_token_id.unwrap_or(151_656),
            vision_start_token_id: top.vision_start_token_id.unwrap_or(151_652),
            vision_end_token_id: top.vision_end_token_id.unwrap_or(151_653),
        };
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    /// Checks the internal consistency the model relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let t = &self.text;
        let v = &self.vision;
        let positive = [
            ("vocab_size", t.vocab_size),
            ("hidden_size", t.hidden_size),
            ("intermediate_size", t.intermediate_size),
            ("num_hidden_layers", t.num_hidden_layers),
            ("num_attention_heads", t.num_attention_heads),
            ("num_key_value_heads", t.num_key_value_heads),
            ("vision_config.depth", v.depth),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_heads", v.num_heads),
            ("vision_config.in_channels", v.in_channels),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.spatial_merge_size", v.spatial_merge_size),
            ("vision_config.temporal_patch_size", v.temporal_patch_size),
            ("vision_config.out_hidden_size", v.out_hidden_size),
        ];
        for (name, x) in positive {
            if x <= 0 {
                return Err(format!("`{name}` must be positive, found {x}"));
            }
        }
        if t.hidden_size % t.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                t.hidden_size, t.num_attention_heads
            ));
        }
        if t.num_attention_heads % t.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads {} is not divisible by num_key_value_heads {}",
                t.num_attention_heads, t.num_key_value_heads
            ));
        }
        if t.head_dim() % 2 != 0 || t.mrope_section.iter().sum::<i64>() * 2 != t.head_dim() {
            return Err(format!("mrope_section {:?} must sum to head_dim/2 = {}", t.mrope_section, t.head_dim() / 2));
        }
        if v.hidden_size % v.num_heads != 0 || v.head_dim() % 4 != 0 {
            return Err(format!(
                "vision hidden_size {} / num_heads {} must give a head_dim divisible by 4",
                v.hidden_size, v.num_heads
            ));
        }
        if v.window_size / v.spatial_merge_size / v.patch_size < 1 {
            return Err(format!(
                "vision window_size {} is smaller than one merged patch ({} px)",
                v.window_size,
                v.spatial_merge_size * v.patch_size
            ));
        }
        if let Some(i) = v.fullatt_block_indexes.iter().find(|&&i| i < 0 || i >= v.depth) {
            return Err(format!("fullatt_block_indexes entry {i} is outside 0..{}", v.depth));
        }
        if v.out_hidden_size != t.hidden_size {
            return Err(format!(
                "vision out_hidden_size {} differs from the text hidden_size {}",
                v.out_hidden_size, t.hidden_size
            ));
        }
        for (name, id) in [
            ("image_token_id", self.image_token_id),
            ("video_token_id", self.video_token_id),
            ("vision_start_token_id", self.vision_start_token_id),
            ("vision_end_token_id", self.vision_end_token_id),
        ] {
            if id < 0 || id >= t.vocab_size {
                return Err(format!("`{name}` {id} is outside the vocabulary (size {})", t.vocab_size));
            }
        }
        Ok(())
    }

    /// Qwen2.5-VL-3B-Instruct's configuration (for random-weight benchmarks).
    pub fn qwen2_5_vl_3b() -> Self {
        Config {
            text: TextConfig {
                vocab_size: 151_936,
                hidden_size: 2048,
                intermediate_size: 11_008,
                num_hidden_layers: 36,
                num_attention_heads: 16,
                num_key_value_heads: 2,
                rms_norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                mrope_section: [16, 24, 24],
                tie_word_embeddings: true,
            },
            vision: VisionConfig {
                depth: 32,
                hidden_size: 1280,
                intermediate_size: 3420,
                num_heads: 16,
                in_channels: 3,
                patch_size: 14,
                spatial_merge_size: 2,
                temporal_patch_size: 2,
                window_size: 112,
                out_hidden_size: 2048,
                fullatt_block_indexes: vec![7, 15, 23, 31],
                tokens_per_second: 2,
                rope_theta: 10_000.0,
            },
            image_token_id: 151_655,
            video_token_id: 151_656,
            vision_start_token_id: 151_652,
            vision_end_token_id: 151_653,
        }
    }

    /// The path of `config.json` in a model directory.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join("config.json")
    }
}
