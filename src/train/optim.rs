//! AdamW over named fp32 master parameters in groups (VL LoRA, heads, sensor encoder, ...), with
//! exportable state, global grad-norm clipping, the warmup + cosine schedule and the
//! gradient-accumulation plan. Same update as `torch.optim.AdamW(foreach=False)`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use regex::Regex;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Errors of the optimizer.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// The configuration is unusable.
    #[error("optimizer config: {0}")]
    Config(String),
    /// A parameter does not fit the optimizer's rules.
    #[error("parameter `{name}`: {reason}")]
    Param { name: String, reason: String },
    /// A gradient holds NaN or infinity; nothing was updated.
    #[error("gradient of `{name}` is not finite (NaN or inf); no parameter was updated")]
    NonFiniteGrad { name: String },
    /// Imported state does not match the optimizer's parameters.
    #[error("optimizer state: {0}")]
    State(String),
}

/// One parameter group: its learning rate and weight decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Group name, e.g. `vl_lora`, `heads`, `sensor_encoder`.
    pub name: String,
    /// Peak learning rate (the schedule multiplies it).
    pub lr: f64,
    /// Decoupled weight decay for the group's parameters that may decay.
    pub weight_decay: f64,
}

/// AdamW hyper-parameters shared by every group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Regexes over parameter names; a match gets no weight decay (biases and norms).
    pub no_decay: Vec<String>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, no_decay: default_no_decay() }
    }
}

/// Default no-decay rules: every bias (`*.bias`, `*_bias` such as attention's `in_proj_bias`),
/// any `*norm*.weight` (LayerNorm, RMSNorm), `bn*` / `ln*` modules' weights, and learned
/// positional embeddings (`pos_embed`, `position_embedding(s)`). Weights a name cannot tell
/// apart (the heads' BatchNorm is `sensor_encoder.conv.1.weight`) come with
/// [`NamedParam::decay`] false from their owner.
pub fn default_no_decay() -> Vec<String> {
    vec![
        r"(^|[._])bias$".into(),
        r"(?i)norm[^.]*\.weight$".into(),
        r"(^|\.)(bn|ln)[^.]*\.weight$".into(),
        r"(^|\.)(pos_embed|position_embeddings?)(\.weight)?$".into(),
    ]
}

/// A trainable parameter handed to the optimizer: a leaf fp32 tensor with `requires_grad`.
pub struct NamedParam {
    /// Unique name (e.g. `heads.fusion.weight`); used in saved state.
    pub name: String,
    /// The [`GroupConfig::name`] it belongs to.
    pub group: String,
    /// The parameter (shares storage with the model's tensor).
    pub tensor: Tensor,
    /// The owner's weight-decay flag: false never decays; true decays unless a
    /// [`AdamWConfig::no_decay`] rule matches the name.
    pub decay: bool,
}

