//! Qwen2.5-VL in tch: config, image processor, tokenizer/prompt, vision tower, text decoder,
//! weights, LoRA, gradient checkpointing.

pub mod linear;
