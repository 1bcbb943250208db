//! Camera messages: checked without decoding, decoded to RGB8.

use crate::dataset::cdr::{self, MsgType, RosMessage};
use crate::dataset::episode::{ImageError, RgbImage};

/// Validates an image message without decoding its pixels.
pub(super) fn check_camera_message(t: MsgType, data: &[u8]) -> Result<(), &'static str> {
    match t {
        MsgType::Image => {
            let v = cdr::ImageView::parse(data).map_err(|_| "decode_error")?;
            let bpp = bytes_per_pixel(&v.encoding).ok_or("unsupported_encoding")?;
            if v.width == 0
                || v.height == 0
                || (v.step as u64) < v.width as u64 * bpp as u64
                || v.data.len() as u64 != v.step as u64 * v.height as u64
            {
                return Err("image_size_mismatch");
            }
            Ok(())
        }
        MsgType::CompressedImage => {
            let c = cdr::CompressedImage::decode(data).map_err(|_| "decode_error")?;
            let f = c.format.to_ascii_lowercase();
            if f.contains("jpeg") || f.contains("jpg") || f.contains("png") {
                Ok(())
            } else {
                Err("unsupported_encoding")
            }
        }
        _ => Err("type_mismatch"),
    }
}

fn bytes_per_pixel(encoding: &str) -> Option<usize> {
    match encoding {
        "rgb8" | "bgr8" => Some(3),
        "mono8" => Some(1),
        "rgba8" | "bgra8" => Some(4),
        _ => None,
    }
}

/// Decodes an Image or CompressedImage message to RGB8.
pub fn decode_image(t: MsgType, data: &[u8]) -> Result<RgbImage, ImageError> {
    match t {
        MsgType::Image => {
            let v = cdr::ImageView::parse(data)?;
            let bpp = bytes_per_pixel(&v.encoding).ok_or_else(|| ImageError::Encoding(v.encoding.clone()))?;
            let (w, h, step) = (v.width as usize, v.height as usize, v.step as usize);
            if step < w * bpp || v.data.len() != step * h {
                return Err(ImageError::RawSize {
                    width: v.width,
                    height: v.height,
                    encoding: v.encoding.clone(),
                    step: v.step,
                    need: step * h,
                    have: v.data.len(),
                });
            }
            let mut out = Vec::with_capacity(w * h * 3);
            for row in v.data.chunks_exact(step) {
                let row = &row[..w * bpp];
                match v.encoding.as_str() {
                    "rgb8" => out.extend_from_slice(row),
                    "bgr8" => row.chunks_exact(3).for_each(|p| out.extend_from_slice(&[p[2], p[1], p[0]])),
                    "mono8" => row.iter().for_each(|&g| out.extend_from_slice(&[g, g, g])),
                    "rgba8" => row.chunks_exact(4).for_each(|p| out.extend_from_slice(&p[..3])),
                    _ => row.chunks_exact(4).for_each(|p| out.extend_from_slice(&[p[2], p[1], p[0]])),
                }
            }
            Ok(RgbImage { width: v.width, height: v.height, data: out })
        }
        MsgType::CompressedImage => {
            let c = cdr::CompressedImage::decode(data)?;
            let img = ::image::load_from_memory(&c.data)
                .map_err(|source| ImageError::Compressed { format: c.format.clone(), source })?
                .to_rgb8();
            Ok(RgbImage { width: img.width(), height: img.height(), data: img.into_raw() })
        }
        other => Err(ImageError::NotImage(other.name())),
    }
}