struct Slot {
    name: String,
    group: usize,
    decay: bool,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

/// AdamW moments and per-parameter step counts, for saving and exact resume.
pub struct AdamWState {
    /// `(parameter name, first moment, second moment)`, in the optimizer's parameter order.
    pub moments: Vec<(String, Tensor, Tensor)>,
    /// Updates applied to each parameter so far (bias correction uses them).
    pub steps: BTreeMap<String, u64>,
}

/// AdamW (decoupled weight decay, Loshchilov & Hutter) with parameter groups; fp32 moments.
pub struct AdamW {
    cfg: AdamWConfig,
    groups: Vec<GroupConfig>,
    slots: Vec<Slot>,
}

impl AdamW {
    /// Builds the optimizer. Every parameter must be a fp32 leaf with `requires_grad`, have a
    /// unique name and name an existing group.
    pub fn new(cfg: AdamWConfig, groups: Vec<GroupConfig>, params: Vec<NamedParam>) -> Result<Self, OptimError> {
        let bad = |s: String| Err(OptimError::Config(s));
        if !(0.0..1.0).contains(&cfg.beta1) || !(0.0..1.0).contains(&cfg.beta2) {
            return bad(format!("betas ({}, {}) must be in [0, 1)", cfg.beta1, cfg.beta2));
        }
        if !(cfg.eps > 0.0 && cfg.eps.is_finite()) {
            return bad(format!("eps {} must be positive and finite", cfg.eps));
        }
        let rules = cfg
            .no_decay
            .iter()
            .map(|r| Regex::new(r).map_err(|e| OptimError::Config(format!("no_decay rule `{r}`: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut group_index = HashMap::new();
        for (i, g) in groups.iter().enumerate() {
            if !(g.lr >= 0.0 && g.lr.is_finite() && g.weight_decay >= 0.0 && g.weight_decay.is_finite()) {
                return bad(format!(
                    "group `{}`: lr {} and weight_decay {} must be finite and >= 0",
                    g.name, g.lr, g.weight_decay
                ));
            }
            if group_index.insert(g.name.clone(), i).is_some() {
                return bad(format!("group `{}` is defined twice", g.name));
            }
        }
        let mut seen = HashSet::new();
        let mut slots = Vec::with_capacity(params.len());
        for p in params {
            let perr = |reason: String| Err(OptimError::Param { name: p.name.clone(), reason });
            if !seen.insert(p.name.clone()) {
                return perr("name used twice".into());
            }
            let Some(&group) = group_index.get(&p.group) else {
                return perr(format!("group `{}` is not configured", p.group));
            };
            if p.tensor.kind() != Kind::Float {
                return perr(format!("master weights must be fp32, got {:?}", p.tensor.kind()));
            }
            if !p.tensor.requires_grad() {
                return perr("does not require grad".into());
            }
            let decay = p.decay && !rules.iter().any(|r| r.is_match(&p.name));
            let exp_avg = p.tensor.zeros_like().detach();
            let exp_avg_sq = p.tensor.zeros_like().detach();
            slots.push(Slot { name: p.name, group, decay, param: p.tensor, exp_avg, exp_avg_sq, step: 0 });
        }
        Ok(Self { cfg, groups, slots })
    }

    /// The groups, in configuration order.
    pub fn groups(&self) -> &[GroupConfig] {
        &self.groups
    }

    /// `(name, group name, decays?, tensor)` of every parameter, in optimizer order.
    pub fn params(&self) -> impl Iterator<Item = (&str, &str, bool, &Tensor)> {
        self.slots.iter().map(|s| (s.name.as_str(), self.groups[s.group].name.as_str(), s.decay, &s.param))
    }

    /// Whether the parameter called `name` gets weight decay (None if unknown).
    pub fn decays(&self, name: &str) -> Option<bool> {
        self.slots.iter().find(|s| s.name == name).map(|s| s.decay)
    }

    /// Each group's current learning rate for schedule factor `lr_factor`.
    pub fn lrs(&self, lr_factor: f64) -> Vec<(String, f64)> {
        self.groups.iter().map(|g| (g.name.clone(), g.lr * lr_factor)).collect()
    }

    /// Number of optimizer steps taken (the largest per-parameter count).
    pub fn steps_taken(&self) -> u64 {
        self.slots.iter().map(|s| s.step).max().unwrap_or(0)
    }

    /// Drops every parameter's gradient (`param.grad = None`, torch's default), so the next
    /// backward writes it instead of adding into zeros and a parameter that gets none is
    /// skipped by [`AdamW::step`].
    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            clear_grad(&mut s.param);
        }
    }

    /// Scales all gradients so their global L2 norm is at most `max_norm`, like
    /// `torch.nn.utils.clip_grad_norm_`; returns the norm before clipping. A non-finite gradient
    /// is an error naming the parameter (nothing is changed).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64, OptimError> {
        let grads: Vec<(&str, Tensor)> = self
            .slots
            .iter()
            .filter_map(|s| {
                let g = s.param.grad();
                g.defined().then_some((s.name.as_str(), g))
            })
            .collect();
        if grads.is_empty() {
            return Ok(0.0);
        }
        let device = grads[0].1.device();
        let norms = tch::no_grad(|| grads.iter().map(|(_, g)| g.norm().to_device(device)).collect::<Vec<_>>());
        let stacked = Tensor::stack(&norms, 0);
        // One host sync for the common case; locate the culprit only when needed.
        let total = stacked.norm();
        if !total.double_value(&[]).is_finite() {
            let bad = Vec::<f64>::try_from(stacked.to_kind(Kind::Double)).unwrap_or_default();
            let i = bad.iter().position(|n| !n.is_finite()).unwrap_or(0);
            return Err(OptimError::NonFiniteGrad { name: grads[i].0.to_string() });
        }
        tch::no_grad(|| {
            let max = Tensor::full([] as [i64; 0], max_norm, (total.kind(), device));
            let coef = (max / (&total + 1e-6)).clamp_max(1.0);
            for (_, g) in &grads {
                let mut g = g.shallow_clone();
                let _ = g.g_mul_(&coef.to_device(g.device()));
            }
            Ok(total.double_value(&[]))
        })
    }

    /// Applies one AdamW update with each group's `lr * lr_factor`. Parameters without a gradient
    /// are skipped (as torch does), and so are frozen ones (`requires_grad` false, e.g. a LoRA
    /// frozen for feature-cached epochs, whose old gradient is still defined). A non-finite
    /// gradient is an error and nothing is updated.
    pub fn step(&mut self, lr_factor: f64) -> Result<(), OptimError> {
        let grads: Vec<Option<Tensor>> = self
            .slots
            .iter()
            .map(|s| {
                let g = s.param.grad();
                (g.defined() && s.param.requires_grad()).then_some(g)
            })
            .collect();
        let present: Vec<(usize, &Tensor)> =
            grads.iter().enumerate().filter_map(|(i, g)| g.as_ref().map(|g| (i, g))).collect();
        if let Some((_, first)) = present.first() {
            let device = first.device();
            // A NaN or inf anywhere makes a gradient's sum non-finite (a sum reads the gradient
            // once and writes nothing, unlike an element-wise isfinite). A finite gradient whose
            // sum overflows would overflow its square in `exp_avg_sq` anyway.
            let flags = tch::no_grad(|| {
                Tensor::stack(
                    &present.iter().map(|(_, g)| g.sum(Kind::Float).isfinite().to_device(device)).collect::<Vec<_>>(),
                    0,
                )
            });
            // One host sync; the per-parameter flags are read only when something is wrong.
            if flags.all().int64_value(&[]) == 0 {
                let ok = Vec::<bool>::try_from(flags).unwrap_or_default();
                let bad = ok.iter().position(|f| !f).map(|j| present[j].0).unwrap_or(present[0].0);
                return Err(OptimError::NonFiniteGrad { name: self.slots[bad].name.clone() });
            }
        }
        let (beta1, beta2, eps) = (self.cfg.beta1, self.cfg.beta2, self.cfg.eps);
        tch::no_grad(|| {
            for (s, g) in self.slots.iter_mut().zip(grads) {
                let Some(grad) = g else { continue };
                let group = &self.groups[s.group];
                let lr = group.lr * lr_factor;
                s.step += 1;
                if s.decay && group.weight_decay != 0.0 {
                    let _ = s.param.g_mul_scalar_(1.0 - lr * group.weight_decay);
                }
                // torch's single-tensor AdamW, in place: two temporaries per parameter.
                let _ = s.exp_avg.lerp_(&grad, 1.0 - beta1);
                let _ = s.exp_avg_sq.g_mul_scalar_(beta2);
                let _ = s.exp_avg_sq.addcmul_(&(&grad * (1.0 - beta2)), &grad);
                let bc1 = 1.0 - beta1.powi(s.step as i32);
                let bc2 = 1.0 - beta2.powi(s.step as i32);
                let step_size = lr / bc1;
                // param += -step_size * m / (sqrt(v) / sqrt(bc2) + eps); tch's addcdiv_ has no
                // `value`, so the step size divides the denominator.
                let mut denom = s.exp_avg_sq.sqrt();
                let _ = denom.g_div_scalar_(bc2.sqrt());
                let _ = denom.g_add_scalar_(eps);
                let _ = denom.g_div_scalar_(-step_size);
                let _ = s.param.addcdiv_(&s.exp_avg, &denom);
            }
        });
        Ok(())
    }

    /// Copies the moments and step counts (detached, same device) for saving.
    pub fn export_state(&self) -> AdamWState {
        AdamWState {
            moments: self.slots.iter().map(|s| (s.name.clone(), s.exp_avg.copy(), s.exp_avg_sq.copy())).collect(),
            steps: self.slots.iter().map(|s| (s.name.clone(), s.step)).collect(),
        }
    }

    /// Restores moments and step counts saved by [`AdamW::export_state`]; every parameter must be
    /// present with matching shapes, and no unknown parameter may appear.
    pub fn import_state(&mut self, state: AdamWState) -> Result<(), OptimError> {
        let mut moments: HashMap<String, (Tensor, Tensor)> =
            state.moments.into_iter().map(|(n, m, v)| (n, (m, v))).collect();
        if let Some(extra) = moments.keys().find(|k| !self.slots.iter().any(|s| &s.name == *k)) {
            return Err(OptimError::State(format!("moments for unknown parameter `{extra}`")));
        }
        let mut staged = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let (m, v) = moments
                .remove(&s.name)
                .ok_or_else(|| OptimError::State(format!("no moments for parameter `{}`", s.name)))?;
            let step = *state
                .steps
                .get(&s.name)
                .ok_or_else(|| OptimError::State(format!("no step count for parameter `{}`", s.name)))?;
            for (what, t) in [("exp_avg", &m), ("exp_avg_sq", &v)] {
                if t.size() != s.param.size() {
                    return Err(OptimError::State(format!(
                        "{what} of `{}` has shape {:?}, parameter has {:?}",
                        s.name,
                        t.size(),
                        s.param.size()
                    )));
                }
            }
            staged.push((m, v, step));
        }
        tch::no_grad(|| {
            for (s, (m, v, step)) in self.slots.iter_mut().zip(staged) {
                s.exp_avg.copy_(&m.to_kind(Kind::Float));
                s.exp_avg_sq.copy_(&v.to_kind(Kind::Float));
                s.step = step;
            }
        });
        Ok(())
    }
}

extern "C" {
    fn vla_tensor_clear_grad(
        t: *mut torch_sys::C_tensor,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> std::ffi::c_int;
    fn vla_tensor_set_grad(
        t: *mut torch_sys::C_tensor,
        grad: *mut torch_sys::C_tensor,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> std::ffi::c_int;
}

/// `t.grad = grad` through the shim (csrc/torch_shim.cpp); the error names what libtorch refused.
pub(crate) fn set_grad(t: &mut Tensor, grad: &mut Tensor) -> Result<(), OptimError> {
    let mut err = [0 as std::ffi::c_char; 256];
    // SAFETY: both are live tensors; `err` is a writable buffer of its length.
    let rc = unsafe { vla_tensor_set_grad(t.as_mut_ptr(), grad.as_mut_ptr(), err.as_mut_ptr(), err.len()) };
    if rc == 1 {
        return Ok(());
    }
    // SAFETY: the shim NUL-terminates the message it writes into the zeroed buffer.
    let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
    Err(OptimError::Config(format!("setting a gradient failed: {msg}")))
}

/// Drops `t`'s gradient through the shim (csrc/torch_shim.cpp); should libtorch refuse, the
/// gradient is zero-filled instead, which gives the same next gradient.
fn clear_grad(t: &mut Tensor) {
    let mut err = [0 as std::ffi::c_char; 256];
    // SAFETY: `t` is a live tensor; `err` is a writable buffer of its length.
    let rc = unsafe { vla_tensor_clear_grad(t.as_mut_ptr(), err.as_mut_ptr(), err.len()) };
    if rc != 1 {
        t.zero_grad();
    }
}

/// Linear warmup then cosine decay to `min_lr_ratio`, the same factor as transformers'
/// `get_cosine_with_min_lr_schedule_with_warmup` (half a cycle) up to `total_steps`; past it the
/// factor stays at the floor (transformers' would rise again). `step` counts optimizer steps
/// already taken (0 for the first update).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CosineSchedule {
    /// Steps of linear warmup from 0.
    pub warmup_steps: u64,
    /// Total optimizer steps of the run.
    pub total_steps: u64,
    /// Floor of the cosine, as a fraction of the peak learning rate.
    pub min_lr_ratio: f64,
}

impl CosineSchedule {
    /// The learning-rate factor (times each group's peak lr) for optimizer step `step`.
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let f = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (f * (1.0 - self.min_lr_ratio) + self.min_lr_ratio).max(0.0)
    }
}

/// Gradient accumulation: one optimizer step sums `accum_steps` micro-batches of `micro_batch`
/// samples; effective batch = `micro_batch * accum_steps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accumulation {
    /// Samples per forward/backward.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub accum_steps: usize,
}

