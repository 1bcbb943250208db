//! Segment checkpointing gives the same gradients as plain autograd: every LoRA parameter and
//! the upstream (input-producing) parameter, f32, relative error <= 1e-5, for several segment
//! sizes, with per-layer context, and with dropout (the recomputation replays the RNG).

use crate::support::lora::*;
use crate::support::rng_lock;
use tch::{Device, Kind, Tensor};
use vla_finetune::vlm::grad_checkpoint::{run_layers, CheckpointError, Checkpointing};
use vla_finetune::vlm::lora::{inject_lora, lora_parameters, LoraConfig};

const N_LAYERS: usize = 5;
const D: i64 = 16;

struct Grads {
    loss: f64,
    params: Vec<(String, Tensor)>,
    upstream: Tensor,
}

/// One forward+backward of the toy stack; `upstream` is a trainable table that produces the
/// stack's input (like an embedding or a vision tower before the decoder).
fn grads(ck: Checkpointing, dropout: f64, input_from_graph: bool) -> Grads {
    let _rng = rng_lock();
    let mut stack = ToyStack::new(N_LAYERS, D, 0);
    let vs = var_store();
    let cfg = LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: dropout, ..LoraConfig::default() };
    inject_lora(&mut stack, &cfg, &vs.root()).unwrap();
    let params = lora_parameters(&mut stack);
    randomize_lora(&params, 1);
    tch::manual_seed(42);
    let upstream = (Tensor::randn([10, D], (Kind::Float, Device::Cpu)) * 0.5).set_requires_grad(true);
    let ids = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]).view([3, 4]);
    let x = if input_from_graph {
        upstream.index_select(0, &ids.view([-1])).view([3, 4, D]).tanh()
    } else {
        Tensor::randn([3, 4, D], (Kind::Float, Device::Cpu))
    };
    let ctx: Vec<Tensor> = (0..N_LAYERS).map(|_| Tensor::randn([4, D], (Kind::Float, Device::Cpu)) * 0.3).collect();
    let mask = Tensor::from_slice(&[1f32, 1., 1., 0., 1., 1., 0., 0., 1., 1., 1., 1.]).view([3, 4, 1]);
    let target = Tensor::randn([3, 4, D], (Kind::Float, Device::Cpu));
    let layer = |i: usize, h: &Tensor| stack.layer(i, h, &ctx, &mask, dropout > 0.0);
    let run = run_layers(&x, N_LAYERS, ck, &layer).unwrap();
    let loss = (run.output() - &target).square().mean(Kind::Float) + run.output().mean(Kind::Float);
    loss.backward();
    run.backward(&layer).unwrap();
    Grads {
        loss: f64::try_from(&loss).unwrap(),
        params: params.iter().map(|(n, t)| (n.clone(), t.grad().copy())).collect(),
        upstream: {
            let g = upstream.grad();
            if g.defined() {
                g.copy()
            } else {
                g
            }
        },
    }
}

fn assert_same(a: &Grads, b: &Grads, what: &str, input_from_graph: bool) {
    assert_eq!(a.loss, b.loss, "{what}: loss");
    assert_eq!(a.params.len(), 2 * 2 * N_LAYERS);
    for ((name, ga), (_, gb)) in a.params.iter().zip(&b.params) {
        assert!(ga.defined() && f64::try_from(ga.abs().max()).unwrap() > 0.0, "{what}: {name} got no gradient");
        let err = rel_err(ga, gb);
        assert!(err <= 1e-5, "{what}: {name} relative error {err:.3e}");
    }
    if input_from_graph {
        let err = rel_err(&a.upstream, &b.upstream);
        assert!(f64::try_from(b.upstream.abs().max()).unwrap() > 0.0);
        assert!(err <= 1e-5, "{what}: upstream relative error {err:.3e}");
    } else {
        assert!(!a.upstream.defined() || f64::try_from(a.upstream.abs().max()).unwrap() == 0.0);
    }
}

#[test]
fn checkpointed_gradients_equal_plain_autograd_for_every_k() {
    for input_from_graph in [true, false] {
        let plain = grads(Checkpointing::OFF, 0.0, input_from_graph);
        for k in [1, 2, 3, 5, 8] {
            let ck = grads(Checkpointing::every(k), 0.0, input_from_graph);
            assert_same(&ck, &plain, &format!("every {k} (input from graph: {input_from_graph})"), input_from_graph);
        }
    }
}

