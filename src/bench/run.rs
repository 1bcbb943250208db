//! Runs one [`CaseSpec`] with our implementation and measures it.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{nn, Device, Kind, Tensor};

use super::case::{median, CaseKind, CaseSpec, Record, StepCache};
use super::shapes::{config_json, fixture_dir, heads_config, synthetic_frame, vl_config};
use crate::policy::{CondInput, NormStats, PolicyConfig, PolicyHeads, VlInput};
use crate::train::optim::{AdamW, AdamWConfig, GroupConfig, NamedParam};
use crate::vlm::grad_checkpoint::Checkpointing;
use crate::vlm::lora::{inject_lora, LoraConfig, TargetModules, DEFAULT_TARGET_REGEX};
use crate::vlm::{Config, Pooling, Qwen25VL, VlBatch, VlProcessor};

/// Instructions of the synthetic samples (cycled over the batch).
const INSTRUCTIONS: [&str; 2] = ["Pick up the red cube.", "Insert the needle into the phantom."];

/// The inputs of a case: backbone and heads configs, one processed VL batch, sensor windows and
/// target actions (random, fixed seed).
pub struct Inputs {
    /// Backbone config.
    pub vl: Config,
    /// Heads config.
    pub heads: PolicyConfig,
    /// The processed batch (CPU).
    pub batch: VlBatch,
    /// `[batch, window, channels]` raw sensor windows (CPU, f32).
    pub sensor: Tensor,
    /// `[batch, horizon, action_dim]` target actions (CPU, f32).
    pub actions: Tensor,
}

impl Inputs {
    /// Builds the inputs of `spec` (the backbone config from `spec.model_dir` when given).
    pub fn new(spec: &CaseSpec) -> Result<Self> {
        if spec.views == 0 || spec.batch == 0 || spec.image_size < 28 {
            bail!(
                "bench: views ({}) and batch ({}) must be >= 1 and image size ({}) >= 28",
                spec.views,
                spec.batch,
                spec.image_size
            );
        }
        let vl = match &spec.model_dir {
            Some(dir) => Config::from_file(&Config::path_in(Path::new(dir)))?,
            None => vl_config(spec.model)?,
        };
        let heads = heads_config(spec.model, vl.text.hidden_size);
        let area = i64::from(spec.image_size) * i64::from(spec.image_size);
        let processor = VlProcessor::from_model_dir(&fixture_dir(), &vl, Some(area), Some(area))?;
        let samples = (0..spec.batch)
            .map(|i| {
                let frames: Vec<_> = (0..spec.views)
                    .map(|v| synthetic_frame(spec.image_size, spec.image_size, (i * spec.views + v) as u32))
                    .collect();
                processor.sample(&frames, INSTRUCTIONS[i % INSTRUCTIONS.len()])
            })
            .collect::<crate::vlm::error::Result<Vec<_>>>()?;
        let batch = processor.collate(&samples)?;
        tch::manual_seed(0);
        let b = spec.batch as i64;
        let sensor = Tensor::randn([b, heads.sensor.window, heads.sensor.in_channels], (Kind::Float, Device::Cpu));
        let actions = Tensor::randn([b, heads.expert.horizon, heads.expert.action_dim], (Kind::Float, Device::Cpu))
            .clamp(-1.0, 1.0);
        Ok(Self { vl, heads, batch, sensor, actions })
    }

    /// Writes what a reference implementation needs to run the same case to `dir`:
    /// `spec.json` (`spec`), `config.json` (Hugging Face layout), `heads.json` (our
    /// PolicyConfig) and `inputs.safetensors` (`input_ids`, `attention_mask`, `pixel_values`,
    /// `image_grid_thw`, `sensor`, `actions`).
    pub fn export(&self, spec: &CaseSpec, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("spec.json"), serde_json::to_string_pretty(spec)?)?;
        std::fs::write(Config::path_in(dir), serde_json::to_string_pretty(&config_json(&self.vl))?)?;
        std::fs::write(dir.join("heads.json"), serde_json::to_string_pretty(&self.heads)?)?;
        let grids: Vec<i64> = self.batch.image_grid_thw.iter().flatten().copied().collect();
        let grid = Tensor::from_slice(&grids).reshape([-1, 3]);
        let tensors = [
            ("input_ids", self.batch.input_ids.shallow_clone()),
            ("attention_mask", self.batch.attention_mask.shallow_clone()),
            ("pixel_values", self.batch.pixel_values.to_kind(Kind::Float)),
            ("image_grid_thw", grid),
            ("sensor", self.sensor.shallow_clone()),
            ("actions", self.actions.shallow_clone()),
        ];
        Tensor::write_safetensors(&tensors, dir.join("inputs.safetensors"))?;
        Ok(())
    }
}

