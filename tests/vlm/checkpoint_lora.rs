//! Training the LoRA adapters of the real (tiny fixture) Qwen2.5-VL with gradient
//! checkpointing of the vision blocks and decoder layers, in f32 and in bf16 compute.
//! The references are the same model's gradients without checkpointing (autograd through the
//! full graph) and, for bf16, the f32 path.

use crate::support::rng_lock;
use crate::support::vlm::*;
use tch::nn::OptimizerConfig;
use tch::{nn, Device, Kind, Tensor};
use vla_finetune::vlm::grad_checkpoint::Checkpointing;
use vla_finetune::vlm::lora::{inject_lora, lora_parameters, LoraConfig, TargetModules};
use vla_finetune::vlm::{Pooling, Qwen25VL, TrainCheckpointing, VlBatch};

/// LoRA on every linear layer of both towers (so both checkpointed stacks carry parameters).
fn lora_cfg() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: TargetModules::Regex(
            r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv|proj|mlp\.0)".into(),
        ),
        exclude_modules: None,
        use_rslora: false,
    }
}

/// tiny_a as `kind` with seeded LoRA (non-zero B so every A gets a gradient).
fn build(kind: Kind) -> (Qwen25VL, nn::VarStore) {
    let dir = fixtures().join("tiny_a");
    let mut model = Qwen25VL::load(&dir, kind, Device::Cpu).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    tch::manual_seed(5);
    inject_lora(&mut model, &lora_cfg(), &vs.root()).unwrap();
    tch::no_grad(|| {
        for (name, mut t) in lora_parameters(&mut model) {
            if name.ends_with("lora_B.weight") {
                t.copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
    });
    (model, vs)
}

fn batch() -> VlBatch {
    let (_, p) = processor(&fixtures().join("tiny_a"));
    p.collate(&[case_sample(&p, "two_images"), case_sample(&p, "one_image")]).unwrap()
}

/// Loss = MSE of the pooled features to a fixed target.
fn loss(model: &Qwen25VL, batch: &VlBatch, ck: TrainCheckpointing, target: &Tensor) -> Tensor {
    let (features, pass) = model.forward_checkpointed(batch, ck, true).unwrap();
    let loss = (features.pooled(Pooling::All).unwrap() - target).square().mean(Kind::Float);
    loss.backward();
    pass.backward(model).unwrap();
    loss
}

/// Gradients of every LoRA parameter after one forward/backward (dropout seeded identically).
fn lora_grads(model: &mut Qwen25VL, batch: &VlBatch, ck: TrainCheckpointing) -> Vec<(String, Tensor)> {
    let target = Tensor::ones([2, model.config.text.hidden_size], (Kind::Float, Device::Cpu)) * 0.5;
    tch::manual_seed(11);
    let _ = loss(model, batch, ck, &target);
    lora_parameters(model).into_iter().map(|(n, t)| (n, t.grad().copy())).collect()
}

#[test]
fn checkpointed_gradients_equal_plain_gradients_for_every_lora_parameter() {
    let _rng = rng_lock();
    let b = batch();
    let (mut model, _vs) = build(Kind::Float);
    let reference = lora_grads(&mut model, &b, TrainCheckpointing::OFF);
    assert!(reference.iter().any(|(n, _)| n.contains("visual.blocks")), "vision LoRA present");
    for ck in [
        TrainCheckpointing::every(1),
        TrainCheckpointing::every(2),
        TrainCheckpointing { vision: Checkpointing::OFF, text: Checkpointing::every(1) },
    ] {
        let (mut model, _vs) = build(Kind::Float);
        let got = lora_grads(&mut model, &b, ck);
        assert_eq!(got.len(), reference.len());
        for ((name, g), (_, r)) in got.iter().zip(&reference) {
            assert!(r.abs().max().double_value(&[]) > 0.0, "{name}: zero reference gradient");
            let e = rel_err(g, r);
            assert!(e <= 1e-5, "{ck:?} {name}: gradient rel err {e}");
        }
    }
}

#[test]
fn fitting_a_small_batch_with_checkpointing_lowers_the_loss_and_changes_only_lora() {
    let _rng = rng_lock();
    let b = batch();
    let (model, vs) = build(Kind::Float);
    let base_before: Vec<(String, Tensor)> = model.named_tensors().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let mut model = model;
    let lora_before: Vec<Tensor> = lora_parameters(&mut model).into_iter().map(|(_, t)| t.copy()).collect();
    tch::manual_seed(2);
    let target = Tensor::randn([2, model.config.text.hidden_size], (Kind::Float, Device::Cpu));
    let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();
    let mut losses = Vec::new();
    for _ in 0..8 {
        opt.zero_grad();
        losses.push(loss(&model, &b, TrainCheckpointing::every(1), &target).double_value(&[]));
        opt.step();
    }
    assert!(losses[7] < 0.8 * losses[0], "loss did not decrease: {losses:?}");
    for ((name, before), (_, after)) in base_before.iter().zip(model.named_tensors()) {
        assert!(before.equal(&after), "frozen base weight {name} changed");
    }
    for ((name, after), before) in lora_parameters(&mut model).iter().zip(&lora_before) {
        assert!(!before.equal(after), "LoRA parameter {name} did not change");
    }
}

#[test]
fn bf16_compute_gradients_reach_fp32_masters_close_to_the_f32_path() {
    let _rng = rng_lock();
    let b = batch();
    let (mut f32_model, _vs32) = build(Kind::Float);
    let reference = lora_grads(&mut f32_model, &b, TrainCheckpointing::OFF);
    let (mut model, _vs) = build(Kind::BFloat16);
    assert_eq!(model.kind(), Kind::BFloat16, "frozen weights in bf16");
    let got = lora_grads(&mut model, &b, TrainCheckpointing::every(1));
    let mut worst = 0.0f64;
    for ((name, master), ((_, g), (_, r))) in lora_parameters(&mut model).iter().zip(got.iter().zip(&reference)) {
        assert_eq!(master.kind(), Kind::Float, "{name}: master not fp32");
        assert_eq!(g.kind(), Kind::Float, "{name}: gradient not fp32");
        // Relative error in the Frobenius norm: bf16 has 8 mantissa bits.
        let e = (g - r).norm().double_value(&[]) / r.norm().double_value(&[]);
        worst = worst.max(e);
        assert!(e <= 5e-2, "{name}: bf16 gradient rel err {e}");
    }
    eprintln!("bf16 vs f32 LoRA gradients: worst relative error (Frobenius) {worst:.3e}");
    assert!(worst > 0.0, "bf16 path computed in f32?");
}
