//! LoRA layer behaviour: PEFT's initialisation (checked against torch's kaiming_uniform_),
//! target selection on the Qwen2.5-VL module names, merge/unmerge, trainable parameters.
//! Every test holds `rng_lock`: each draws from libtorch's one per-process generator (random
//! init, LoRA init), and a draw on another thread between the seed and the kaiming draw breaks
//! the exact comparison with torch.

use crate::support::lora::*;
use crate::support::rng_lock;
use tch::{Device, Kind, Tensor};
use vla_finetune::vlm::lora::{
    inject_lora, lora_of, lora_parameters, merge_and_unload, merge_lora, select_targets, unmerge_lora, LoraConfig,
    LoraLayer, TargetModules,
};

#[test]
fn init_equals_torch_kaiming_uniform_a_sqrt5_and_b_is_zero() {
    let _rng = rng_lock();
    let reference = Tensor::read_safetensors(fixtures().join("init_ref.safetensors")).unwrap().remove(0).1;
    tch::manual_seed(1234);
    let (a, b) = LoraLayer::init_tensors(4, 32, 16);
    assert_eq!(rel_err(&a, &reference), 0.0, "A must equal torch's kaiming_uniform_(a=sqrt(5)) draw");
    assert_eq!(b.size(), vec![16, 4]);
    assert_eq!(f64::try_from(b.abs().max()).unwrap(), 0.0);
    // Fresh adapters leave the model's outputs unchanged.
    let mut model = base_model();
    let vs = var_store();
    inject_lora(&mut model, &LoraConfig::default(), &vs.root()).unwrap();
    let l = model.get("model.language_model.layers.0.self_attn.q_proj");
    let x = Tensor::randn([3, 32], (Kind::Float, Device::Cpu));
    assert_eq!(rel_err(&l.forward_t(&x, true), &x.linear(&l.weight, l.bias.as_ref())), 0.0);
}

#[test]
fn default_targets_only_the_llm_attention_projections() {
    let _rng = rng_lock();
    let mut model = base_model();
    let paths: Vec<String> =
        select_targets(&mut model, &LoraConfig::default()).unwrap().into_iter().map(|t| t.path).collect();
    let mut expected = Vec::new();
    for i in 0..2 {
        for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            expected.push(format!("model.language_model.layers.{i}.self_attn.{p}"));
        }
    }
    assert_eq!(paths, expected);

    // A plain suffix list on the MLP reaches the vision tower too (the trap the default avoids).
    let cfg = LoraConfig { target_modules: TargetModules::Suffixes(vec!["gate_proj".into()]), ..LoraConfig::default() };
    let paths: Vec<String> = select_targets(&mut model, &cfg).unwrap().into_iter().map(|t| t.path).collect();
    assert_eq!(paths.len(), 4);
    assert_eq!(paths.iter().filter(|p| p.starts_with("model.visual.")).count(), 2);

    // Widening with a regex plus exclude_modules.
    let cfg = LoraConfig {
        target_modules: TargetModules::Regex(r".*language_model.*_proj".into()),
        exclude_modules: Some(TargetModules::Suffixes(vec!["down_proj".into()])),
        ..LoraConfig::default()
    };
    let paths: Vec<String> = select_targets(&mut model, &cfg).unwrap().into_iter().map(|t| t.path).collect();
    assert_eq!(paths.len(), 2 * 6);
    assert!(paths.iter().all(|p| p.starts_with("model.language_model.") && !p.ends_with("down_proj")));
}

#[test]
fn parameters_are_named_fp32_trainable_and_base_is_frozen() {
    let _rng = rng_lock();
    let mut model = base_model();
    let vs = var_store();
    let cfg = LoraConfig { r: 2, ..LoraConfig::default() };
    inject_lora(&mut model, &cfg, &vs.root()).unwrap();
    let params = lora_parameters(&mut model);
    assert_eq!(params.len(), 16);
    assert_eq!(params[0].0, "model.language_model.layers.0.self_attn.q_proj.lora_A.weight");
    assert_eq!(params[1].0, "model.language_model.layers.0.self_attn.q_proj.lora_B.weight");
    assert_eq!(params[0].1.size(), vec![2, 32]);
    assert_eq!(params[3].1.size(), vec![16, 2], "k_proj B: [out 16, r 2]");
    assert!(params.iter().all(|(_, t)| t.requires_grad() && t.kind() == Kind::Float));
    // The VarStore holds the same tensors under the same names (optimizer groups, saving).
    assert_eq!(vs.trainable_variables().len(), 16);
    let vars = vs.variables();
    for (name, t) in &params {
        assert!(vars[name].data_ptr() == t.data_ptr(), "{name} is not the VarStore's tensor");
    }
    for l in &model.linears {
        assert!(!l.weight.requires_grad(), "{} weight must be frozen", l.path);
    }
}

#[test]
fn merge_unmerge_and_unload_keep_outputs() {
    let _rng = rng_lock();
    let mut model = base_model();
    let vs = var_store();
    let cfg = LoraConfig { r: 4, lora_alpha: 6.0, ..LoraConfig::default() };
    inject_lora(&mut model, &cfg, &vs.root()).unwrap();
    randomize_lora(&lora_parameters(&mut model), 5);
    let path = "model.language_model.layers.1.self_attn.v_proj";
    let x = Tensor::randn([2, 4, 32], (Kind::Float, Device::Cpu));
    let original_w = model.get(path).weight.copy();
    let y = model.get(path).forward_t(&x, false);
    // Hand-computed reference: x W^T + b + (alpha/r) x A^T B^T.
    let l = model.get(path);
    let lora = lora_of(l).unwrap();
    let manual = x.linear(&l.weight, l.bias.as_ref()) + x.matmul(&lora.lora_a.tr()).matmul(&lora.lora_b.tr()) * 1.5;
    assert!(rel_err(&y, &manual) < 1e-6);

    assert_eq!(merge_lora(&mut model).unwrap(), 8);
    assert_eq!(merge_lora(&mut model).unwrap(), 0, "already merged");
    assert!(lora_of(model.get(path)).unwrap().is_merged());
    assert!(rel_err(&model.get(path).weight, &original_w) > 1e-3, "weight changed by merge");
    assert!(rel_err(&model.get(path).forward_t(&x, false), &y) < 1e-5);

    assert_eq!(unmerge_lora(&mut model).unwrap(), 8);
    assert!(rel_err(&model.get(path).weight, &original_w) < 1e-6);
    assert!(rel_err(&model.get(path).forward_t(&x, false), &y) < 1e-6);

    assert_eq!(merge_and_unload(&mut model).unwrap(), 8);
    assert!(model.linears.iter().all(|l| l.adapter.is_none()));
    assert!(rel_err(&model.get(path).forward_t(&x, false), &y) < 1e-5);
}

#[test]
fn dropout_applies_in_training_only() {
    let _rng = rng_lock();
    let mut model = base_model();
    let vs = var_store();
    let cfg = LoraConfig { lora_dropout: 0.5, ..LoraConfig::default() };
    inject_lora(&mut model, &cfg, &vs.root()).unwrap();
    randomize_lora(&lora_parameters(&mut model), 9);
    let l = model.get("model.language_model.layers.0.self_attn.o_proj");
    let x = Tensor::randn([64, 32], (Kind::Float, Device::Cpu));
    assert_eq!(rel_err(&l.forward_t(&x, false), &l.forward_t(&x, false)), 0.0);
    assert!(rel_err(&l.forward_t(&x, true), &l.forward_t(&x, false)) > 1e-3);
}