/// The LoRA config of the step: rank `r`, alpha `2r`, dropout 0.05 on the LLM's q/k/v/o.
pub fn lora_config(r: i64) -> LoraConfig {
    LoraConfig {
        r,
        lora_alpha: 2.0 * r as f64,
        target_modules: TargetModules::Regex(DEFAULT_TARGET_REGEX.to_string()),
        ..LoraConfig::default()
    }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Times `f` `warmup + steps` times; returns the median of the timed runs in milliseconds.
fn time_median(device: Device, warmup: usize, steps: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    for i in 0..warmup {
        f(i)?;
    }
    let mut ms = Vec::with_capacity(steps);
    for i in 0..steps {
        sync(device);
        let t = Instant::now();
        f(warmup + i)?;
        sync(device);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&ms))
}

fn load_model(spec: &CaseSpec, cfg: &Config, kind: Kind, device: Device) -> Result<Qwen25VL> {
    Ok(match &spec.model_dir {
        Some(dir) => Qwen25VL::load(Path::new(dir), kind, device)?,
        None => Qwen25VL::random(cfg, kind, device)?,
    })
}

fn new_heads(spec: &CaseSpec, cfg: &PolicyConfig, device: Device) -> Result<PolicyHeads> {
    let norm = NormStats::identity(cfg.sensor.in_channels as usize, 0, cfg.expert.action_dim as usize);
    let mut heads = PolicyHeads::new(cfg.clone(), norm, device)?;
    heads.set_compute_kind(spec.precision.precision().compute_kind());
    Ok(heads)
}

/// Runs `spec` and measures it. Peaks are those of the whole process (run each case in a fresh
/// process for honest numbers; see the `bench` command).
pub fn run_case(spec: &CaseSpec) -> Result<Record> {
    let device = crate::device::parse(&spec.device).map_err(anyhow::Error::msg)?;
    if spec.steps == 0 {
        bail!("bench: steps must be >= 1");
    }
    let _ = crate::memory::reset_host_peak()?;
    let inputs = Inputs::new(spec)?;
    let kind = spec.precision.precision().compute_kind();
    let (ms, per_iter, step) = match spec.kind {
        CaseKind::Step => {
            let cache = spec.cache.ok_or_else(|| anyhow::anyhow!("bench: a step case needs a cache mode"))?;
            {
                let s = run_step(spec, &inputs, cache, kind, device)?;
                (s.ms, spec.batch, Some(s))
            }
        }
        CaseKind::VisionCache => {
            let model = load_model(spec, &inputs.vl, kind, device)?;
            let pixels = inputs.batch.pixel_values.to_device(device);
            let _g = tch::no_grad_guard();
            let ms = time_median(device, spec.warmup, spec.steps, |_| {
                let _ = model.image_embeds(&pixels, &inputs.batch.image_grid_thw, false)?;
                Ok(())
            })?;
            (ms, spec.batch * spec.views, None)
        }
        CaseKind::Act => {
            let heads = new_heads(spec, &inputs.heads, device)?;
            tch::manual_seed(1);
            let vl = VlInput::pooled(Tensor::randn([spec.batch as i64, inputs.heads.vl_dim], (Kind::Float, device)));
            let sensor = inputs.sensor.to_device(device);
            let cond = CondInput { vl: &vl, sensor: &sensor, state: None };
            let ms = time_median(device, spec.warmup, spec.steps, |i| {
                let _ = heads.sample(&cond, spec.ddim_steps, i as u64)?;
                Ok(())
            })?;
            (ms, spec.batch, None)
        }
    };
    let peak_accel_bytes = match device {
        Device::Cuda(i) => crate::memory::max_memory_allocated(i)?,
        _ => None,
    };
    Ok(Record {
        implementation: "ours".into(),
        spec: spec.clone(),
        samples_per_s: per_iter as f64 * 1e3 / ms,
        unit: spec.kind.unit().into(),
        step_ms: ms,
        peak_accel_bytes,
        peak_host_bytes: crate::train::progress::peak_host_memory_bytes(),
        tokens_per_sample: step.as_ref().map_or(0, |s| s.tokens),
        trainable_params: step.as_ref().map_or(0, |s| s.lora_params + s.heads_params),
        lora_params: step.as_ref().map_or(0, |s| s.lora_params),
        heads_params: step.as_ref().map_or(0, |s| s.heads_params),
        loss: step.map(|s| s.loss),
    })
}

