//! Qwen2.5-VL in tch (config, loading, references, features CLI), LoRA and PEFT files, gradient checkpointing.

#[path = "../support/mod.rs"]
mod support;

mod checkpoint_lora;
mod cli;
mod grad_checkpoint_equivalence;
mod loading;
mod lora_errors;
mod lora_layer;
mod lora_peft_compat;
mod lora_peft_model;
mod lora_training;
mod reference;
mod vision_embeds;
