//! The one linear layer: every Qwen2.5-VL projection (frozen, loaded, with a slot for an adapter
//! such as LoRA) and the policy heads' trainable `torch.nn.Linear` layers.

use tch::{nn, Tensor};

/// Something added to a linear layer's output, such as a LoRA update `B(A(dropout(x))) * s`.
pub trait LinearAdapter: Send + std::any::Any {
    /// The adapter's contribution for input `x` (same leading dims as the layer's input).
    fn delta(&self, x: &Tensor, train: bool) -> Tensor;
    /// For downcasting to the concrete adapter type (merge, save).
    fn as_any(&self) -> &dyn std::any::Any;
    /// Mutable downcast.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// `y = x W^T + b (+ adapter(x))`, with the weight named by its module path.
pub struct Linear {
    /// Module path without `.weight`: the transformers>=4.52 layout for the VLM
    /// (e.g. `model.language_model.layers.0.self_attn.q_proj`), the VarStore path for the heads.
    pub path: String,
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`, if the layer has one.
    pub bias: Option<Tensor>,
    /// Optional adapter whose output is added to the layer's.
    pub adapter: Option<Box<dyn LinearAdapter>>,
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linear")
            .field("path", &self.path)
            .field("weight", &self.weight)
            .field("bias", &self.bias)
            .field("adapter", &self.adapter.is_some())
            .finish()
    }
}

impl Linear {
    /// `torch.nn.Linear(inp, out)`: trainable `weight` and `bias` created under `p`, uniform in
    /// +-1/sqrt(in) like PyTorch.
    pub fn new(p: nn::Path, inp: i64, out: i64) -> Self {
        let b = 1.0 / (inp as f64).sqrt();
        let init = nn::Init::Uniform { lo: -b, up: b };
        Self::in_path(&p, p.var("weight", &[out, inp], init), Some(p.var("bias", &[out], init)))
    }

    /// A layer without adapter over `weight` and `bias`, named by the VarStore path `p`.
    pub fn in_path(p: &nn::Path, weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { path: p.components().collect::<Vec<_>>().join("."), weight, bias, adapter: None }
    }

    /// Input features.
    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }

    /// Output features.
    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    /// Forward pass in the input's dtype (weights are cast when they differ, e.g. bf16 compute).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let kind = x.kind();
        let w = if self.weight.kind() == kind { self.weight.shallow_clone() } else { self.weight.to_kind(kind) };
        let b = self.bias.as_ref().map(|b| if b.kind() == kind { b.shallow_clone() } else { b.to_kind(kind) });
        let y = x.linear(&w, b.as_ref());
        match &self.adapter {
            Some(a) => y + a.delta(x, train),
            None => y,
        }
    }
}

/// Models whose linear layers can be visited, for adapter injection, merging and saving.
pub trait VisitLinears {
    /// Calls `f` on every linear layer, in a fixed order.
    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear));
}
