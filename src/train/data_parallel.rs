//! The loop's data-parallel pieces (see [`crate::dist`]): which samples of an optimizer step a
//! rank computes, and the one bucketed all-reduce of the trainable gradients per step.
//!
//! Sharding: a step's batch (`micro_batch x accumulation x world` samples of the epoch's shared
//! order) is cut into global micro-batches of `micro_batch x world` samples (the last one
//! shorter), and each is split into `world` contiguous parts whose sizes differ by at most one:
//! rank r computes part r of each. So the ranks' shards are disjoint, every sample is seen once
//! per epoch, one rank's micro-batch j together with the others' is the single-process
//! micro-batch j of `micro_batch x world` samples, and no sample is padded or dropped: each part's
//! mean loss is scaled by its share of the step's batch, so the summed gradients are exactly
//! those of the step's mean loss, whatever the split (a part may even be empty: the rank then
//! makes an idle pass, so that collectives inside passes still pair up).

use tch::{Device, Kind, Tensor};

use crate::dist::{Group, ReduceOp};

use super::error::TrainError;
use super::optim::{set_grad, MicroBatch};

/// Bytes of gradients per all-reduce (PyTorch DDP's default bucket size).
pub const BUCKET_BYTES: usize = 25 << 20;

/// Rank `rank`'s part of each global micro-batch of a step batch of `len` samples (see the
/// module doc; a part may be empty); with `world` 1 they are the single-process micro-batches.
pub fn rank_micro_batches(len: usize, micro_batch: usize, rank: usize, world: usize) -> Vec<MicroBatch> {
    let global = (micro_batch * world).max(1);
    (0..len)
        .step_by(global)
        .map(|start| {
            let g = global.min(len - start);
            let range = start + rank * g / world..start + (rank + 1) * g / world;
            MicroBatch { loss_scale: range.len() as f64 / len as f64, range }
        })
        .collect()
}

/// Sums the trainable parameters' gradients over the ranks, in buckets of [`BUCKET_BYTES`]
/// (a parameter without a gradient here contributes zeros), and writes the sum back as every
/// rank's gradient; a parameter no rank has a gradient for keeps none. Frozen parameters
/// (`requires_grad` false) are left out. Returns the number of all-reduces issued.
pub fn all_reduce_gradients(group: &Group, params: &mut [Tensor]) -> Result<u64, TrainError> {
    let mut trainable: Vec<&mut Tensor> = params.iter_mut().filter(|p| p.requires_grad()).collect();
    let mut buckets: Vec<Vec<usize>> = vec![Vec::new()];
    let mut bytes = 0usize;
    for (i, p) in trainable.iter().enumerate() {
        let b = p.numel() * 4;
        if bytes > 0 && bytes + b > BUCKET_BYTES {
            buckets.push(Vec::new());
            bytes = 0;
        }
        buckets.last_mut().expect("one bucket").push(i);
        bytes += b;
    }
    let mut issued = 0;
    for bucket in buckets.iter().filter(|b| !b.is_empty()) {
        let device = trainable[bucket[0]].device();
        let flat = tch::no_grad(|| {
            let mut parts: Vec<Tensor> = Vec::with_capacity(bucket.len() + 1);
            let mut present = Vec::with_capacity(bucket.len());
            for &i in bucket {
                let p = &trainable[i];
                let g = p.grad();
                present.push(f32::from(u8::from(g.defined())));
                parts.push(if g.defined() {
                    g.to_kind(Kind::Float).to_device(device).flatten(0, -1)
                } else {
                    Tensor::zeros([p.numel() as i64], (Kind::Float, device))
                });
            }
            parts.push(Tensor::from_slice(&present).to_device(device));
            Tensor::cat(&parts, 0)
        });
        let mut reduced = [flat];
        group.all_reduce(&mut reduced, ReduceOp::Sum).map_err(TrainError::from)?;
        issued += 1;
        let [flat] = reduced;
        let n_grads: i64 = bucket.iter().map(|&i| trainable[i].numel() as i64).sum();
        let present = Vec::<f32>::try_from(flat.narrow(0, n_grads, bucket.len() as i64).to_device(Device::Cpu))
            .unwrap_or_default();
        let mut offset = 0i64;
        for (k, &i) in bucket.iter().enumerate() {
            let p = &mut trainable[i];
            let numel = p.numel() as i64;
            if present.get(k).copied().unwrap_or(0.0) > 0.0 {
                let g = p.grad();
                let sum = flat.narrow(0, offset, numel).view(p.size().as_slice());
                if g.defined() {
                    tch::no_grad(|| g.shallow_clone().copy_(&sum));
                } else {
                    let mut fresh = sum.to_kind(p.kind()).copy();
                    set_grad(p, &mut fresh)?;
                }
            }
            offset += numel;
        }
    }
    Ok(issued)
}

#[cfg(test)]
mod tests {
    use super::rank_micro_batches;

    fn ranges(len: usize, micro: usize, rank: usize, world: usize) -> Vec<(usize, usize)> {
        rank_micro_batches(len, micro, rank, world).into_iter().map(|m| (m.range.start, m.range.end)).collect()
    }

    #[test]
    fn shards_are_disjoint_cover_the_step_and_scale_to_its_mean() {
        for (len, micro, world) in [(8, 2, 2), (7, 2, 2), (5, 3, 2), (1, 1, 2), (9, 2, 3), (3, 4, 4)] {
            let mut seen = vec![0; len];
            let mut scale = 0.0;
            for rank in 0..world {
                for mb in rank_micro_batches(len, micro, rank, world) {
                    assert!(mb.range.len() <= micro, "{len} {micro} {world}: {mb:?}");
                    scale += mb.loss_scale;
                    for i in mb.range {
                        seen[i] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{len} {micro} {world}: {seen:?}");
            assert!((scale - 1.0).abs() < 1e-12);
        }
        // One rank: the single-process split.
        assert_eq!(ranges(7, 3, 0, 1), [(0, 3), (3, 6), (6, 7)]);
        // Two ranks, micro-batch 2: global micro-batches of 4, halves of each.
        assert_eq!(ranges(8, 2, 0, 2), [(0, 2), (4, 6)]);
        assert_eq!(ranges(8, 2, 1, 2), [(2, 4), (6, 8)]);
        // Uneven last step: 5 samples, micro-batch 2 over 2 ranks; 3 samples over 4 ranks.
        assert_eq!(ranges(5, 2, 0, 2), [(0, 2), (4, 4)]);
        assert_eq!(ranges(5, 2, 1, 2), [(2, 4), (4, 5)]);
        assert_eq!(ranges(3, 4, 0, 4), [(0, 0)]);
        assert_eq!(ranges(3, 4, 3, 4), [(2, 3)]);
    }
}
