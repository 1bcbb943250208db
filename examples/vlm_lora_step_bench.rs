//! One LoRA training step (forward + backward) of the real Qwen2.5-VL model (vision tower +
//! decoder) at reduced 3B shapes, with or without gradient checkpointing, in f32 or bf16.
//! Prints the step time and the host RSS high-water mark over the RSS before the step.
//!
//! `cargo run --release --example vlm_lora_step_bench -- f32|bf16 EVERY` (EVERY 0 = off);
//! run each configuration in a fresh process. Shapes: text hidden 512, MLP 2752, 4/1 heads,
//! 4 layers; vision hidden 320, MLP 856, 4 heads, 4 blocks (block 3 full attention); batch 2,
//! one 1232x1232 image per sample (1936 image tokens, ~1970 tokens per sample).

use std::time::Instant;

use tch::{nn, Device, Kind};
use vla_finetune::dataset::episode::RgbImage;
use vla_finetune::memory::{host_memory, reset_host_peak};
use vla_finetune::vlm::grad_checkpoint::Checkpointing;
use vla_finetune::vlm::lora::{inject_lora, LoraConfig};
use vla_finetune::vlm::{Config, Pooling, Qwen25VL, TrainCheckpointing, VlProcessor};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let kind = if args.get(1).map(String::as_str) == Some("bf16") { Kind::BFloat16 } else { Kind::Float };
    let every: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let ck = if every == 0 {
        TrainCheckpointing::OFF
    } else {
        TrainCheckpointing { vision: Checkpointing::every(every), text: Checkpointing::every(every) }
    };
    // Tokenizer and special-token ids of the tiny fixture model; 3B structure at reduced widths.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vlm/tiny_a");
    let tiny = Config::from_file(&Config::path_in(&dir))?;
    let mut cfg = Config::qwen2_5_vl_3b();
    cfg.text.vocab_size = tiny.text.vocab_size;
    (cfg.text.hidden_size, cfg.text.intermediate_size, cfg.text.num_hidden_layers) = (512, 2752, 4);
    (cfg.text.num_attention_heads, cfg.text.num_key_value_heads) = (4, 1);
    (cfg.vision.hidden_size, cfg.vision.intermediate_size, cfg.vision.num_heads, cfg.vision.depth) = (320, 856, 4, 4);
    cfg.vision.out_hidden_size = 512;
    cfg.vision.fullatt_block_indexes = vec![3];
    (cfg.image_token_id, cfg.video_token_id) = (tiny.image_token_id, tiny.video_token_id);
    (cfg.vision_start_token_id, cfg.vision_end_token_id) = (tiny.vision_start_token_id, tiny.vision_end_token_id);
    let area = 1232 * 1232;
    let processor = VlProcessor::from_model_dir(&dir, &cfg, Some(area), Some(area))?;
    let pixels = image::RgbImage::from_fn(1232, 1232, |x, y| image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x * y) % 239) as u8]));
    let img = RgbImage { width: 1232, height: 1232, data: pixels.into_raw() };
    let samples = [processor.sample(&[img.clone()], "Pick up the red cube.")?, processor.sample(&[img], "Insert the needle.")?];
    let batch = processor.collate(&samples)?;

    let mut model = Qwen25VL::random(&cfg, kind, Device::Cpu)?;
    let vs = nn::VarStore::new(Device::Cpu);
    inject_lora(&mut model, &LoraConfig::default(), &vs.root())?;
    let target = tch::Tensor::zeros([2, 512], (Kind::Float, Device::Cpu));
    reset_host_peak()?;
    let before = host_memory()?.rss;
    let t0 = Instant::now();
    let (features, pass) = model.forward_checkpointed(&batch, ck, true)?;
    let loss = (features.pooled(Pooling::All)? - &target).square().mean(Kind::Float);
    loss.backward();
    pass.backward(&model)?;
    let secs = t0.elapsed().as_secs_f64();
    let peak = host_memory()?.peak_rss;
    println!(
        "{:?} every {every}: tokens/sample {}, step {secs:.2} s, peak over resident {} MiB",
        kind,
        batch.input_ids.size()[1],
        peak.saturating_sub(before) >> 20
    );
    Ok(())
}
