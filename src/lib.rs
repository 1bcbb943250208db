//! vla_finetune: record demonstrations, fine-tune a sensor-aware vision-language-action policy
//! (Stage 2: Qwen2.5-VL + LoRA, sensor encoder, diffusion action expert) and hot-swap it into a
//! running policy. The core is ROS-free; `ros` (feature `ros`) only adapts it to ROS 2.

pub mod atomic_file;
pub mod bench;
pub mod checkpoint;
pub mod civil_date;
pub mod cli;
pub mod dataset;
pub mod device;
pub mod dist;
pub mod logging;
pub mod memory;
pub mod node_params;
pub mod oom_injection;
pub mod policy;
pub mod priority;
pub mod repo_files;
pub mod runtime;
pub mod sim;
pub mod train;
pub mod vlm;

#[cfg(feature = "ros")]
pub mod ros;
