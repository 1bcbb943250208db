//! `vlm-features`: run Qwen2.5-VL on images + a prompt and write its inputs and features to a
//! safetensors file. Also the quick way to check a model directory before a long job.

use std::path::PathBuf;

use anyhow::{bail, Context};
use tch::{Kind, Tensor};

use crate::vlm::{load_image, Config, Pooling, Qwen25VL, VlProcessor};

/// Arguments of `vlm-features`.
#[derive(clap::Args, Debug)]
pub struct VlmFeaturesArgs {
    /// Model directory (config.json, *.safetensors [+ index], tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Image file (PNG or JPEG); repeat for several camera views, in prompt order.
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    /// Instruction text following the images in the user turn.
    #[arg(long)]
    pub prompt: String,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight and compute dtype: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Minimum resized image area in pixels (default: the model's preprocessor config).
    #[arg(long)]
    pub min_pixels: Option<i64>,
    /// Maximum resized image area in pixels (default: the model's preprocessor config).
    #[arg(long)]
    pub max_pixels: Option<i64>,
    /// Tokens averaged into `pooled`: all, image, text or last.
    #[arg(long, default_value = "all", value_parser = super::parse_pooling)]
    pub pooling: Pooling,
    /// PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) applied to
    /// the model, as `PeftModel.from_pretrained` would.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Runs `vlm-features`.
pub fn run(a: VlmFeaturesArgs) -> anyhow::Result<()> {
    let kind = match a.dtype.as_str() {
        "f32" => Kind::Float,
        "bf16" => Kind::BFloat16,
        other => bail!("--dtype {other}: expected f32 or bf16"),
    };
    let device = crate::device::parse(&a.device).map_err(anyhow::Error::msg)?;
    let config = Config::from_file(&Config::path_in(&a.model))?;
    let processor = VlProcessor::from_model_dir(&a.model, &config, a.min_pixels, a.max_pixels)?;
    let images = a.images.iter().map(|p| load_image(p)).collect::<Result<Vec<_>, _>>()?;
    let sample = processor.sample(&images, &a.prompt)?;
    let batch = processor.collate(&[sample])?;
    let mut model = Qwen25VL::load(&a.model, kind, device).with_context(|| format!("loading {}", a.model.display()))?;
    let adapter_store = tch::nn::VarStore::new(device);
    if let Some(dir) = &a.adapter {
        let loaded = crate::vlm::peft::load_adapter(&mut model, dir, &adapter_store.root())
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        println!("adapter {}: LoRA r={} on {} layers", dir.display(), loaded.config.r, loaded.layers.len());
    }
    let _guard = tch::no_grad_guard();
    let features = model.forward(&batch, false)?;
    let pooled = features.pooled(a.pooling)?;
    let hidden = features.last_hidden_state.to_kind(Kind::Float).to_device(tch::Device::Cpu);
    let tensors: Vec<(&str, Tensor)> = vec![
        ("input_ids", batch.input_ids.shallow_clone()),
        ("pixel_values", batch.pixel_values.shallow_clone()),
        ("image_grid_thw", batch.grid_tensor()),
        ("position_ids", batch.position_ids.shallow_clone()),
        ("last_hidden_state", hidden),
        ("pooled", pooled.to_device(tch::Device::Cpu)),
    ];
    Tensor::write_safetensors(&tensors, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    let grids: Vec<String> = batch.image_grid_thw.iter().map(|g| format!("{}x{}x{}", g[0], g[1], g[2])).collect();
    println!(
        "{}: {} tokens, {} image(s) (grids {}), hidden {}, dtype {}, device {:?}",
        a.out.display(),
        batch.input_ids.size()[1],
        images.len(),
        grids.join(", "),
        config.text.hidden_size,
        a.dtype,
        device
    );
    Ok(())
}
