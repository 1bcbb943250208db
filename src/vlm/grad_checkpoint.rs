//! Segment-wise gradient checkpointing for a stack of layers (decoder layers, vision blocks).
//!
//! tch has no custom autograd functions, so checkpointing is done by hand:
//! 1. [`run_layers`] runs the stack under `no_grad` in segments of `every` layers, keeping only
//!    each segment's input, and returns a detached output that requires grad;
//! 2. the caller builds its loss on [`SegmentRun::output`] and calls `backward()` on it;
//! 3. [`SegmentRun::backward`] walks the segments in reverse: it re-runs each with grad from a
//!    detached copy of its saved input, back-propagates the output gradient into it (which
//!    accumulates the parameters' gradients) and passes the input's gradient on; the stack's
//!    input gradient finally continues into whatever graph produced the input.
//!
//! Random layers (dropout) see the same random numbers in the recomputation: each layer runs
//! after `tch::manual_seed` with a seed drawn at the start of the forward pass. The same seeding
//! is used without checkpointing and for every segment length, so all modes produce identical
//! gradients.
//!
//! Layers that need per-forward context (rotary tables, masks, window indices) capture it in
//! the closure `layer(index, x)`. Stacks chain: when a stack's input was computed from another
//! checkpointed stack's output (vision tower -> merger -> decoder), calling the later run's
//! `backward` first fills the earlier run's output gradient; then call the earlier one's.
//!
//! Caveat: the seeding uses libtorch's process-wide default generators, so other threads that
//! draw random numbers concurrently with a forward/backward pass perturb (and are perturbed
//! by) the replay; run random work of one model from one thread.

use std::ffi::{c_char, c_int, CStr};

use tch::{Device, Kind, Tensor};

use crate::oom_injection::{self, Point};

