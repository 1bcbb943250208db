//! `Config`: a Qwen2.5-VL `config.json`, in the flat transformers 4.x layout (text fields at the top,
//! `rope_scaling.mrope_section`) or the nested 5.x layout (`text_config`, `vision_config`,
//! `rope_parameters`).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

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

struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
    scope: &'a str,
}

impl Fields<'_> {
    fn err(&self, msg: String) -> VlmError {
        VlmError::Config { path: self.path.to_path_buf(), msg }
    }
    fn name(&self, key: &str) -> String {
        if self.scope.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.scope)
        }
    }
    fn int_opt(&self, keys: &[&str]) -> Result<Option<i64>> {
        for k in keys {
            match self.obj.get(*k) {
                None | Some(Value::Null) => continue,
                Some(v) => {
                    return v
                        .as_i64()
                        .map(Some)
                        .ok_or_else(|| self.err(format!("field `{}` must be an integer, found {v}", self.name(k))))
                }
            }
        }
        Ok(None)
    }
    fn int(&self, key: &str) -> Result<i64> {
        self.int_opt(&[key])?.ok_or_else(|| self.err(format!("missing integer field `{}`", self.name(key))))
    }
    fn int_or(&self, keys: &[&str], default: i64) -> Result<i64> {
        Ok(self.int_opt(keys)?.unwrap_or(default))
    }
    fn float_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(format!("field `{}` must be a number, found {v}", self.name(key)))),
        }
    }
    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(format!("field `{}` must be a boolean, found {v}", self.name(key)))),
        }
    }
    fn str_or<'b>(&'b self, key: &str, default: &'b str) -> Result<&'b str> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.err(format!("field `{}` must be a string, found {v}", self.name(key)))),
        }
    }
    fn int_list(&self, v: &Value, key: &str) -> Result<Vec<i64>> {
        let arr = v.as_array().ok_or_else(|| self.err(format!("field `{key}` must be a list of integers, found {v}")))?;
        arr.iter()
            .map(|x| x.as_i64().ok_or_else(|| self.err(format!("field `{key}` must be a list of integers, found {v}"))))
            .collect()
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
        let top = value.as_object().ok_or_else(|| err("expected a JSON object".into()))?;
        let top_f = Fields { path, obj: top, scope: "" };
        if let Some(mt) = top.get("model_type").and_then(Value::as_str) {
            if mt != "qwen2_5_vl" {
                return Err(err(format!("model_type `{mt}` is not `qwen2_5_vl`")));
            }
        }
        let text_obj = match top.get("text_config") {
            Some(Value::Object(o)) => o,
            Some(Value::Null) | None => top,
            Some(v) => return Err(err(format!("field `text_config` must be an object, found {v}"))),
        };
        let tf = Fields { path, obj: text_obj, scope: if std::ptr::eq(text_obj, top) { "" } else { "text_config" } };
        let vision_obj = match top.get("vision_config") {
            Some(Value::Object(o)) => o,
            _ => return Err(err("missing object field `vision_config`".into())),
        };
        let vf = Fields { path, obj: vision_obj, scope: "vision_config" };

        let act = tf.str_or("hidden_act", "silu")?;
        if act != "silu" {
            return Err(tf.err(format!("hidden_act `{act}` is not supported (expected silu)")));
        }
        let vact = vf.str_or("hidden_act", "silu")?;
        if vact != "silu" {
            return Err(vf.err(format!("vision_config.hidden_act `{vact}` is not supported (expected silu)")));
        }

        // RoPE: 5.x `rope_parameters` {rope_theta, mrope_section}; 4.x `rope_scaling` + `rope_theta`.
        let rope_obj = [text_obj.get("rope_parameters"), text_obj.get("rope_scaling"), top.get("rope_scaling")]
            .into_iter()
            .flatten()
            .find_map(Value::as_object);
        let mut rope_theta = tf.float_or("rope_theta", top_f.float_or("rope_theta", 1_000_000.0)?)?;
        let mut mrope = vec![16, 24, 24];
        if let Some(r) = rope_obj {
            let rf = Fields { path, obj: r, scope: "rope_parameters" };
            rope_theta = rf.float_or("rope_theta", rope_theta)?;
            if let Some(m) = r.get("mrope_section") {
                mrope = rf.int_list(m, "mrope_section")?;
            }
            let kind = r.get("rope_type").or_else(|| r.get("type")).and_then(Value::as_str).unwrap_or("default");
            if kind != "default" && kind != "mrope" {
                return Err(rf.err(format!("rope type `{kind}` is not supported (expected default or mrope)")));
            }
        }
        let mrope_section: [i64; 3] = mrope
            .clone()
            .try_into()
            .map_err(|_| err(format!("mrope_section must have 3 entries, found {mrope:?}")))?;

        let heads = tf.int("num_attention_heads")?;
        // As transformers: tied when either level says so.
        let tie = tf.bool_opt("tie_word_embeddings")?.unwrap_or(false)
            || top_f.bool_opt("tie_word_embeddings")?.unwrap_or(false);
        let text = TextConfig {
            vocab_size: tf.int("vocab_size")?,
            hidden_size: tf.int("hidden_size")?,
            intermediate_size: tf.int("intermediate_size")?,
            num_hidden_layers: tf.int("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: tf.int_or(&["num_key_value_heads"], heads)?,
            rms_norm_eps: tf.float_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            mrope_section,
            tie_word_embeddings: tie,
        };

        let fullatt = match vision_obj.get("fullatt_block_indexes") {
            None | Some(Value::Null) => vec![7, 15, 23, 31],
            Some(v) => vf.int_list(v, "vision_config.fullatt_block_indexes")?,
        };
        let vision_rope_theta = match vision_obj.get("rope_parameters").and_then(Value::as_object) {
            Some(r) => Fields { path, obj: r, scope: "vision_config.rope_parameters" }.float_or("rope_theta", 10_000.0)?,
            None => 10_000.0,
        };
        let vision = VisionConfig {
            depth: vf.int_or(&["depth", "num_hidden_layers"], 32)?,
            hidden_size: vf.int_or(&["hidden_size", "embed_dim"], 3584)?,
            intermediate_size: vf.int_or(&["intermediate_size"], 3420)?,
            num_heads: vf.int_or(&["num_heads", "num_attention_heads"], 16)?,
            in_channels: vf.int_or(&["in_channels", "in_chans"], 3)?,
            patch_size: vf.int_or(&["patch_size", "spatial_patch_size"], 14)?,
            spatial_merge_size: vf.int_or(&["spatial_merge_size"], 2)?,
            temporal_patch_size: vf.int_or(&["temporal_patch_size"], 2)?,
            window_size: vf.int_or(&["window_size"], 112)?,
            out_hidden_size: vf.int_or(&["out_hidden_size"], 3584)?,
            fullatt_block_indexes: fullatt,
            tokens_per_second: vf.int_or(&["tokens_per_second"], 4)?,
            rope_theta: vision_rope_theta,
        };
        let cfg = Config {
            text,
            vision,
            image_token_id: top_f.int_or(&["image_token_id"], 151_655)?,
            video_token_id: top_f.int_or(&["video_token_id"], 151_656)?,
            vision_start_token_id: top_f.int_or(&["vision_start_token_id"], 151_652)?,
            vision_end_token_id: top_f.int_or(&["vision_end_token_id"], 151_653)?,
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
            return Err(format!(
                "mrope_section {:?} must sum to head_dim/2 = {}",
                t.mrope_section,
                t.head_dim() / 2
            ));
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
