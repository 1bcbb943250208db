//! LoRA adapters on the shared [`Linear`] layers, selected PEFT-style by module path.
//!
//! `y = x W^T + b + s * B(A(dropout(x)))` with `A: [r, in]` initialised like PEFT
//! (Kaiming-uniform with `a = sqrt(5)`, i.e. `U(-1/sqrt(in), 1/sqrt(in))`), `B: [out, r]` zeros,
//! and `s = alpha / r` (or `alpha / sqrt(r)` with rsLoRA). `A` and `B` are fp32 master
//! parameters registered in a tch `VarStore` (so `nn::Optimizer` and parameter groups work);
//! the update is computed in the input's dtype through explicit casts, so bf16 compute sends
//! fp32 gradients to the masters. Base weights of adapted layers are frozen.

use std::collections::HashMap;

use regex::Regex;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::linear::{Linear, LinearAdapter, VisitLinears};

/// Default `target_modules`: the LLM attention projections q/k/v/o only (the reference's
/// choice). A full-match regex because Qwen2.5-VL's vision blocks also carry MLP projections
/// that a plain suffix list could reach; it matches both the transformers>=4.52 layout
/// (`model.language_model.layers.N.self_attn.q_proj`) and the older `model.layers.N...`.
pub const DEFAULT_TARGET_REGEX: &str = r".*\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)";

/// Errors of LoRA configuration, injection and merging.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A configuration field has an unusable value.
    #[error("LoRA config field `{field}`: expected {expected}, found {found}")]
    Config {
        /// The field (PEFT name).
        field: &'static str,
        /// What is accepted.
        expected: &'static str,
        /// The offending value.
        found: String,
    },
    /// A `target_modules`/`exclude_modules` regex does not compile.
    #[error("LoRA `{field}` regex `{pattern}` is invalid: {message}")]
    Regex {
        /// `target_modules` or `exclude_modules`.
        field: &'static str,
        /// The pattern.
        pattern: String,
        /// The regex engine's message.
        message: String,
    },
    /// The targets select no linear layer of the model.
    #[error(
        "LoRA target_modules {targets} matched none of the model's {count} linear layers (for example {examples})"
    )]
    NoMatch {
        /// The targets as written.
        targets: String,
        /// Number of linear layers visited.
        count: usize,
        /// A few layer paths, to show what names look like.
        examples: String,
    },
    /// A targeted layer already carries an adapter.
    #[error("linear layer `{0}` already has an adapter")]
    AlreadyAdapted(String),
    /// The variable store lives on another device than the layer's weight.
    #[error("linear layer `{path}`: weight is on {weight:?} but the LoRA parameters' VarStore is on {store:?}")]
    Device {
        /// Layer path.
        path: String,
        /// Device of the base weight.
        weight: Device,
        /// Device of the variable store.
        store: Device,
    },
    /// Given LoRA tensors do not fit the layer.
    #[error("linear layer `{path}`: {tensor} has shape {found:?}, expected {expected:?}")]
    Shape {
        /// Layer path.
        path: String,
        /// `lora_A` or `lora_B`.
        tensor: &'static str,
        /// Expected shape.
        expected: Vec<i64>,
        /// Found shape.
        found: Vec<i64>,
    },
    /// No `A`/`B` values were given for a selected layer.
    #[error("linear layer `{0}` is selected by the LoRA config but no lora_A/lora_B values were given for it")]
    MissingTensors(String),
    /// `A`/`B` values were given for a layer the config does not select.
    #[error("LoRA values were given for `{0}`, which is not a linear layer selected by the config")]
    UnusedTensors(String),
    /// The model has no LoRA layers where some were required.
    #[error("the model has no LoRA adapters")]
    NoAdapters,
    /// libtorch reported an error.
    #[error("linear layer `{path}`: {source}")]
    Torch {
        /// Layer path.
        path: String,
        /// The tch error.
        #[source]
        source: tch::TchError,
    },
}

