//! Qwen2.5-VL in tch: config, image processor, tokenizer/prompt, vision tower, text decoder,
//! weights, LoRA, gradient checkpointing.

pub mod checkpointed;
pub mod config;
pub mod error;
pub mod grad_checkpoint;
pub mod image_processor;
pub mod layers;
pub mod linear;
pub mod lora;
pub mod model;
pub mod params;
pub mod peft;
pub mod precision;
pub mod processor;
pub mod prompt;
pub mod rope;
pub mod text;
pub mod vision;
pub mod weights;

pub use checkpointed::{CheckpointedPass, TrainCheckpointing};
pub use config::{Config, TextConfig, VisionConfig};
pub use error::VlmError;
pub use image_processor::{load_image, ImageProcessor};
pub use model::{Pooling, Qwen25VL, TextInputs, VlOutput};
pub use processor::{VlBatch, VlProcessor, VlSample};
