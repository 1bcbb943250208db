//! [`Vl`]: the VL model with its LoRA and what computing its features live needs (dataset,
//! processor, cache keys, where its base weights are).

use std::collections::HashMap;
use std::sync::Arc;

use sha2::Digest;
use tch::{Device, Kind, Tensor};

use super::data::{instruction, vl_batch_of, VlNeed};
use super::features::Store;
use crate::dataset::reader::Dataset;
use crate::train::cache::{cache_key, CacheKey, FeatureCache, KeyInput};
use crate::train::error::TrainError;
use crate::vlm::grad_checkpoint::Checkpointing;
use crate::vlm::lora::lora_parameters;
use crate::vlm::prompt::chat_prompt;
use crate::vlm::{CheckpointedPass, Pooling, Qwen25VL, TrainCheckpointing, VlBatch, VlProcessor};

type Result<T> = std::result::Result<T, TrainError>;

const EMBEDS: &str = "embeds";

/// Name prefix of the vision tower's weights.
const VISION_PREFIX: &str = "model.visual.";

/// Which base VL weights wait in host memory (the rest are on the training device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HostWeights {
    /// None.
    None,
    /// The vision tower (`vision` mode on an accelerator, between cache misses).
    VisionTower,
    /// All of them (`features` mode's offload during cached epochs).
    All,
}

/// Cache-key inputs and the keys computed so far: vision keys by sample, features keys by
/// sample under `features_adapter`.
pub(super) struct Keys {
    /// Identity of the base model.
    pub(super) base_model_id: String,
    /// Compute dtype (`f32` or `bf16`).
    pub(super) dtype: String,
    /// Processor settings.
    pub(super) processor_json: serde_json::Value,
    /// The pooling of the features (part of their key).
    pub(super) pooling: Pooling,
    vision: HashMap<usize, CacheKey>,
    features_adapter: String,
    features: HashMap<usize, CacheKey>,
}

impl Keys {
    /// Keys of the base model `base_model_id` in `dtype`, with processor settings `processor_json`
    /// and features pooled by `pooling`.
    pub(super) fn new(
        base_model_id: String,
        dtype: String,
        processor_json: serde_json::Value,
        pooling: Pooling,
    ) -> Self {
        Self {
            base_model_id,
            dtype,
            processor_json,
            pooling,
            vision: HashMap::new(),
            features_adapter: String::new(),
            features: HashMap::new(),
        }
    }

    /// The cache key of sample `i` of `ds` for `kind` (`vision`: no adapter, no prompt;
    /// `features`: the given adapter hash and the chat prompt).
    pub(super) fn sample(&self, ds: &Dataset, i: usize, kind: &str, adapter: &str) -> Result<CacheKey> {
        let cams = ds.index.cameras.len();
        let images: Vec<&[u8]> = (0..cams).map(|c| ds.jpeg(i, c)).collect::<std::result::Result<_, _>>()?;
        let prompt = if kind == "features" { chat_prompt(cams, instruction(ds, i)) } else { String::new() };
        // Features pooled otherwise than `all` (the keys before pooling was a setting) are another kind.
        let kind = match (kind, self.pooling) {
            ("features", p) if p != Pooling::All => format!("features/{}", p.name()),
            (k, _) => k.to_string(),
        };
        Ok(cache_key(&KeyInput {
            kind: &kind,
            base_model: &self.base_model_id,
            dtype: &self.dtype,
            adapter,
            processor: &self.processor_json,
            prompt: &prompt,
            images: &images,
        }))
    }

    /// [`Keys::sample`], computed once per sample (vision) or once per sample and adapter
    /// (features): a key hashes every image of the sample.
    fn memo(&mut self, ds: &Dataset, i: usize, kind: &str, adapter: &str) -> Result<CacheKey> {
        let features = kind == "features";
        if features && self.features_adapter != adapter {
            self.features_adapter = adapter.to_string();
            self.features.clear();
        }
        let memo = if features { &self.features } else { &self.vision };
        if let Some(&key) = memo.get(&i) {
            return Ok(key);
        }
        let key = self.sample(ds, i, kind, adapter)?;
        let memo = if features { &mut self.features } else { &mut self.vision };
        memo.insert(i, key);
        Ok(key)
    }
}

/// The VL model with LoRA, its inputs and where its base weights are.
pub(super) struct Vl {
    pub(super) vlm: Qwen25VL,
    /// The training device.
    pub(super) device: Device,
    pub(super) ds: Arc<Dataset>,
    pub(super) processor: Arc<VlProcessor>,
    pub(super) keys: Keys,
    pub(super) checkpointing: Checkpointing,
    /// Which base weights are in host memory now.
    pub(super) host: HostWeights,
}

