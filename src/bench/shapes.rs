//! The benchmarked model sizes: VL backbone configs (tiny fixture, reduced 3B, full 3B), the
//! matching policy-heads configs, the synthetic camera frames and the Hugging Face `config.json`
//! a reference implementation loads to build the same model.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::dataset::episode::RgbImage;
use crate::policy::{ActionExpertConfig, PolicyConfig, SensorEncoderConfig};
use crate::vlm::Config;

/// Which backbone shapes a benchmark uses (weights are random unless loaded from a model dir).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ModelSize {
    /// The tiny random Qwen2.5-VL test fixture (tests/fixtures/vlm/tiny_a).
    Tiny,
    /// Qwen2.5-VL-3B structure at reduced widths and depths: text hidden 512, MLP 2752, 4/1
    /// heads, 4 layers; vision hidden 320, MLP 856, 4 heads, 4 blocks (block 3 full attention).
    Reduced,
    /// Qwen2.5-VL-3B-Instruct shapes.
    Full,
}

impl ModelSize {
    /// Lower-case name, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tiny => "tiny",
            Self::Reduced => "reduced",
            Self::Full => "full",
        }
    }

    /// Default square camera-frame side: 56 (4 tokens per view) for `tiny`, 224 (64 tokens) for
    /// `reduced`, 448 for `full` (32 x 32 = 1024 patches of 14 px, the "~1000 patches"
    /// per view; 256 LLM tokens after the 2 x 2 merge).
    pub fn default_image_size(self) -> u32 {
        match self {
            Self::Tiny => 56,
            Self::Reduced => 224,
            Self::Full => 448,
        }
    }
}

/// The tiny fixture model's directory; its tokenizer and special-token ids serve every size.
pub fn fixture_dir() -> PathBuf {
    crate::repo_files::repo_file("tests/fixtures/vlm/tiny_a")
}

/// The backbone config of `size`. Special-token ids are the fixture tokenizer's, so one
/// tokenizer builds prompts for every size.
pub fn vl_config(size: ModelSize) -> crate::vlm::error::Result<Config> {
    let tiny = Config::from_file(&Config::path_in(&fixture_dir()))?;
    if size == ModelSize::Tiny {
        return Ok(tiny);
    }
    let mut cfg = Config::qwen2_5_vl_3b();
    if size == ModelSize::Reduced {
        cfg.text.vocab_size = tiny.text.vocab_size;
        (cfg.text.hidden_size, cfg.text.intermediate_size, cfg.text.num_hidden_layers) = (512, 2752, 4);
        (cfg.text.num_attention_heads, cfg.text.num_key_value_heads) = (4, 1);
        (cfg.vision.hidden_size, cfg.vision.intermediate_size, cfg.vision.num_heads, cfg.vision.depth) =
            (320, 856, 4, 4);
        cfg.vision.out_hidden_size = 512;
        cfg.vision.fullatt_block_indexes = vec![3];
    }
    (cfg.image_token_id, cfg.video_token_id) = (tiny.image_token_id, tiny.video_token_id);
    (cfg.vision_start_token_id, cfg.vision_end_token_id) = (tiny.vision_start_token_id, tiny.vision_end_token_id);
    Ok(cfg)
}

/// The policy heads of `size` on a VL feature of `vl_dim`: the reference sizes for `full`,
/// proportionally smaller ones for `reduced` and `tiny`. The sensor input keeps the reference's
/// 1026 channels except for `tiny`.
pub fn heads_config(size: ModelSize, vl_dim: i64) -> PolicyConfig {
    let mut cfg = PolicyConfig { vl_dim, ..PolicyConfig::default() };
    match size {
        ModelSize::Full => {}
        ModelSize::Reduced => {
            cfg.sensor = SensorEncoderConfig {
                conv_channels: vec![128, 256, 256, 256],
                d_model: 256,
                n_heads: 4,
                ff_dim: 1024,
                out_dim: 768,
                ..SensorEncoderConfig::default()
            };
            cfg.expert = ActionExpertConfig { d_model: 256, n_heads: 4, ff_dim: 1024, ..ActionExpertConfig::default() };
        }
        ModelSize::Tiny => {
            cfg.sensor = SensorEncoderConfig {
                window: 65,
                in_channels: 8,
                conv_channels: vec![16, 32],
                d_model: 32,
                n_heads: 2,
                n_layers: 1,
                ff_dim: 64,
                out_dim: 32,
                dropout: 0.1,
            };
            cfg.expert = ActionExpertConfig {
                d_model: 32,
                n_heads: 2,
                n_layers: 1,
                ff_dim: 64,
                ..ActionExpertConfig::default()
            };
        }
    }
    cfg
}

/// A deterministic synthetic RGB frame (a smooth pattern, so resizing behaves as on photos).
pub fn synthetic_frame(width: u32, height: u32, seed: u32) -> RgbImage {
    let mut data = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        for x in 0..width {
            data.extend([((x + seed * 17) % 251) as u8, ((y + seed * 31) % 241) as u8, ((x * y + seed) % 239) as u8]);
        }
    }
    RgbImage { width, height, data }
}

/// `config.json` in the transformers>=5 layout for `cfg` (what
/// `Qwen2_5_VLForConditionalGeneration` and [`Config::from_file`] read).
pub fn config_json(cfg: &Config) -> serde_json::Value {
    let (t, v) = (&cfg.text, &cfg.vision);
    serde_json::json!({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
        "text_config": {
            "model_type": "qwen2_5_vl_text", "bos_token_id": null, "eos_token_id": null, "pad_token_id": null,
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": t.mrope_section},
            "tie_word_embeddings": t.tie_word_embeddings,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads, "in_channels": v.in_channels, "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
            "window_size": v.window_size, "out_hidden_size": v.out_hidden_size, "hidden_act": "silu",
            "fullatt_block_indexes": v.fullatt_block_indexes, "tokens_per_second": v.tokens_per_second,
        },
    })
}