/// PEFT's `target_modules` / `exclude_modules`: a list of module-name suffixes (a name matches
/// when it equals an entry or ends with `.` + entry) or one regex that must match the full name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Suffix list, e.g. `["q_proj", "v_proj"]`.
    Suffixes(Vec<String>),
    /// Full-match regex, e.g. `.*language_model.*\.(q|v)_proj`.
    Regex(String),
}

impl std::fmt::Display for TargetModules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Suffixes(s) => write!(f, "{s:?}"),
            Self::Regex(r) => write!(f, "regex `{r}`"),
        }
    }
}

/// A compiled [`TargetModules`].
#[derive(Debug, Clone)]
pub enum ModuleMatcher {
    /// Suffix list.
    Suffixes(Vec<String>),
    /// Anchored regex.
    Regex(Regex),
}

impl ModuleMatcher {
    /// Compiles `targets` (`field` names it in errors).
    pub fn new(targets: &TargetModules, field: &'static str) -> Result<Self, LoraError> {
        match targets {
            TargetModules::Suffixes(s) => Ok(Self::Suffixes(s.clone())),
            TargetModules::Regex(p) => Regex::new(&format!("^(?:{p})$"))
                .map(Self::Regex)
                .map_err(|e| LoraError::Regex { field, pattern: p.clone(), message: e.to_string() }),
        }
    }

    /// Whether module path `path` is selected, with PEFT's rules.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Suffixes(s) => s.iter().any(|t| {
                path == t
                    || (path.len() > t.len()
                        && path.ends_with(t.as_str())
                        && path.as_bytes()[path.len() - t.len() - 1] == b'.')
            }),
            Self::Regex(r) => r.is_match(path),
        }
    }
}

/// LoRA hyper-parameters, named as in PEFT's `LoraConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r`.
    pub r: i64,
    /// `lora_alpha`.
    pub lora_alpha: f64,
    /// Dropout probability on the adapter's input (training only).
    pub lora_dropout: f64,
    /// Which linear layers get an adapter.
    pub target_modules: TargetModules,
    /// Layers excluded even when targeted.
    pub exclude_modules: Option<TargetModules>,
    /// rsLoRA scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    /// The reference's Stage 2 setting: r 8, alpha 16, dropout 0.05 on the LLM's q/k/v/o.
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: TargetModules::Regex(DEFAULT_TARGET_REGEX.to_string()),
            exclude_modules: None,
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    /// The output scaling `s`.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Checks rank, alpha, dropout and the regexes.
    pub fn validate(&self) -> Result<(), LoraError> {
        if self.r <= 0 {
            return Err(LoraError::Config { field: "r", expected: "a positive integer", found: self.r.to_string() });
        }
        if !self.lora_alpha.is_finite() {
            return Err(LoraError::Config {
                field: "lora_alpha",
                expected: "a finite number",
                found: self.lora_alpha.to_string(),
            });
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(LoraError::Config {
                field: "lora_dropout",
                expected: "a probability in [0, 1)",
                found: self.lora_dropout.to_string(),
            });
        }
        ModuleMatcher::new(&self.target_modules, "target_modules")?;
        if let Some(e) = &self.exclude_modules {
            ModuleMatcher::new(e, "exclude_modules")?;
        }
        Ok(())
    }

    /// Whether the layer at `path` is selected (targeted and not excluded).
    pub fn selects(&self, path: &str) -> Result<bool, LoraError> {
        let target = ModuleMatcher::new(&self.target_modules, "target_modules")?;
        let exclude = self.exclude_modules.as_ref().map(|e| ModuleMatcher::new(e, "exclude_modules")).transpose()?;
        Ok(target.matches(path) && !exclude.is_some_and(|e| e.matches(path)))
    }
}

/// A LoRA update on one linear layer; lives in [`Linear::adapter`].
pub struct LoraLayer {
    /// `lora_A.weight`, `[r, in]`, fp32 master (trainable).
    pub lora_a: Tensor,
    /// `lora_B.weight`, `[out, r]`, fp32 master (trainable).
    pub lora_b: Tensor,
    /// Output scaling `s`.
    pub scaling: f64,
    /// Dropout probability applied to the input in training.
    pub dropout: f64,
    merged: bool,
}

