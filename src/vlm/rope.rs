//! Multimodal RoPE: the 3D position ids of transformers' `get_rope_index` (text tokens count up
//! on all three axes; image tokens get temporal/row/column positions offset by the text before
//! them) and the rotary tables of the text decoder.

use tch::{Kind, Tensor};

use super::error::{Result, VlmError};

/// 3D positions `[3][len]` (temporal, height, width) for one unpadded sequence in which each run
/// of `image_token_id` tokens is one image of `grids` (in order, `[t, h, w]` in patches).
pub fn rope_index(
    input_ids: &[i64],
    image_token_id: i64,
    grids: &[[i64; 3]],
    spatial_merge_size: i64,
) -> Result<[Vec<i64>; 3]> {
    let m = spatial_merge_size;
    let mut out: [Vec<i64>; 3] = [Vec::with_capacity(input_ids.len()), Vec::new(), Vec::new()];
    let mut pos = 0i64;
    let mut i = 0usize;
    let mut images = grids.iter();
    while i < input_ids.len() {
        if input_ids[i] != image_token_id {
            for axis in out.iter_mut() {
                axis.push(pos);
            }
            pos += 1;
            i += 1;
            continue;
        }
        let run = input_ids[i..].iter().take_while(|&&t| t == image_token_id).count();
        let &[t, h, w] = images
            .next()
            .ok_or_else(|| VlmError::Input(format!("more image token runs than the {} image grid(s)", grids.len())))?;
        let (lh, lw) = (h / m, w / m);
        if (t * lh * lw) as usize != run {
            return Err(VlmError::Input(format!(
                "image token run of {run} at position {i} does not match grid {:?} ({} tokens)",
                [t, h, w],
                t * lh * lw
            )));
        }
        for ti in 0..t {
            for y in 0..lh {
                for x in 0..lw {
                    out[0].push(pos + ti);
                    out[1].push(pos + y);
                    out[2].push(pos + x);
                }
            }
        }
        pos += lh.max(lw);
        i += run;
    }
    if images.next().is_some() {
        return Err(VlmError::Input(format!("{} image grid(s) but fewer image token runs in the prompt", grids.len())));
    }
    Ok(out)
}

/// M-RoPE tables: `cos`, `sin` `[batch, len, head_dim]` in `kind` for position ids `[3, batch,
/// len]`, the frequency bands split by `mrope_section` across the temporal/height/width axes.
pub fn mrope_cos_sin(
    position_ids: &Tensor,
    head_dim: i64,
    theta: f64,
    mrope_section: [i64; 3],
    kind: Kind,
) -> (Tensor, Tensor) {
    let device = position_ids.device();
    let exps = Tensor::arange_start_step(0, head_dim, 2, (Kind::Float, device)) / (head_dim as f64);
    let inv_freq = Tensor::from(theta as f32).to_device(device).pow(&exps).reciprocal();
    // [3, b, l, head_dim/2]
    let freqs = position_ids.to_kind(Kind::Float).unsqueeze(-1) * inv_freq;
    let recompose = |f: Tensor| {
        let mut parts = Vec::with_capacity(3);
        let mut start = 0;
        for (axis, &len) in mrope_section.iter().enumerate() {
            parts.push(f.get(axis as i64).narrow(-1, start, len));
            start += len;
        }
        let half = Tensor::cat(&parts, -1);
        Tensor::cat(&[&half, &half], -1).to_kind(kind)
    };
    (recompose(freqs.cos()), recompose(freqs.sin()))
}
