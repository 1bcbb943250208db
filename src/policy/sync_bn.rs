//! Synchronised BatchNorm for data-parallel training (what torch's `SyncBatchNorm` does), without
//! custom autograd functions, which tch cannot define.
//!
//! Forward: each BatchNorm layer all-reduces its per-channel sums `S1 = sum x`, `S2 = sum x^2`
//! and count over the ranks and normalises with the global mean and (biased) variance; the
//! running statistics move with the global ones (unbiased variance), so they stay identical on
//! every rank. The global sums enter the graph as leaves, so the backward of the local loss
//! stops at them. [`SyncBatchNorm::complete_backward`] then adds the gradient that flows through
//! the statistics, layer by layer from the last: the leaves' gradients are all-reduced (the
//! derivative of the whole batch's loss with respect to the global sums) and back-propagated
//! through this rank's own sums (retained graph). That backward also reaches the earlier layers'
//! leaves, so each layer's gradient is complete when its turn comes. The result equals
//! BatchNorm over the union of the ranks' micro-batches in one process.
//!
//! Every rank must make the same collectives: one forward and one backward all-reduce per layer
//! and micro-batch. A rank without samples in a micro-batch joins them with
//! [`SyncBatchNorm::idle_pass`].

use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor};

use crate::dist::{DistError, Group, ReduceOp};

/// One layer's statistics of the current pass.
struct Recorded {
    /// This rank's sums `[2, C]` (f64, in the graph).
    local: Tensor,
    /// The global sums `[2, C]` (f64 leaf).
    global: Tensor,
}

/// The synchronisation shared by a model's BatchNorm layers; see the module doc.
pub struct SyncBatchNorm {
    group: Arc<Group>,
    /// Channels of each layer, in forward order (for idle passes).
    channels: Vec<i64>,
    pass: Mutex<(Vec<Recorded>, Option<DistError>)>,
}

impl std::fmt::Debug for SyncBatchNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SyncBatchNorm({:?}, channels {:?})", self.group, self.channels)
    }
}

impl SyncBatchNorm {
    /// For layers of `channels` (in forward order) over `group`.
    pub fn new(group: Arc<Group>, channels: Vec<i64>) -> Self {
        Self { group, channels, pass: Mutex::new((Vec::new(), None)) }
    }

    /// Training-mode BatchNorm of `x [B, C, L]` (f32) with the ranks' global statistics (see the
    /// module doc); updates the running statistics (momentum 0.1). A failed all-reduce is kept
    /// for [`SyncBatchNorm::take_error`] and `x` normalised by its local statistics instead.
    pub fn forward(&self, x: &Tensor, weight: &Tensor, bias: &Tensor, running: (&Tensor, &Tensor), eps: f64) -> Tensor {
        let c = x.size()[1];
        let xd = x.to_kind(Kind::Double);
        let local = Tensor::stack(
            &[
                xd.sum_dim_intlist([0i64, 2].as_slice(), false, Kind::Double),
                xd.square().sum_dim_intlist([0i64, 2].as_slice(), false, Kind::Double),
            ],
            0,
        );
        let count = (x.size()[0] * x.size()[2]) as f64;
        let (global, n) = match self.reduce(&local.detach(), count, running) {
            Ok((global, n)) => (global.set_requires_grad(true), n),
            Err(e) => {
                self.pass.lock().expect("not poisoned").1.get_or_insert(e);
                (local.detach().set_requires_grad(true), count)
            }
        };
        let mean = global.get(0) / n;
        let var = (global.get(1) / n - mean.square()).clamp_min(0.0);
        let inv = (var + eps).rsqrt();
        let shape = [1, c, 1];
        let y = (xd - mean.view(shape)) * inv.view(shape);
        self.pass.lock().expect("not poisoned").0.push(Recorded { local, global });
        y.to_kind(x.kind()) * weight.view(shape) + bias.view(shape)
    }