/// What the step measured besides the peaks.
struct StepResult {
    ms: f64,
    lora_params: i64,
    heads_params: i64,
    loss: f64,
    tokens: i64,
}

/// The Stage 2 step, timed.
fn run_step(spec: &CaseSpec, inputs: &Inputs, cache: StepCache, kind: Kind, device: Device) -> Result<StepResult> {
    let mut model = load_model(spec, &inputs.vl, kind, device)?;
    let heads = new_heads(spec, &inputs.heads, device)?;
    let batch = inputs.batch.to_device(device);
    let sensor = inputs.sensor.to_device(device);
    let actions = inputs.actions.to_device(device);
    let lora_vs = nn::VarStore::new(device);
    let mut params = crate::train::heads_job::heads_params(&heads, "heads.", "heads", "heads");
    let heads_params: i64 = params.iter().map(|p| p.tensor.numel() as i64).sum();
    let runs_llm = cache != StepCache::Features;
    if runs_llm {
        inject_lora(&mut model, &lora_config(spec.lora_rank), &lora_vs.root())?;
        let mut lora: Vec<(String, Tensor)> = lora_vs.variables().into_iter().collect();
        lora.sort_by(|a, b| a.0.cmp(&b.0));
        params.extend(lora.into_iter().map(|(name, tensor)| NamedParam {
            name,
            group: "vl_lora".into(),
            tensor,
            decay: true,
        }));
    }
    let lora_params = params.iter().map(|p| p.tensor.numel() as i64).sum::<i64>() - heads_params;
    let groups = vec![
        GroupConfig { name: "vl_lora".into(), lr: 1e-4, weight_decay: 0.0 },
        GroupConfig { name: "heads".into(), lr: 1e-4, weight_decay: 0.01 },
    ];
    let mut opt = AdamW::new(AdamWConfig::default(), groups, params)?;
    // What the cache holds, computed once without gradient.
    let image_embeds = match cache {
        StepCache::Vision => {
            Some(tch::no_grad(|| model.image_embeds(&batch.pixel_values, &batch.image_grid_thw, false))?)
        }
        _ => None,
    };
    let pooled = match cache {
        StepCache::Features => {
            Some(tch::no_grad(|| model.forward(&batch, false).and_then(|f| f.pooled(Pooling::All)))?)
        }
        _ => None,
    };
    let text_ck = if spec.checkpointing { Checkpointing::every(1) } else { Checkpointing::OFF };
    let b = spec.batch as u64;
    let mut last_loss = f64::NAN;
    let ms = time_median(device, spec.warmup, spec.steps, |i| {
        opt.zero_grad();
        let (features, pass) = match (cache, &pooled) {
            (_, Some(p)) => (p.shallow_clone(), None),
            _ => {
                // The vision tower is frozen: it runs without gradient and is never recomputed.
                let embeds = match &image_embeds {
                    Some(e) => e.shallow_clone(),
                    None => tch::no_grad(|| model.image_embeds(&batch.pixel_values, &batch.image_grid_thw, true))?,
                };
                let (f, pass) = model.forward_checkpointed_with_image_embeds(&batch, Some(&embeds), text_ck, true)?;
                (f.pooled(Pooling::All)?, Some(pass))
            }
        };
        let vl = VlInput::pooled(features);
        let seeds: Vec<u64> = (0..b).map(|j| i as u64 * b + j).collect();
        let loss = heads.loss(&CondInput { vl: &vl, sensor: &sensor, state: None }, &actions, &seeds, true)?;
        loss.backward();
        if let Some(pass) = pass {
            pass.backward(&model)?;
        }
        opt.step(1.0)?;
        last_loss = loss.double_value(&[]);
        Ok(())
    })?;
    let tokens = if runs_llm { batch.input_ids.size()[1] } else { 0 };
    Ok(StepResult { ms, lora_params, heads_params, loss: last_loss, tokens })
}