#[test]
fn dropout_masks_are_replayed_in_the_recomputation() {
    for k in [1, 2] {
        let plain = grads(Checkpointing { enabled: false, every: k }, 0.3, true);
        let ck = grads(Checkpointing::every(k), 0.3, true);
        assert_same(&ck, &plain, &format!("dropout, every {k}"), true);
    }
    // Dropout really is active (the masks change the result).
    let no_dropout = grads(Checkpointing::OFF, 0.0, true);
    let dropout = grads(Checkpointing::OFF, 0.3, true);
    assert_ne!(no_dropout.loss, dropout.loss);
}

#[test]
fn backward_without_a_loss_gradient_and_zero_segments_are_errors() {
    let _rng = rng_lock();
    let x = Tensor::randn([2, 3], (Kind::Float, Device::Cpu));
    let w = Tensor::randn([3, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let layer = |_: usize, h: &Tensor| h.matmul(&w).tanh();
    let run = run_layers(&x, 3, Checkpointing::every(1), &layer).unwrap();
    assert!(matches!(run.backward(&layer), Err(CheckpointError::NoOutputGrad)));
    assert!(matches!(run_layers(&x, 3, Checkpointing::every(0), &layer), Err(CheckpointError::ZeroSegment)));
}

/// Two checkpointed stacks in a row (a vision tower feeding the decoder through a trainable
/// projection): backward of the second run, then of the first, equals plain autograd.
#[test]
fn chained_stacks_backpropagate_through_each_other() {
    let _rng = rng_lock();
    let run_chain = |ck: Checkpointing| -> Vec<Tensor> {
        let mut vision = ToyStack::new(3, D, 20);
        let mut text = ToyStack::new(4, D, 21);
        for l in &mut vision.linears {
            l.path = l.path.replace("model.language_model.", "model.visual.");
        }
        let vs = var_store();
        let cfg = LoraConfig {
            r: 2,
            target_modules: vla_finetune::vlm::lora::TargetModules::Suffixes(vec!["q_proj".into()]),
            ..LoraConfig::default()
        };
        inject_lora(&mut vision, &cfg, &vs.root().sub("v")).unwrap();
        inject_lora(&mut text, &cfg, &vs.root().sub("t")).unwrap();
        let mut params = lora_parameters(&mut vision);
        params.extend(lora_parameters(&mut text));
        randomize_lora(&params, 4);
        tch::manual_seed(5);
        let merger = (Tensor::randn([D, D], (Kind::Float, Device::Cpu)) * 0.3).set_requires_grad(true);
        let pixels = Tensor::randn([2, 4, D], (Kind::Float, Device::Cpu));
        let ctx_v: Vec<Tensor> = (0..3).map(|_| Tensor::randn([4, D], (Kind::Float, Device::Cpu))).collect();
        let ctx_t: Vec<Tensor> = (0..4).map(|_| Tensor::randn([4, D], (Kind::Float, Device::Cpu))).collect();
        let mask = Tensor::ones([2, 4, 1], (Kind::Float, Device::Cpu));
        let v_layer = |i: usize, h: &Tensor| vision.layer(i, h, &ctx_v, &mask, false);
        let t_layer = |i: usize, h: &Tensor| text.layer(i, h, &ctx_t, &mask, false);
        let v_run = run_layers(&pixels, 3, ck, &v_layer).unwrap();
        let embeds = v_run.output().matmul(&merger).gelu("none");
        let t_run = run_layers(&embeds, 4, ck, &t_layer).unwrap();
        t_run.output().square().mean(Kind::Float).backward();
        t_run.backward(&t_layer).unwrap();
        v_run.backward(&v_layer).unwrap();
        params.iter().map(|(_, t)| t.grad().copy()).chain(std::iter::once(merger.grad().copy())).collect()
    };
    let plain = run_chain(Checkpointing::OFF);
    let ck = run_chain(Checkpointing::every(2));
    assert_eq!(plain.len(), 2 * 3 + 2 * 4 + 1);
    for (i, (a, b)) in ck.iter().zip(&plain).enumerate() {
        assert!(f64::try_from(b.abs().max()).unwrap() > 0.0, "tensor {i} got no gradient");
        assert!(rel_err(a, b) <= 1e-5, "tensor {i}: {:.3e}", rel_err(a, b));
    }
}
