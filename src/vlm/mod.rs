//! Qwen2.5-VL in tch: config, image processor, tokenizer/prompt, vision tower, text decoder,
//! weights, LoRA, gradient checkpointing.

pub mod linear;
pub mod grad_checkpoint;
pub mod lora;
pub mod peft;
pub mod precision;