impl LoraLayer {
    /// Wraps existing `A` `[r, in]` and `B` `[out, r]` tensors.
    pub fn new(lora_a: Tensor, lora_b: Tensor, scaling: f64, dropout: f64) -> Self {
        Self { lora_a, lora_b, scaling, dropout, merged: false }
    }

    /// PEFT's initialisation on the CPU generator (so `tch::manual_seed` reproduces
    /// `torch.manual_seed` + `kaiming_uniform_(A, a=sqrt(5))`): `A ~ U(-1/sqrt(in), 1/sqrt(in))`
    /// `[r, in]`, `B = 0` `[out, r]`, both fp32 on the CPU.
    pub fn init_tensors(r: i64, in_features: i64, out_features: i64) -> (Tensor, Tensor) {
        let bound = 1.0 / (in_features as f64).sqrt();
        let a = Tensor::empty([r, in_features], (Kind::Float, Device::Cpu)).uniform_(-bound, bound);
        let b = Tensor::zeros([out_features, r], (Kind::Float, Device::Cpu));
        (a, b)
    }

    /// Rank `r`.
    pub fn rank(&self) -> i64 {
        self.lora_a.size()[0]
    }

    /// Whether the update is currently folded into the base weight.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// The dense update `s * B A`, `[out, in]`, fp32, without gradient.
    pub fn delta_weight(&self) -> Tensor {
        tch::no_grad(|| self.lora_b.to_kind(Kind::Float).matmul(&self.lora_a.to_kind(Kind::Float)) * self.scaling)
    }
}

fn in_kind(t: &Tensor, kind: Kind) -> Tensor {
    if t.kind() == kind {
        t.shallow_clone()
    } else {
        t.to_kind(kind)
    }
}