extern "C" {
    fn vla_backward_with_grad(
        out: *mut torch_sys::C_tensor,
        grad: *mut torch_sys::C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Errors of the checkpointed backward pass.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// `backward` was called before any gradient reached the stack's output.
    #[error("the checkpointed stack's output has no gradient: call backward() on a loss computed from SegmentRun::output() first")]
    NoOutputGrad,
    /// The configuration is unusable.
    #[error("gradient checkpointing: `every` must be at least 1 layer per segment")]
    ZeroSegment,
    /// libtorch raised an error during back-propagation.
    #[error("back-propagation failed: {0}")]
    Backward(String),
    /// tch reported an error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// `out.backward(grad)`: accumulates into every leaf that requires grad the gradient of
/// `sum(out * grad)`, without materialising that product (libtorch call through the shim).
pub fn backward_with_grad(out: &Tensor, grad: &Tensor) -> Result<(), CheckpointError> {
    let mut err = [0 as c_char; 512];
    let (mut out, mut grad) = (out.shallow_clone(), grad.shallow_clone());
    // SAFETY: both pointers are live tch tensors (at::Tensor*) for the duration of the call;
    // `err` is a writable buffer of the length passed.
    let rc = unsafe { vla_backward_with_grad(out.as_mut_ptr(), grad.as_mut_ptr(), err.as_mut_ptr(), err.len()) };
    if rc == 1 {
        Ok(())
    } else {
        // SAFETY: the shim NUL-terminates within the (zeroed) buffer.
        Err(CheckpointError::Backward(unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned()))
    }
}

/// How a layer stack is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpointing {
    /// Recompute segments in the backward pass instead of keeping their activations.
    pub enabled: bool,
    /// Layers per segment (`k` in "checkpoint every k layers"); at least 1.
    pub every: usize,
}

impl Checkpointing {
    /// No checkpointing (segments of one layer, for the RNG bookkeeping only).
    pub const OFF: Self = Self { enabled: false, every: 1 };

    /// Checkpoint every `every` layers.
    pub fn every(every: usize) -> Self {
        Self { enabled: true, every }
    }
}

/// A forward pass through a layer stack; finish it with [`SegmentRun::backward`].
pub struct SegmentRun {
    checkpointed: bool,
    segments: Vec<(usize, usize)>,
    seeds: Vec<i64>,
    resume_seed: i64,
    inputs: Vec<Tensor>,
    input: Tensor,
    output: Tensor,
}

fn draw_seeds(n: usize) -> Result<Vec<i64>, CheckpointError> {
    let t = Tensor::f_randint(1 << 62, [n as i64], (Kind::Int64, Device::Cpu))?;
    Ok(Vec::<i64>::try_from(&t)?)
}

/// Layers `start..end` on `x`, each after its seed; `point` names the pass (forward or
/// recompute) for fault injection.
fn run_segment<F: Fn(usize, &Tensor) -> Tensor>(
    layer: &F,
    (start, end): (usize, usize),
    seeds: &[i64],
    x: &Tensor,
    point: Point,
) -> Tensor {
    (start..end).fold(x.shallow_clone(), |h, i| {
        oom_injection::reach(point);
        tch::manual_seed(seeds[i]);
        layer(i, &h)
    })
}

/// Runs `layer(0..n_layers)` on `x` as configured by `ck`. With checkpointing the returned
/// run's [`output`](SegmentRun::output) is a detached leaf requiring grad; without it the
/// output carries the full graph. In both cases compute the loss from `output()`, call its
/// `backward()`, then [`SegmentRun::backward`] with the same `layer` closure.
pub fn run_layers<F: Fn(usize, &Tensor) -> Tensor>(
    x: &Tensor,
    n_layers: usize,
    ck: Checkpointing,
    layer: &F,
) -> Result<SegmentRun, CheckpointError> {
    if ck.every == 0 {
        return Err(CheckpointError::ZeroSegment);
    }
    let segments: Vec<(usize, usize)> =
        (0..n_layers).step_by(ck.every).map(|s| (s, (s + ck.every).min(n_layers))).collect();
    let mut seeds = draw_seeds(n_layers + 2)?;
    let resume_seed = seeds.pop().expect("drawn");
    let after_forward = seeds.pop().expect("drawn");
    let mut inputs = Vec::new();
    let mut h = x.shallow_clone();
    for seg in &segments {
        if ck.enabled {
            h = h.detach();
            inputs.push(h.shallow_clone());
            h = tch::no_grad(|| run_segment(layer, *seg, &seeds, &h, Point::Forward));
        } else {
            h = run_segment(layer, *seg, &seeds, &h, Point::Forward);
        }
    }
    tch::manual_seed(after_forward);
    let output = if ck.enabled { h.detach().set_requires_grad(true) } else { h };
    Ok(SegmentRun { checkpointed: ck.enabled, segments, seeds, resume_seed, inputs, input: x.shallow_clone(), output })
}

impl SegmentRun {
    /// The stack's output (last layer's result).
    pub fn output(&self) -> &Tensor {
        &self.output
    }

    /// Completes back-propagation through the stack after the loss's `backward()`: with
    /// checkpointing, recomputes each segment in reverse and back-propagates into the layers'
    /// parameters and then into the graph that produced the stack's input; without it, the
    /// loss's backward already did everything. Call it with the closure given to [`run_layers`].
    pub fn backward<F: Fn(usize, &Tensor) -> Tensor>(self, layer: &F) -> Result<(), CheckpointError> {
        if !self.checkpointed {
            tch::manual_seed(self.resume_seed);
            return Ok(());
        }
        let mut grad = self.output.grad();
        if !grad.defined() {
            return Err(CheckpointError::NoOutputGrad);
        }
        let input_needs_grad = self.input.requires_grad();
        for (idx, saved) in self.inputs.into_iter().enumerate().rev() {
            let needs_input_grad = idx > 0 || input_needs_grad;
            let xin = saved.detach().set_requires_grad(needs_input_grad);
            let out = tch::with_grad(|| run_segment(layer, self.segments[idx], &self.seeds, &xin, Point::Recompute));
            if out.requires_grad() {
                backward_with_grad(&out, &grad)?;
            }
            drop(out);
            if needs_input_grad {
                let g = xin.grad();
                grad = if g.defined() { g } else { xin.zeros_like() };
            }
        }
        if input_needs_grad {
            // Continues into the graph that produced the input (or accumulates into it if it
            // is a leaf), as autograd would have done.
            backward_with_grad(&self.input, &grad)?;
        }
        tch::manual_seed(self.resume_seed);
        Ok(())
    }
}
