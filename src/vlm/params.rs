//! The scoped weight builder. Constructors ask a [`Scope`] for their tensors, norms and linear
//! layers by relative name (`scope.pp("layers").pp(i)` is `<path>.layers.<i>`, the weight-name
//! tree); the scope loads each from the [`Loader`] and records it in a [`Params`], which then
//! lists the named tensors and visits the linear layers in creation order.

use std::fmt::Display;
use std::ops::Index;

use tch::Tensor;

use super::error::{Result, VlmError};
use super::layers::RmsNorm;
use super::linear::{Linear, VisitLinears};
use super::weights::{Init, Loader};

/// Handle of a linear layer held by a [`Params`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearId(usize);

/// One recorded item, in creation order.
enum Entry {
    /// A plain tensor (norm weight, embedding) under its full name; a shallow clone of the
    /// layer's tensor, so in-place changes (`set_data`, `copy_`) show through.
    Tensor(String, Tensor),
    /// A linear layer, whose `weight` (and `bias`) are read from the layer itself.
    Linear(LinearId),
}

/// What a [`Scope`] created: every tensor by name and the linear layers, in creation order.
#[derive(Default)]
pub struct Params {
    entries: Vec<Entry>,
    linears: Vec<Linear>,
}

impl Params {
    /// Every base weight with its full name, in creation order (adapters excluded).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for entry in &self.entries {
            match entry {
                Entry::Tensor(name, t) => out.push((name.clone(), t.shallow_clone())),
                Entry::Linear(id) => {
                    let l = &self[*id];
                    out.push((format!("{}.weight", l.path), l.weight.shallow_clone()));
                    if let Some(b) = &l.bias {
                        out.push((format!("{}.bias", l.path), b.shallow_clone()));
                    }
                }
            }
        }
        out
    }

    /// Records `t` in place of the plain tensor `name` (e.g. a reduced embedding).
    pub fn replace(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let slot = self.entries.iter_mut().find_map(|e| match e {
            Entry::Tensor(n, slot) if n == name => Some(slot),
            _ => None,
        });
        let slot = slot.ok_or_else(|| VlmError::Input(format!("no recorded tensor `{name}`")))?;
        *slot = t.shallow_clone();
        Ok(())
    }
}

impl Index<LinearId> for Params {
    type Output = Linear;

    fn index(&self, id: LinearId) -> &Linear {
        &self.linears[id.0]
    }
}

impl VisitLinears for Params {
    /// In creation order.
    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        self.linears.iter_mut().for_each(f)
    }
}

/// A position in the weight-name tree: creates tensors and layers named under its path and
/// records them in a [`Params`].
pub struct Scope<'a> {
    loader: &'a mut Loader,
    params: &'a mut Params,
    path: String,
}

impl<'a> Scope<'a> {
    /// The scope `path` (e.g. `model.language_model`) recording into `params`.
    pub fn new(loader: &'a mut Loader, params: &'a mut Params, path: &str) -> Self {
        Scope { loader, params, path: path.to_string() }
    }

    /// The child scope `<path>.<name>`.
    pub fn pp(&mut self, name: impl Display) -> Scope<'_> {
        let path = self.name(name);
        Scope { loader: &mut *self.loader, params: &mut *self.params, path }
    }

    /// The full name of `name` in this scope.
    pub fn name(&self, name: impl Display) -> String {
        format!("{}.{name}", self.path)
    }

    /// The loader's target device.
    pub fn device(&self) -> tch::Device {
        self.loader.device()
    }

    /// The tensor `<path>.<name>` with `shape` (loaded, or initialized as `init`), recorded.
    pub fn tensor(&mut self, name: &str, shape: &[i64], init: Init) -> Result<Tensor> {
        let name = self.name(name);
        let t = self.loader.tensor(&name, shape, init)?;
        self.params.entries.push(Entry::Tensor(name, t.shallow_clone()));
        Ok(t)
    }

    /// The RMSNorm `<path>.<name>` of width `dim` (weight `<path>.<name>.weight`).
    pub fn norm(&mut self, name: &str, dim: i64, eps: f64) -> Result<RmsNorm> {
        let weight = self.pp(name).tensor("weight", &[dim], Init::Ones)?;
        Ok(RmsNorm { weight, eps })
    }

    /// The linear layer `<path>.<name>` with weight `[out, in]` (and bias `[out]` when `bias`),
    /// recorded; the returned handle indexes the [`Params`].
    pub fn linear(&mut self, name: &str, in_features: i64, out_features: i64, bias: bool) -> Result<LinearId> {
        let path = self.name(name);
        let weight = self.loader.tensor(&format!("{path}.weight"), &[out_features, in_features], Init::Normal)?;
        let bias =
            if bias { Some(self.loader.tensor(&format!("{path}.bias"), &[out_features], Init::Zeros)?) } else { None };
        let id = LinearId(self.params.linears.len());
        self.params.linears.push(Linear { path, weight, bias, adapter: None });
        self.params.entries.push(Entry::Linear(id));
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;
    use crate::vlm::weights::WeightSource;

    #[test]
    fn scopes_name_and_record_in_creation_order() {
        let mut loader = Loader::new(WeightSource::Random, Kind::Float, Device::Cpu).unwrap();
        let mut params = Params::default();
        let mut s = Scope::new(&mut loader, &mut params, "m");
        let embed = s.tensor("embed.weight", &[4, 2], Init::Normal).unwrap();
        let mut layers = s.pp("layers");
        let mut layer = layers.pp(0);
        layer.norm("norm", 2, 1e-6).unwrap();
        let q = layer.linear("q", 2, 3, true).unwrap();
        layer.linear("o", 3, 2, false).unwrap();
        let names: Vec<String> = params.named_tensors().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "m.embed.weight",
                "m.layers.0.norm.weight",
                "m.layers.0.q.weight",
                "m.layers.0.q.bias",
                "m.layers.0.o.weight"
            ]
        );
        assert_eq!(params[q].path, "m.layers.0.q");
        let mut visited = Vec::new();
        params.visit_linears_mut(&mut |l| visited.push(l.path.clone()));
        assert_eq!(visited, ["m.layers.0.q", "m.layers.0.o"]);
        params.replace("m.embed.weight", &Tensor::zeros([1, 2], (Kind::Float, Device::Cpu))).unwrap();
        assert_eq!(params.named_tensors()[0].1.size(), [1, 2]);
        assert_eq!(embed.size(), [4, 2]);
        assert!(params.replace("m.layers.0.q.weight", &Tensor::zeros([1], (Kind::Float, Device::Cpu))).is_err());
    }
}
