//! From raw inputs to model inputs: images + instruction -> [`VlSample`] (pixel values, grids,
//! prompt ids, 3D positions), and several samples -> one right-padded [`VlBatch`].

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::config::Config;
use super::error::{Result, VlmError};
use super::image_processor::ImageProcessor;
use super::prompt::PromptTokenizer;
use super::rope::rope_index;
use crate::dataset::episode::RgbImage;

/// One prompt with its images, ready to batch.
#[derive(Debug)]
pub struct VlSample {
    /// Token ids, image placeholders expanded.
    pub input_ids: Vec<i64>,
    /// Patches of all images `[patches, patch_dim]` (f32, CPU).
    pub pixel_values: Tensor,
    /// `[t, h, w]` per image.
    pub image_grid_thw: Vec<[i64; 3]>,
    /// 3D positions (temporal, height, width) per token.
    pub position_ids: [Vec<i64>; 3],
}

/// A batch of samples, right-padded.
#[derive(Debug)]
pub struct VlBatch {
    /// `[batch, len]` int64.
    pub input_ids: Tensor,
    /// `[batch, len]` int64, 1 for tokens and 0 for padding.
    pub attention_mask: Tensor,
    /// `[3, batch, len]` int64 (0 at padding).
    pub position_ids: Tensor,
    /// Patches of every image of every sample in order `[patches, patch_dim]` (f32).
    pub pixel_values: Tensor,
    /// `[t, h, w]` per image, in the same order.
    pub image_grid_thw: Vec<[i64; 3]>,
}

impl VlBatch {
    /// The batch on `device`.
    pub fn to_device(&self, device: Device) -> VlBatch {
        VlBatch {
            input_ids: self.input_ids.to_device(device),
            attention_mask: self.attention_mask.to_device(device),
            position_ids: self.position_ids.to_device(device),
            pixel_values: self.pixel_values.to_device(device),
            image_grid_thw: self.image_grid_thw.clone(),
        }
    }

    /// `image_grid_thw` as an int64 tensor `[images, 3]`.
    pub fn grid_tensor(&self) -> Tensor {
        let flat: Vec<i64> = self.image_grid_thw.iter().flatten().copied().collect();
        Tensor::from_slice(&flat).reshape([self.image_grid_thw.len() as i64, 3])
    }
}

/// Image processor + tokenizer of one model.
pub struct VlProcessor {
    /// Image settings.
    pub image: ImageProcessor,
    /// Tokenizer.
    pub tokenizer: PromptTokenizer,
    spatial_merge_size: i64,
}

impl VlProcessor {
    /// The processor of a model directory (`tokenizer.json`, optional `preprocessor_config.json`).
    pub fn from_model_dir(
        dir: &Path,
        config: &Config,
        min_pixels: Option<i64>,
        max_pixels: Option<i64>,
    ) -> Result<Self> {
        let image = ImageProcessor::from_model_dir(dir, min_pixels, max_pixels)?;
        let tokenizer = PromptTokenizer::from_file(&dir.join("tokenizer.json"), config)?;
        Self::new(image, tokenizer, config)
    }

    /// A processor from parts; the image settings must agree with the vision config.
    pub fn new(image: ImageProcessor, tokenizer: PromptTokenizer, config: &Config) -> Result<Self> {
        let v = &config.vision;
        if image.patch_size != v.patch_size
            || image.merge_size != v.spatial_merge_size
            || image.temporal_patch_size != v.temporal_patch_size
        {
            return Err(VlmError::Input(format!(
                "image processor patch/merge/temporal sizes ({}, {}, {}) differ from the vision config ({}, {}, {})",
                image.patch_size,
                image.merge_size,
                image.temporal_patch_size,
                v.patch_size,
                v.spatial_merge_size,
                v.temporal_patch_size
            )));
        }
        Ok(VlProcessor { image, tokenizer, spatial_merge_size: v.spatial_merge_size })
    }

