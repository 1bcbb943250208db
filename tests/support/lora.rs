//! Shared helpers of the LoRA / checkpointing tests: a model made of the fixture's linear
//! layers, a toy layer stack with per-layer context, tensor comparisons.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{nn, Device, Kind, Tensor};
use vla_finetune::vlm::linear::{Linear, VisitLinears};
use vla_finetune::vlm::peft::canonical_module_path;

pub const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora")
}

/// All linear layers of the fixture's tiny Qwen2.5-VL, in transformers' module order.
pub struct LinearModel {
    pub linears: Vec<Linear>,
}

impl VisitLinears for LinearModel {
    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        self.linears.iter_mut().for_each(f)
    }
}

impl LinearModel {
    pub fn get(&self, path: &str) -> &Linear {
        self.linears.iter().find(|l| l.path == path).unwrap_or_else(|| panic!("no linear {path}"))
    }
}

/// Builds every linear of `fixtures/lora/base` from its safetensors (on-disk layout
/// `model.layers.*` / `visual.*`, mapped to the transformers>=4.52 paths).
pub fn base_model() -> LinearModel {
    let dir = fixtures();
    let paths: Vec<String> = serde_json::from_str(&std::fs::read_to_string(dir.join("linears.json")).unwrap()).unwrap();
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("base/model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, v)| (canonical_module_path(&k), v))
        .collect();
    let linears = paths
        .into_iter()
        .map(|path| {
            let weight = tensors[&format!("{path}.weight")].shallow_clone();
            let bias = tensors.get(&format!("{path}.bias")).map(|b| b.shallow_clone());
            Linear { path, weight, bias, adapter: None }
        })
        .collect();
    LinearModel { linears }
}

/// `<path>.x` / `<path>.y` pairs from an io fixture.
pub fn read_io(path: &Path) -> HashMap<String, (Tensor, Tensor)> {
    let t: HashMap<String, Tensor> = Tensor::read_safetensors(path).unwrap().into_iter().collect();
    t.keys()
        .filter_map(|k| k.strip_suffix(".x"))
        .map(|p| (p.to_string(), (t[&format!("{p}.x")].shallow_clone(), t[&format!("{p}.y")].shallow_clone())))
        .collect()
}

/// max |a - b| / max |b|.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let num = f64::try_from((&a - &b).abs().max()).unwrap();
    let den = f64::try_from(b.abs().max()).unwrap().max(1e-30);
    num / den
}

/// A residual stack in the shape of a decoder: per layer
/// `h = h + gelu(o(tanh(q(h) + ctx[i])) * mask)`, with q = `...self_attn.q_proj`,
/// o = `...self_attn.o_proj` (LoRA targets by default) and a frozen `mlp.up_proj` in between.
pub struct ToyStack {
    pub linears: Vec<Linear>,
    pub n_layers: usize,
}

impl VisitLinears for ToyStack {
    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        self.linears.iter_mut().for_each(f)
    }
}

impl ToyStack {
    pub fn new(n_layers: usize, d: i64, seed: i64) -> Self {
        tch::manual_seed(seed);
        let mut linears = Vec::new();
        for i in 0..n_layers {
            for (name, bias) in [("self_attn.q_proj", true), ("mlp.up_proj", false), ("self_attn.o_proj", false)] {
                linears.push(Linear {
                    path: format!("model.language_model.layers.{i}.{name}"),
                    weight: Tensor::randn([d, d], (Kind::Float, Device::Cpu)) / (d as f64).sqrt(),
                    bias: bias.then(|| Tensor::randn([d], (Kind::Float, Device::Cpu)) * 0.1),
                    adapter: None,
                });
            }
        }
        Self { linears, n_layers }
    }

    /// Layer `i` with its context (`ctx[i]`: `[T, d]`, `mask`: `[B, T, 1]`).
    pub fn layer(&self, i: usize, h: &Tensor, ctx: &[Tensor], mask: &Tensor, train: bool) -> Tensor {
        let [q, up, o] = [&self.linears[3 * i], &self.linears[3 * i + 1], &self.linears[3 * i + 2]];
        let kind = h.kind();
        let a = (q.forward_t(h, train) + ctx[i].to_kind(kind)).tanh();
        let a = up.forward_t(&a, train).gelu("none");
        h + (o.forward_t(&a, train) * mask.to_kind(kind)).gelu("none")
    }
}

/// Sets every LoRA `B` (and `A`) to random non-zero values so updates and gradients matter.
pub fn randomize_lora(params: &[(String, Tensor)], seed: i64) {
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for (_, t) in params {
            let mut t = t.shallow_clone();
            t.copy_(&(Tensor::randn(t.size(), (Kind::Float, t.device())) * 0.2));
        }
    });
}

pub fn var_store() -> nn::VarStore {
    nn::VarStore::new(Device::Cpu)
}