/// The only tensor of a cache entry.
pub(super) fn only_tensor(entry: Vec<(String, Tensor)>) -> Tensor {
    entry.into_iter().next().map(|(_, t)| t).expect("one tensor per entry")
}

impl Vl {
    /// [`Keys::sample`] memoized.
    pub(super) fn memo_key(&mut self, i: usize, kind: &str, adapter: &str) -> Result<CacheKey> {
        self.keys.memo(&self.ds, i, kind, adapter)
    }

    /// Hash of the current LoRA weights (the features cache's adapter version).
    pub(super) fn adapter_hash(&mut self) -> String {
        let mut h = sha2::Sha256::new();
        for (name, t) in lora_parameters(&mut self.vlm) {
            h.update(name.as_bytes());
            let v = Vec::<f32>::try_from(t.detach().to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1))
                .unwrap_or_default();
            for x in v {
                h.update(x.to_le_bytes());
            }
        }
        hex::encode(&h.finalize()[..12])
    }

    pub(super) fn set_lora_trainable(&mut self, on: bool) {
        for (_, t) in lora_parameters(&mut self.vlm) {
            let _ = t.f_set_requires_grad(on);
        }
    }

    /// Moves the base weights named by `which` to `device` in place (`param.data =
    /// param.data.to(device)`, as `nn.Module.to` does): every holder of these tensors sees the move.
    fn move_weights(&mut self, device: Device, which: impl Fn(&str) -> bool) {
        for (name, mut t) in self.vlm.named_tensors() {
            if which(&name) && t.device() != device {
                let moved = t.to_device(device);
                t.set_data(&moved);
            }
        }
    }

    /// Moves every base VL weight to host memory.
    pub(super) fn offload_all(&mut self) {
        self.move_weights(Device::Cpu, |_| true);
        self.host = HostWeights::All;
    }

    /// Moves the vision tower's weights to host memory (on an accelerator).
    pub(super) fn offload_vision_tower(&mut self) {
        self.move_weights(Device::Cpu, |name| name.starts_with(VISION_PREFIX));
        self.host = HostWeights::VisionTower;
    }

    /// Puts the base VL weights back on the training device if they were all offloaded.
    pub(super) fn back_to_device(&mut self) {
        if self.host == HostWeights::All {
            let device = self.device;
            self.move_weights(device, |_| true);
            self.host = HostWeights::None;
        }
    }

    /// Cached vision embeddings of sample `i` (its images decoded and embedded on a miss only).
    /// A `vision` store pins them (every step needs them); a `features` store uses them in
    /// refresh epochs and rebuilds and lets the disk budget evict them.
    pub(super) fn vision_embeds(&mut self, store: &mut Store, i: usize) -> Result<Tensor> {
        let key = self.memo_key(i, "vision", "none")?;
        if store.pin_vision {
            store.cache.pin(key);
        }
        if let Some(t) = store.cache.get(&key) {
            return Ok(only_tensor(t));
        }
        let b = vl_batch_of(&self.ds, &self.processor, &[i], VlNeed::Images)?.expect("images asked for");
        if self.host == HostWeights::VisionTower {
            let device = self.device;
            self.move_weights(device, |name| name.starts_with(VISION_PREFIX));
            self.host = HostWeights::None;
        }
        let e = tch::no_grad(|| self.vlm.image_embeds(&b.pixel_values, &b.image_grid_thw, false))?;
        let cpu = e.to_device(Device::Cpu);
        store.cache.put(key, &[(EMBEDS.to_string(), cpu.shallow_clone())])?;
        store.vision_built += 1;
        Ok(cpu)
    }

    /// Refuses, before anything is written, a vision cache that cannot fit: every sample's embeddings
    /// (pinned for the whole run) against `cache.disk_budget_mb`, the missing ones against the
    /// free space of the cache folder's disk.
    pub(super) fn check_vision_cache_fits(&mut self, cache: &FeatureCache) -> Result<()> {
        let v = &self.vlm.config.vision;
        let unit = v.spatial_merge_size * v.spatial_merge_size;
        let mut tokens = 0i64;
        for c in &self.ds.index.cameras {
            let g = self.processor.image.grid(c.width, c.height)?;
            tokens += g[0] * g[1] * g[2] / unit;
        }
        let per_sample = (tokens * v.out_hidden_size) as u64 * self.vlm.kind().elt_size_in_bytes() as u64 + 512;
        let n = self.ds.len();
        let mut missing = 0u64;
        for i in 0..n {
            let key = self.memo_key(i, "vision", "none")?;
            missing += u64::from(!cache.contains(&key));
        }
        let gb = |b: u64| format!("{:.2} GB", b as f64 / 1e9);
        let need = format!(
            "the vision cache of this dataset needs about {} ({n} samples x {} of embeddings)",
            gb(n as u64 * per_sample),
            gb(per_sample)
        );
        if let Some(budget) = cache.disk_budget_bytes() {
            if n as u64 * per_sample > budget {
                return Err(TrainError::invalid(
                    "cache.mode=vision",
                    format!("{need}, over cache.disk_budget_mb ({}): raise the budget, or use cache.mode=features (a few KB per sample) or off", gb(budget)),
                ));
            }
        }
        let free = cache.free_disk_bytes().map_err(TrainError::io("read the free space of", cache.dir()))?;
        if missing * per_sample > free {
            return Err(TrainError::invalid(
                "cache.mode=vision",
                format!("{need}, {missing} of them still to write, but {} has {} free: free space, point cache.dir elsewhere, or use cache.mode=features or off", cache.dir().display(), gb(free)),
            ));
        }
        Ok(())
    }

    /// A VL `batch` of `idx` with, when there is a `store`, the vision embeddings of `idx` from it.
    pub(super) fn with_embeds(
        &mut self,
        store: Option<&mut Store>,
        idx: &[usize],
        batch: Option<VlBatch>,
    ) -> Result<(VlBatch, Option<Tensor>)> {
        let batch = batch.ok_or_else(|| {
            TrainError::invalid("micro-batch data", "has no VL inputs (expected them outside cached epochs)")
        })?;
        let Some(store) = store else {
            return Ok((batch, None));
        };
        let embeds = idx.iter().map(|&i| self.vision_embeds(store, i)).collect::<Result<Vec<_>>>()?;
        Ok((batch, Some(Tensor::cat(&embeds, 0))))
    }

    /// [`Vl::features_of`] the inputs of `idx`: with a `store` (`vision` and `features` modes;
    /// the vision tower is frozen, so its embeddings are exact) the token ids and positions from
    /// the cameras' frame sizes (no image decoded) with the cached vision embeddings; in `off`
    /// mode the decoded and processed images.
    pub(super) fn live_features(
        &mut self,
        store: Option<&mut Store>,
        idx: &[usize],
        train: bool,
    ) -> Result<(Tensor, Option<CheckpointedPass>)> {
        let need = if store.is_some() { VlNeed::Text } else { VlNeed::Images };
        let batch = vl_batch_of(&self.ds, &self.processor, idx, need)?;
        let (batch, embeds) = self.with_embeds(store, idx, batch)?;
        self.features_of(&batch, embeds, train)
    }

    /// Pooled features `[B, hidden]` of `idx` on the CPU, computed live in one batch without
    /// gradients.
    pub(super) fn live_features_nograd(&mut self, store: Option<&mut Store>, idx: &[usize]) -> Result<Tensor> {
        Ok(self.live_features(store, idx, false)?.0.to_device(Device::Cpu))
    }

    /// Pooled VL features `[B, hidden]` (f32) of `batch` (with cached image `embeds` when
    /// given) and the current LoRA, computed live; `train` keeps the graph and LoRA dropout.
    /// With gradient checkpointing in training, the returned pass must be completed after the
    /// loss's backward.
    pub(super) fn features_of(
        &mut self,
        batch: &VlBatch,
        embeds: Option<Tensor>,
        train: bool,
    ) -> Result<(Tensor, Option<CheckpointedPass>)> {
        self.back_to_device();
        let (ck, pooling) = (self.checkpointing, self.keys.pooling);
        let run = |vlm: &Qwen25VL| -> Result<(Tensor, Option<CheckpointedPass>)> {
            let (f, pass) = match (&embeds, train && ck != Checkpointing::OFF) {
                (Some(e), true) => {
                    let (f, p) = vlm.forward_checkpointed_with_image_embeds(batch, Some(e), ck, true)?;
                    (f, Some(p))
                }
                (Some(e), false) => (vlm.forward_with_image_embeds(batch, Some(e), train)?, None),
                (None, true) => {
                    let (f, p) = vlm.forward_checkpointed(
                        batch,
                        TrainCheckpointing { vision: Checkpointing::OFF, text: ck },
                        true,
                    )?;
                    (f, Some(p))
                }
                (None, false) => (vlm.forward(batch, train)?, None),
            };
            Ok((f.pooled(pooling)?, pass))
        };
        if train {
            run(&self.vlm)
        } else {
            tch::no_grad(|| run(&self.vlm))
        }
    }
}