    /// Processes one prompt: the images (in order) then `instruction`.
    pub fn sample(&self, images: &[RgbImage], instruction: &str) -> Result<VlSample> {
        let processed = images.iter().map(|i| self.image.preprocess(i)).collect::<Result<Vec<_>>>()?;
        let grids: Vec<[i64; 3]> = processed.iter().map(|p| p.grid_thw).collect();
        let mut sample = self.prompt(grids, instruction)?;
        if !processed.is_empty() {
            sample.pixel_values = Tensor::cat(&processed.iter().map(|p| &p.pixel_values).collect::<Vec<_>>(), 0);
        }
        Ok(sample)
    }

    /// [`VlProcessor::sample`] without pixels (`pixel_values` empty): the token ids, grids and
    /// positions for images of these (width, height), which is all a forward from cached image
    /// embeddings uses; no image is decoded or resized.
    pub fn text_sample(&self, sizes: &[(u32, u32)], instruction: &str) -> Result<VlSample> {
        let grids = sizes.iter().map(|&(w, h)| self.image.grid(w, h)).collect::<Result<Vec<_>>>()?;
        self.prompt(grids, instruction)
    }

    fn prompt(&self, grids: Vec<[i64; 3]>, instruction: &str) -> Result<VlSample> {
        let unit = self.spatial_merge_size * self.spatial_merge_size;
        let tokens: Vec<i64> = grids.iter().map(|g| g[0] * g[1] * g[2] / unit).collect();
        let input_ids = self.tokenizer.prompt_ids(&tokens, instruction)?;
        let position_ids = rope_index(&input_ids, self.tokenizer.image_token_id, &grids, self.spatial_merge_size)?;
        let patch_dim = 3 * self.image.temporal_patch_size * self.image.patch_size * self.image.patch_size;
        let pixel_values = Tensor::zeros([0, patch_dim], (Kind::Float, Device::Cpu));
        Ok(VlSample { input_ids, pixel_values, image_grid_thw: grids, position_ids })
    }

    /// Right-pads samples into one batch (pad id `<|endoftext|>`, mask 0, positions 0).
    pub fn collate(&self, samples: &[VlSample]) -> Result<VlBatch> {
        collate(samples, self.tokenizer.pad_token_id)
    }
}

/// Right-pads samples into one batch with `pad_token_id`.
pub fn collate(samples: &[VlSample], pad_token_id: i64) -> Result<VlBatch> {
    if samples.is_empty() {
        return Err(VlmError::Input("empty batch".into()));
    }
    let b = samples.len() as i64;
    let l = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let mut ids = vec![pad_token_id; samples.len() * l];
    let mut mask = vec![0i64; samples.len() * l];
    let mut pos = vec![0i64; 3 * samples.len() * l];
    for (i, s) in samples.iter().enumerate() {
        let n = s.input_ids.len();
        ids[i * l..i * l + n].copy_from_slice(&s.input_ids);
        mask[i * l..i * l + n].fill(1);
        for (axis, p) in s.position_ids.iter().enumerate() {
            if p.len() != n {
                return Err(VlmError::Input(format!("sample {i}: {} position ids for {n} tokens", p.len())));
            }
            let off = (axis * samples.len() + i) * l;
            pos[off..off + n].copy_from_slice(p);
        }
    }
    let l = l as i64;
    let pixel_values = Tensor::cat(&samples.iter().map(|s| &s.pixel_values).collect::<Vec<_>>(), 0);
    Ok(VlBatch {
        input_ids: Tensor::from_slice(&ids).reshape([b, l]),
        attention_mask: Tensor::from_slice(&mask).reshape([b, l]),
        position_ids: Tensor::from_slice(&pos).reshape([3, b, l]),
        pixel_values,
        image_grid_thw: samples.iter().flat_map(|s| s.image_grid_thw.iter().copied()).collect(),
    })
}