impl LinearAdapter for LoraLayer {
    fn delta(&self, x: &Tensor, train: bool) -> Tensor {
        if self.merged {
            let mut shape = x.size();
            if let Some(last) = shape.last_mut() {
                *last = self.lora_b.size()[0];
            }
            return Tensor::zeros(shape.as_slice(), (x.kind(), x.device()));
        }
        let kind = x.kind();
        let h = if train && self.dropout > 0.0 { x.dropout(self.dropout, true) } else { x.shallow_clone() };
        h.linear::<&Tensor>(&in_kind(&self.lora_a, kind), None).linear::<&Tensor>(&in_kind(&self.lora_b, kind), None)
            * self.scaling
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// The LoRA layer of `linear`, if it has one.
pub fn lora_of(linear: &Linear) -> Option<&LoraLayer> {
    linear.adapter.as_ref().and_then(|a| a.as_any().downcast_ref::<LoraLayer>())
}

/// Mutable access to the LoRA layer of `linear`, if it has one.
pub fn lora_of_mut(linear: &mut Linear) -> Option<&mut LoraLayer> {
    linear.adapter.as_mut().and_then(|a| a.as_any_mut().downcast_mut::<LoraLayer>())
}

/// A linear layer selected by a [`LoraConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Module path.
    pub path: String,
    /// Input features.
    pub in_features: i64,
    /// Output features.
    pub out_features: i64,
}

/// The layers `cfg` selects, in visit order. Errors when nothing matches or a selected layer
/// already has an adapter. Does not modify the model.
pub fn select_targets(model: &mut dyn VisitLinears, cfg: &LoraConfig) -> Result<Vec<Target>, LoraError> {
    cfg.validate()?;
    let target = ModuleMatcher::new(&cfg.target_modules, "target_modules")?;
    let exclude = cfg.exclude_modules.as_ref().map(|e| ModuleMatcher::new(e, "exclude_modules")).transpose()?;
    let mut all = Vec::new();
    let mut selected = Vec::new();
    let mut adapted = None;
    model.visit_linears_mut(&mut |l| {
        all.push(l.path.clone());
        if target.matches(&l.path) && !exclude.as_ref().is_some_and(|e| e.matches(&l.path)) {
            if l.adapter.is_some() && adapted.is_none() {
                adapted = Some(l.path.clone());
            }
            selected.push(Target {
                path: l.path.clone(),
                in_features: l.in_features(),
                out_features: l.out_features(),
            });
        }
    });
    if let Some(p) = adapted {
        return Err(LoraError::AlreadyAdapted(p));
    }
    if selected.is_empty() {
        let examples = all.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
        return Err(LoraError::NoMatch { targets: cfg.target_modules.to_string(), count: all.len(), examples });
    }
    Ok(selected)
}

/// Registers `A`/`B` under `root` as `<path>.lora_A.weight` / `<path>.lora_B.weight`
/// (PEFT's names without the `base_model.model.` prefix) and returns the trainable handles.
fn register(root: &nn::Path, path: &str, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor), LoraError> {
    let module = path.split('.').fold(root.clone(), |p, c| p.sub(c));
    let err = |source| LoraError::Torch { path: path.to_string(), source };
    let a = module.sub("lora_A").f_var_copy("weight", a).map_err(err)?;
    let b = module.sub("lora_B").f_var_copy("weight", b).map_err(err)?;
    Ok((a, b))
}

/// Adds LoRA to every layer `cfg` selects, with PEFT's initialisation (`B = 0`, so outputs are
/// unchanged). Parameters are created in `root`'s VarStore (which must be on the model's
/// device); base weights and biases of adapted layers are frozen. Returns the adapted paths.
pub fn inject_lora(model: &mut dyn VisitLinears, cfg: &LoraConfig, root: &nn::Path) -> Result<Vec<String>, LoraError> {
    let targets = select_targets(model, cfg)?;
    let mut init = HashMap::new();
    for t in &targets {
        init.insert(t.path.clone(), LoraLayer::init_tensors(cfg.r, t.in_features, t.out_features));
    }
    inject_with(model, cfg, root, &targets, init)
}

/// Adds LoRA with given `A`/`B` values (any float dtype, any device; copied into fp32 masters)
/// to the selected layers; every selected layer must have an entry in `tensors` of the right
/// shape. Checks everything before modifying the model.
pub fn inject_lora_with(
    model: &mut dyn VisitLinears,
    cfg: &LoraConfig,
    root: &nn::Path,
    tensors: HashMap<String, (Tensor, Tensor)>,
) -> Result<Vec<String>, LoraError> {
    let targets = select_targets(model, cfg)?;
    inject_with(model, cfg, root, &targets, tensors)
}

fn inject_with(
    model: &mut dyn VisitLinears,
    cfg: &LoraConfig,
    root: &nn::Path,
    targets: &[Target],
    mut tensors: HashMap<String, (Tensor, Tensor)>,
) -> Result<Vec<String>, LoraError> {
    for t in targets {
        let Some((a, b)) = tensors.get(&t.path) else {
            return Err(LoraError::MissingTensors(t.path.clone()));
        };
        for (name, tensor, expected) in [("lora_A", a, [cfg.r, t.in_features]), ("lora_B", b, [t.out_features, cfg.r])]
        {
            if tensor.size() != expected {
                return Err(LoraError::Shape {
                    path: t.path.clone(),
                    tensor: name,
                    expected: expected.to_vec(),
                    found: tensor.size(),
                });
            }
        }
    }
    if let Some(extra) = tensors.keys().filter(|k| !targets.iter().any(|t| &t.path == *k)).min() {
        return Err(LoraError::UnusedTensors(extra.clone()));
    }
    let store = root.device();
    let mut wrong_device = None;
    model.visit_linears_mut(&mut |l| {
        if wrong_device.is_none() && tensors.contains_key(&l.path) && l.weight.device() != store {
            wrong_device = Some(LoraError::Device { path: l.path.clone(), weight: l.weight.device(), store });
        }
    });
    if let Some(e) = wrong_device {
        return Err(e);
    }
    let mut registered = HashMap::new();
    for t in targets {
        let (a, b) = tensors.remove(&t.path).expect("checked above");
        registered.insert(t.path.clone(), register(root, &t.path, &a, &b)?);
    }
    let scaling = cfg.scaling();
    let mut done = Vec::new();
    model.visit_linears_mut(&mut |l| {
        if let Some((a, b)) = registered.remove(&l.path) {
            // Frozen base; `f_` because a non-leaf tensor cannot change the flag (it then
            // keeps it, which only matters to whoever built that graph).
            for t in std::iter::once(&l.weight).chain(l.bias.as_ref()) {
                if t.requires_grad() {
                    let _ = t.f_set_requires_grad(false);
                }
            }
            l.adapter = Some(Box::new(LoraLayer::new(a, b, scaling, cfg.lora_dropout)));
            done.push(l.path.clone());
        }
    });
    Ok(done)
}

/// The trainable LoRA tensors in visit order, named like PEFT without the
/// `base_model.model.` prefix (`<path>.lora_A.weight`, `<path>.lora_B.weight`).
pub fn lora_parameters(model: &mut dyn VisitLinears) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    model.visit_linears_mut(&mut |l| {
        if let Some(lora) = lora_of(l) {
            out.push((format!("{}.lora_A.weight", l.path), lora.lora_a.shallow_clone()));
            out.push((format!("{}.lora_B.weight", l.path), lora.lora_b.shallow_clone()));
        }
    });
    out
}