/// One micro-batch of an optimizer step: which samples and how to scale its mean loss.
#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatch {
    /// Sample indices within the step's batch.
    pub range: Range<usize>,
    /// Multiply the micro-batch's *mean* loss by this before `backward()`: `len / step_batch`,
    /// so the accumulated gradient equals that of the mean loss over the whole step's batch.
    pub loss_scale: f64,
}

impl Accumulation {
    /// A plan; both numbers must be at least 1.
    pub fn new(micro_batch: usize, accum_steps: usize) -> Result<Self, OptimError> {
        if micro_batch == 0 || accum_steps == 0 {
            return Err(OptimError::Config(format!(
                "micro-batch {micro_batch} and accumulation {accum_steps} must both be >= 1"
            )));
        }
        Ok(Self { micro_batch, accum_steps })
    }

    /// Samples per optimizer step.
    pub fn effective_batch(&self) -> usize {
        self.micro_batch * self.accum_steps
    }

    /// Splits an optimizer step's `n` samples (usually `effective_batch()`, fewer for the last
    /// step of an epoch) into micro-batches of at most `micro_batch`, with loss scales.
    pub fn micro_batches(&self, n: usize) -> Vec<MicroBatch> {
        (0..n)
            .step_by(self.micro_batch)
            .map(|start| {
                let end = (start + self.micro_batch).min(n);
                MicroBatch { range: start..end, loss_scale: (end - start) as f64 / n as f64 }
            })
            .collect()
    }

    /// After an out-of-memory error: half the micro-batch, twice the accumulation, same
    /// effective batch (rounded up). None when the micro-batch is already 1.
    pub fn halved(&self) -> Option<Self> {
        (self.micro_batch > 1).then(|| {
            let micro_batch = self.micro_batch / 2;
            Self { micro_batch, accum_steps: self.effective_batch().div_ceil(micro_batch) }
        })
    }
}
