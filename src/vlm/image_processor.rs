//! Qwen2-VL's image processor: `smart_resize` to multiples of `patch * merge` within
//! [min_pixels, max_pixels], antialiased bicubic resize on uint8 (as the fast processor does on
//! CPU), rescale + normalize with the CLIP mean/std, temporal duplication and patch flattening.

use std::path::Path;

use tch::{Kind, Tensor};

use super::error::{Result, VlmError};
use crate::dataset::episode::RgbImage;

/// CLIP mean used by Qwen2-VL.
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// CLIP standard deviation used by Qwen2-VL.
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Image processor settings (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// Lower bound on resized `height * width`.
    pub min_pixels: i64,
    /// Upper bound on resized `height * width`.
    pub max_pixels: i64,
    /// Spatial patch size.
    pub patch_size: i64,
    /// Patches merged per side.
    pub merge_size: i64,
    /// Frames per temporal patch (a still image is repeated).
    pub temporal_patch_size: i64,
    /// Per-channel mean (0..1 scale).
    pub image_mean: [f64; 3],
    /// Per-channel std (0..1 scale).
    pub image_std: [f64; 3],
}

impl Default for ImageProcessor {
    fn default() -> Self {
        ImageProcessor {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }
}

/// One processed image.
#[derive(Debug)]
pub struct ProcessedImage {
    /// Flattened patches `[t*h*w, C*T*P*P]` (f32), in the processor's block-major order.
    pub pixel_values: Tensor,
    /// `[t, h, w]` in patches.
    pub grid_thw: [i64; 3],
}

/// The `(height, width)` Qwen2-VL resizes an image to: multiples of `factor`, area within
/// `[min_pixels, max_pixels]`, aspect ratio kept as well as possible (Python rounding).
pub fn smart_resize(height: i64, width: i64, factor: i64, min_pixels: i64, max_pixels: i64) -> Result<(i64, i64)> {
    if height <= 0 || width <= 0 {
        return Err(VlmError::Image { what: format!("{width}x{height}"), msg: "empty image".into() });
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > 200.0 {
        return Err(VlmError::Image {
            what: format!("{width}x{height}"),
            msg: format!("absolute aspect ratio must be smaller than 200, got {}", h.max(w) / h.min(w)),
        });
    }
    let mut hb = ((h / f).round_ties_even() * f) as i64;
    let mut wb = ((w / f).round_ties_even() * f) as i64;
    if hb * wb > max_pixels {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        hb = factor.max(((h / beta / f).floor() * f) as i64);
        wb = factor.max(((w / beta / f).floor() * f) as i64);
    } else if hb * wb < min_pixels {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        hb = ((h * beta / f).ceil() * f) as i64;
        wb = ((w * beta / f).ceil() * f) as i64;
    }
    Ok((hb, wb))
}

/// Decodes a PNG or JPEG file to RGB8.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let img = image::open(path)
        .map_err(|e| VlmError::Image { what: path.display().to_string(), msg: e.to_string() })?
        .to_rgb8();
    Ok(RgbImage { width: img.width(), height: img.height(), data: img.into_raw() })
}

impl ImageProcessor {
    /// Settings from a model directory's `preprocessor_config.json` when it exists (defaults
    /// otherwise), with optional overrides of min/max pixels.
    pub fn from_model_dir(dir: &Path, min_pixels: Option<i64>, max_pixels: Option<i64>) -> Result<Self> {
        let mut p = ImageProcessor::default();
        let path = dir.join("preprocessor_config.json");
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|error| VlmError::Io { path: path.clone(), error })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| VlmError::Config { path: path.clone(), msg: format!("invalid JSON: {e}") })?;
            let int = |k: &str| v.get(k).and_then(serde_json::Value::as_i64);
            let size = v.get("size");
            let size_int = |k: &str| size.and_then(|s| s.get(k)).and_then(serde_json::Value::as_i64);
            if let Some(x) = int("min_pixels").or_else(|| size_int("shortest_edge")) {
                p.min_pixels = x;
            }
            if let Some(x) = int("max_pixels").or_else(|| size_int("longest_edge")) {
                p.max_pixels = x;
            }
            if let Some(x) = int("patch_size") {
                p.patch_size = x;
            }
            if let Some(x) = int("merge_size") {
                p.merge_size = x;
            }
            if let Some(x) = int("temporal_patch_size") {
                p.temporal_patch_size = x;
            }
            let triple = |k: &str| -> Result<Option<[f64; 3]>> {
                match v.get(k) {
                    None | Some(serde_json::Value::Null) => Ok(None),
                    Some(a) => {
                        let vals: Option<Vec<f64>> =
                            a.as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect());
                        match vals {
                            Some(vals) if vals.len() == 3 => Ok(Some([vals[0], vals[1], vals[2]])),
                            _ => Err(VlmError::Config { path: path.clone(), msg: format!("`{k}` must be 3 numbers") }),
                        }
                    }
                }
            };
            if let Some(m) = triple("image_mean")? {
                p.image_mean = m;
            }
            if let Some(s) = triple("image_std")? {
                p.image_std = s;
            }
        }
        if let Some(x) = min_pixels {
            p.min_pixels = x;
        }
        if let Some(x) = max_pixels {
            p.max_pixels = x;
        }
        if p.min_pixels <= 0 || p.max_pixels < p.min_pixels {
            return Err(VlmError::Config {
                path,
                msg: format!("need 0 < min_pixels <= max_pixels, got {} and {}", p.min_pixels, p.max_pixels),
            });
        }
        Ok(p)
    }

    /// The resized image as uint8 `[3, height, width]`.
    pub fn resize(&self, img: &RgbImage) -> Result<Tensor> {
        let (w, h) = (img.width as i64, img.height as i64);
        if img.data.len() as i64 != w * h * 3 {
            return Err(VlmError::Image {
                what: format!("{w}x{h} frame"),
                msg: format!("expected {} RGB8 bytes, found {}", w * h * 3, img.data.len()),
            });
        }
        let (rh, rw) = smart_resize(h, w, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)?;
        // HWC bytes viewed as NCHW (channels-last strides), as torchvision sees a decoded image.
        let x = Tensor::from_slice(&img.data).reshape([1, h, w, 3]).permute([0, 3, 1, 2]);
        let x = if (rh, rw) == (h, w) { x } else { x.f_internal_upsample_bicubic2d_aa([rh, rw], false, None, None)? };
        Ok(x.squeeze_dim(0).contiguous())
    }

    /// The patch grid `[1, h, w]` of a `width` x `height` image (what [`ImageProcessor::preprocess`]
    /// gives it), without reading pixels.
    pub fn grid(&self, width: u32, height: u32) -> Result<[i64; 3]> {
        let (rh, rw) = smart_resize(
            height as i64,
            width as i64,
            self.patch_size * self.merge_size,
            self.min_pixels,
            self.max_pixels,
        )?;
        Ok([1, rh / self.patch_size, rw / self.patch_size])
    }

    /// Resizes, normalizes and flattens one RGB8 image into patches.
    pub fn preprocess(&self, img: &RgbImage) -> Result<ProcessedImage> {
        let x = self.resize(img)?;
        let (rh, rw) = (x.size()[1], x.size()[2]);
        let mean: Vec<f32> = self.image_mean.iter().map(|m| (m * 255.0) as f32).collect();
        let std: Vec<f32> = self.image_std.iter().map(|s| (s * 255.0) as f32).collect();
        let x = (x.to_kind(Kind::Float) - Tensor::from_slice(&mean).view([3, 1, 1]))
            / Tensor::from_slice(&std).view([3, 1, 1]);
        let (p, m, t) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (gh, gw) = (rh / p, rw / p);
        let patches = x
            .reshape([3, gh / m, m, p, gw / m, m, p])
            .permute([1, 4, 2, 5, 0, 3, 6])
            .unsqueeze(5)
            .expand([gh / m, gw / m, m, m, 3, t, p, p], false)
            .reshape([gh * gw, 3 * t * p * p]);
        Ok(ProcessedImage { pixel_values: patches, grid_thw: [1, gh, gw] })
    }
}