fn fold(l: &mut Linear, sign: f64) -> Result<(), LoraError> {
    let Some(lora) = lora_of(l) else { return Ok(()) };
    let delta = lora.delta_weight();
    let path = l.path.clone();
    tch::no_grad(|| -> Result<(), tch::TchError> {
        let merged = (l.weight.f_to_kind(Kind::Float)? + delta * sign).f_to_kind(l.weight.kind())?;
        l.weight.f_copy_(&merged)
    })
    .map_err(|source| LoraError::Torch { path, source })
}

/// Folds every LoRA update into its base weight in place (`W += s B A`, rounded once to the
/// weight's dtype); the adapters stay attached but contribute nothing until [`unmerge_lora`].
/// Returns the number of layers merged.
pub fn merge_lora(model: &mut dyn VisitLinears) -> Result<usize, LoraError> {
    let mut n = 0;
    let mut result = Ok(());
    model.visit_linears_mut(&mut |l| {
        if result.is_err() || lora_of(l).is_none_or(|x| x.merged) {
            return;
        }
        result = fold(l, 1.0);
        if result.is_ok() {
            lora_of_mut(l).expect("has lora").merged = true;
            n += 1;
        }
    });
    result.map(|_| n)
}

/// Undoes [`merge_lora`] (`W -= s B A`). Exact in fp32; with bf16 weights the round trip
/// carries bf16 rounding, as in PEFT. Returns the number of layers unmerged.
pub fn unmerge_lora(model: &mut dyn VisitLinears) -> Result<usize, LoraError> {
    let mut n = 0;
    let mut result = Ok(());
    model.visit_linears_mut(&mut |l| {
        if result.is_err() || !lora_of(l).is_some_and(|x| x.merged) {
            return;
        }
        result = fold(l, -1.0);
        if result.is_ok() {
            lora_of_mut(l).expect("has lora").merged = false;
            n += 1;
        }
    });
    result.map(|_| n)
}

/// Merges every LoRA update into its base weight and removes the adapters (inference).
/// Returns the number of layers merged.
pub fn merge_and_unload(model: &mut dyn VisitLinears) -> Result<usize, LoraError> {
    let n = merge_lora(model)?;
    model.visit_linears_mut(&mut |l| {
        if lora_of(l).is_some() {
            l.adapter = None;
        }
    });
    Ok(n)
}
