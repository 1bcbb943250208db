//! Training behaviour: fitting a small batch through the checkpointed toy stack lowers the
//! loss and changes only LoRA parameters; the bf16 path gives gradients close to fp32 with
//! fp32 masters.

use crate::support::lora::*;
use crate::support::rng_lock;
use tch::nn::OptimizerConfig;
use tch::{nn, Device, Kind, Tensor};
use vla_finetune::vlm::grad_checkpoint::{run_layers, Checkpointing};
use vla_finetune::vlm::lora::{inject_lora, lora_parameters, LoraConfig};
use vla_finetune::vlm::precision::{check_fp32_masters, Precision};

const N: usize = 4;
const D: i64 = 16;

struct Batch {
    x: Tensor,
    ctx: Vec<Tensor>,
    mask: Tensor,
    target: Tensor,
}

fn batch() -> Batch {
    tch::manual_seed(11);
    Batch {
        x: Tensor::randn([4, 6, D], (Kind::Float, Device::Cpu)),
        ctx: (0..N).map(|_| Tensor::randn([6, D], (Kind::Float, Device::Cpu)) * 0.3).collect(),
        mask: Tensor::ones([4, 6, 1], (Kind::Float, Device::Cpu)),
        target: Tensor::randn([4, 6, D], (Kind::Float, Device::Cpu)),
    }
}

#[test]
fn fitting_a_batch_lowers_the_loss_and_changes_only_lora() {
    let _rng = rng_lock();
    let mut stack = ToyStack::new(N, D, 3);
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: 0.05, ..LoraConfig::default() };
    inject_lora(&mut stack, &cfg, &vs.root()).unwrap();
    let base: Vec<Tensor> = stack.linears.iter().map(|l| l.weight.copy()).collect();
    let params = lora_parameters(&mut stack);
    let initial: Vec<Tensor> = params.iter().map(|(_, t)| t.copy()).collect();
    let mut opt = nn::AdamW::default().build(&vs, 1e-2).unwrap();
    let b = batch();
    let layer = |i: usize, h: &Tensor| stack.layer(i, h, &b.ctx, &b.mask, true);
    let mut losses = Vec::new();
    for _ in 0..40 {
        opt.zero_grad();
        let run = run_layers(&b.x, N, Checkpointing::every(2), &layer).unwrap();
        let loss = (run.output() - &b.target).square().mean(Kind::Float);
        loss.backward();
        run.backward(&layer).unwrap();
        opt.step();
        losses.push(f64::try_from(&loss).unwrap());
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.7 * first, "loss {first} -> {last}");
    for (l, w) in stack.linears.iter().zip(&base) {
        assert!(l.weight.equal(w), "base weight {} changed", l.path);
        assert!(!l.weight.grad().defined(), "{} got a gradient", l.path);
    }
    for ((name, t), t0) in params.iter().zip(&initial) {
        assert!(!t.equal(t0), "{name} did not change");
    }
}

/// LoRA gradients of one forward+backward in `precision`, with or without checkpointing.
fn grads(precision: Precision, ck: Checkpointing) -> (Vec<(String, Tensor)>, Vec<Kind>) {
    let mut stack = ToyStack::new(N, D, 5);
    let vs = nn::VarStore::new(Device::Cpu);
    inject_lora(&mut stack, &LoraConfig { r: 4, lora_dropout: 0.0, ..LoraConfig::default() }, &vs.root()).unwrap();
    let params = lora_parameters(&mut stack);
    randomize_lora(&params, 2);
    precision.apply_to_linears(&mut stack);
    let kinds = stack.linears.iter().map(|l| l.weight.kind()).collect();
    let b = batch();
    let x = precision.cast_input(&b.x);
    let layer = |i: usize, h: &Tensor| stack.layer(i, h, &b.ctx, &b.mask, true);
    let run = run_layers(&x, N, ck, &layer).unwrap();
    assert_eq!(run.output().kind(), precision.compute_kind(), "compute dtype");
    let loss = (run.output().to_kind(Kind::Float) - &b.target).square().mean(Kind::Float);
    loss.backward();
    run.backward(&layer).unwrap();
    check_fp32_masters(&params).unwrap();
    (params.iter().map(|(n, t)| (n.clone(), t.grad().copy())).collect(), kinds)
}

#[test]
fn bf16_gradients_reach_fp32_masters_close_to_the_fp32_path() {
    let _rng = rng_lock();
    let (g32, k32) = grads(Precision::F32, Checkpointing::OFF);
    let (g16, k16) = grads(Precision::Bf16, Checkpointing::OFF);
    let (g16ck, _) = grads(Precision::Bf16, Checkpointing::every(2));
    assert!(k32.iter().all(|k| *k == Kind::Float));
    assert!(k16.iter().all(|k| *k == Kind::BFloat16), "frozen weights must be bf16");
    for (((name, a), (_, b)), (_, c)) in g32.iter().zip(&g16).zip(&g16ck) {
        assert_eq!(b.kind(), Kind::Float, "{name}: master gradient must be fp32");
        // Norm-wise relative error, bf16 has an 8-bit mantissa (~4e-3 per op).
        let err = f64::try_from((a - b).norm()).unwrap() / f64::try_from(a.norm()).unwrap();
        assert!(err < 3e-2, "{name}: bf16 vs f32 gradient error {err:.3e}");
        assert!(err > 0.0, "{name}: bf16 path identical to f32 (not computing in bf16?)");
        assert!(rel_err(c, b) <= 1e-5, "{name}: bf16 checkpointed vs plain");
    }
}

#[test]
fn casting_frozen_weights_updates_every_alias_and_skips_trainables() {
    let _rng = rng_lock();
    let vs = nn::VarStore::new(Device::Cpu);
    let frozen = vs.root().zeros_no_train("norm", &[8]);
    let trainable = vs.root().randn_standard("head", &[4, 4]);
    let alias = frozen.shallow_clone();
    assert_eq!(Precision::Bf16.apply_to_var_store(&vs), 1);
    assert_eq!(alias.kind(), Kind::BFloat16, "aliases see the cast (set_data)");
    assert_eq!(vs.variables()["norm"].kind(), Kind::BFloat16);
    assert_eq!(trainable.kind(), Kind::Float);
    assert_eq!(Precision::F32.apply_to_var_store(&vs), 1);
    assert_eq!(alias.kind(), Kind::Float);
    assert!("fp16".parse::<Precision>().is_err());
    assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
}