    /// The global sums `[2, C]` and count of this rank's `local` sums `[2, C]` of `count`
    /// values per channel, with the running statistics moved to the global ones.
    fn reduce(&self, local: &Tensor, count: f64, running: (&Tensor, &Tensor)) -> Result<(Tensor, f64), DistError> {
        let c = local.size()[1];
        let mut reduced = [Tensor::cat(
            &[local.flatten(0, -1), Tensor::from_slice(&[count]).to_kind(Kind::Double).to_device(local.device())],
            0,
        )];
        self.group.all_reduce(&mut reduced, ReduceOp::Sum)?;
        let [r] = reduced;
        let n = r.double_value(&[2 * c]);
        let global = r.narrow(0, 0, 2 * c).view([2, c]);
        tch::no_grad(|| {
            let mean = global.get(0) / n;
            let var = (global.get(1) / n - mean.square()).clamp_min(0.0);
            let unbiased = var * (n / (n - 1.0).max(1.0));
            let (mut rm, mut rv) = (running.0.shallow_clone(), running.1.shallow_clone());
            rm.copy_(&(&rm * 0.9 + mean.to_kind(Kind::Float).to_device(rm.device()) * 0.1));
            rv.copy_(&(&rv * 0.9 + unbiased.to_kind(Kind::Float).to_device(rv.device()) * 0.1));
        });
        Ok((global.detach(), n))
    }

    /// The error of a failed all-reduce in the last forward, if any (then the pass is void).
    pub fn take_error(&self) -> Option<DistError> {
        self.pass.lock().expect("not poisoned").1.take()
    }

    /// After the local loss's backward (with its graph kept): adds the gradient through the
    /// global statistics, from the last layer to the first (see the module doc), and ends the pass.
    pub fn complete_backward(&self) -> Result<(), DistError> {
        let recorded = std::mem::take(&mut self.pass.lock().expect("not poisoned").0);
        for r in recorded.iter().rev() {
            let g = r.global.grad();
            let g = if g.defined() { g } else { r.global.zeros_like() };
            let mut total = [g.detach().copy()];
            self.group.all_reduce(&mut total, ReduceOp::Sum)?;
            let [total] = total;
            let through_stats = (&r.local * total).sum(Kind::Double);
            if let Err(e) = backward_keep_graph(&through_stats) {
                return Err(DistError::Collective {
                    op: "synchronised BatchNorm backward",
                    rank: self.group.rank(),
                    reason: e,
                });
            }
        }
        Ok(())
    }

    /// Joins one micro-batch's collectives (every layer's forward and backward all-reduce) with
    /// no samples; the layers' `running` statistics (in forward order) move with the others'
    /// batch, as on every rank.
    pub fn idle_pass(&self, running: &[(Tensor, Tensor)]) -> Result<(), DistError> {
        for (&c, (rm, rv)) in self.channels.iter().zip(running) {
            let _ = self.reduce(&Tensor::zeros([2, c], (Kind::Double, rm.device())), 0.0, (rm, rv))?;
        }
        for &c in self.channels.iter().rev() {
            let mut z = [Tensor::zeros([2, c], (Kind::Double, tch::Device::Cpu))];
            self.group.all_reduce(&mut z, ReduceOp::Sum)?;
        }
        Ok(())
    }

    /// Drops what a pass recorded (after an error).
    pub fn discard_pass(&self) {
        let mut p = self.pass.lock().expect("not poisoned");
        p.0.clear();
    }
}

extern "C" {
    fn vla_backward_keep_graph(
        out: *mut torch_sys::C_tensor,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> std::ffi::c_int;
}

/// `out.backward(retain_graph=True)` of a scalar through the shim (csrc/torch_shim.cpp).
pub fn backward_keep_graph(out: &Tensor) -> Result<(), String> {
    let mut err = [0 as std::ffi::c_char; 512];
    let mut t = out.shallow_clone();
    // SAFETY: `t` is a live tensor; `err` is a writable buffer of its length.
    let rc = unsafe { vla_backward_keep_graph(t.as_mut_ptr(), err.as_mut_ptr(), err.len()) };
    if rc == 1 {
        return Ok(());
    }
    // SAFETY: the shim NUL-terminates the message it writes into the zeroed buffer.
    Err(unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned())
}
