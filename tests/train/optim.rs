//! AdamW, clipping, schedule and accumulation against torch / transformers / hand-computed values.

use std::collections::HashMap;
use std::path::Path;

use crate::support::rng_lock;
use tch::{Kind, Tensor};

use vla_finetune::policy::{
    ActionExpertConfig, FusionConfig, FusionKind, NormStats, PolicyConfig, PolicyHeads, SensorEncoderConfig,
};
use vla_finetune::train::heads_job::heads_params;
use vla_finetune::train::optim::{
    default_no_decay, Accumulation, AdamW, AdamWConfig, CosineSchedule, GroupConfig, NamedParam, OptimError,
};
use vla_finetune::train::tensor_io::read_safetensors;

fn fixture() -> (HashMap<String, Tensor>, serde_json::Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train/adamw_reference.safetensors");
    let loaded = read_safetensors(&path).unwrap();
    let spec = serde_json::from_str(&loaded.metadata["spec"]).unwrap();
    (loaded.tensors.into_iter().collect(), spec)
}

fn loss_fn(p: &HashMap<String, Tensor>, x: &Tensor, s: &Tensor, y: &Tensor) -> Tensor {
    let h =
        (x.matmul(&p["vl.lora_A.weight"].tr()) + &p["vl.proj.bias"] + s.matmul(&p["sensor.proj.weight"].tr())).tanh();
    let out = (h * &p["heads.norm.weight"]).matmul(&p["heads.out.weight"].tr()) + &p["heads.out.bias"];
    (out - y).square().mean(Kind::Float)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn adamw_groups_schedule_clipping_match_torch() {
    let (fx, spec) = fixture();
    let groups: Vec<GroupConfig> = spec["groups"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, g)| GroupConfig {
            name: name.clone(),
            lr: g["lr"].as_f64().unwrap(),
            weight_decay: g["weight_decay"].as_f64().unwrap(),
        })
        .collect();
    let mut params = HashMap::new();
    let mut named = Vec::new();
    for (name, group) in spec["params"].as_object().unwrap() {
        let t = fx[&format!("init/{name}")].copy().set_requires_grad(true);
        params.insert(name.clone(), t.shallow_clone());
        named.push(NamedParam { name: name.clone(), group: group.as_str().unwrap().into(), tensor: t, decay: true });
    }
    let mut opt = AdamW::new(AdamWConfig::default(), groups, named).unwrap();
    // The default no-decay rules pick exactly the fixture's biases and norm.
    assert_eq!(opt.decays("vl.proj.bias"), Some(false));
    assert_eq!(opt.decays("heads.norm.weight"), Some(false));
    assert_eq!(opt.decays("heads.out.bias"), Some(false));
    assert_eq!(opt.decays("heads.out.weight"), Some(true));
    let steps = spec["steps"].as_u64().unwrap();
    let sched = CosineSchedule {
        warmup_steps: spec["warmup"].as_u64().unwrap(),
        total_steps: steps,
        min_lr_ratio: spec["min_lr_ratio"].as_f64().unwrap(),
    };
    let (ref_norms, ref_factors) = (&fx["grad_norm"], &fx["lr_factor"]);
    for step in 0..steps {
        opt.zero_grad();
        loss_fn(&params, &fx["X"], &fx["S"], &fx["Y"]).backward();
        let norm = opt.clip_grad_norm(1.0).unwrap();
        let ref_norm = ref_norms.double_value(&[step as i64]);
        assert!((norm - ref_norm).abs() <= 1e-4 * ref_norm, "step {step}: grad norm {norm} vs torch {ref_norm}");
        let factor = sched.factor(step);
        let ref_factor = ref_factors.double_value(&[step as i64]);
        assert!((factor - ref_factor).abs() < 1e-12, "step {step}: lr factor {factor} vs transformers {ref_factor}");
        opt.step(factor).unwrap();
    }
    assert_eq!(opt.steps_taken(), steps);
    for (name, p) in &params {
        let d = max_abs_diff(p, &fx[&format!("final/{name}")]);
        let moved = max_abs_diff(&fx[&format!("init/{name}")], &fx[&format!("final/{name}")]);
        assert!(moved > 1e-2, "{name} barely moved in the reference ({moved})");
        assert!(d < 2e-5, "{name}: max |rust - torch| = {d}");
    }
}

#[test]
fn schedule_hand_values() {
    let s = CosineSchedule { warmup_steps: 4, total_steps: 14, min_lr_ratio: 0.0 };
    let expect = [(0, 0.0), (1, 0.25), (2, 0.5), (4, 1.0), (9, 0.5), (14, 0.0), (20, 0.0)];
    for (step, f) in expect {
        assert!((s.factor(step) - f).abs() < 1e-12, "step {step}: {} != {f}", s.factor(step));
    }
    let s = CosineSchedule { warmup_steps: 0, total_steps: 10, min_lr_ratio: 0.2 };
    assert!((s.factor(0) - 1.0).abs() < 1e-12);
    assert!((s.factor(5) - 0.6).abs() < 1e-12);
    assert!((s.factor(10) - 0.2).abs() < 1e-12);
}

#[test]
fn no_decay_rules_by_name() {
    let names = [
        ("model.language_model.layers.0.input_layernorm.weight", false),
        ("sensor.conv.0.bn.weight", false),
        ("sensor.encoder.layers.1.norm1.weight", false),
        ("heads.fusion.bias", false),
        ("heads.fusion.attn.in_proj_bias", false),
        ("sensor.ln_f.weight", false),
        ("heads.action_expert.pos_embed", false),
        ("model.embeddings.position_embedding.weight", false),
        ("heads.fusion.attn.in_proj_weight", true),
        ("heads.pos_embed_proj.weight", true),
        ("heads.fusion.weight", true),
        ("model.layers.0.self_attn.q_proj.lora_A.weight", true),
        ("heads.linear.weight", true),
    ];
    let params = names
        .iter()
        .map(|(n, _)| NamedParam {
            name: n.to_string(),
            group: "g".into(),
            tensor: Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true),
            decay: true,
        })
        .collect();
    let g = vec![GroupConfig { name: "g".into(), lr: 1e-3, weight_decay: 0.1 }];
    let cfg = AdamWConfig { no_decay: default_no_decay(), ..Default::default() };
    let opt = AdamW::new(cfg, g, params).unwrap();
    for (n, decays) in names {
        assert_eq!(opt.decays(n), Some(decays), "{n}");
    }
}

#[test]
fn bad_params_and_gradients_are_named() {
    let g = || vec![GroupConfig { name: "heads".into(), lr: 1e-3, weight_decay: 0.0 }];
    let p = |name: &str, group: &str, kind: Kind| NamedParam {
        name: name.into(),
        group: group.into(),
        tensor: Tensor::ones([3], (kind, tch::Device::Cpu)).set_requires_grad(true),
        decay: true,
    };
    let err = AdamW::new(AdamWConfig::default(), g(), vec![p("a", "vl", Kind::Float)]).err().unwrap();
    assert!(matches!(&err, OptimError::Param { name, .. } if name == "a"), "{err}");
    let err = AdamW::new(AdamWConfig::default(), g(), vec![p("b", "heads", Kind::BFloat16)]).err().unwrap();
    assert!(err.to_string().contains("fp32"), "{err}");
    let err = AdamW::new(AdamWConfig::default(), g(), vec![p("c", "heads", Kind::Float), p("c", "heads", Kind::Float)])
        .err()
        .unwrap();
    assert!(err.to_string().contains("twice"), "{err}");

    let x = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let y = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let params = vec![
        NamedParam { name: "ok".into(), group: "heads".into(), tensor: x.shallow_clone(), decay: true },
        NamedParam { name: "bad".into(), group: "heads".into(), tensor: y.shallow_clone(), decay: true },
    ];
    let mut opt = AdamW::new(AdamWConfig::default(), g(), params).unwrap();
    (x.sum(Kind::Float) + (&y * f64::NAN).sum(Kind::Float)).backward();
    let before = x.copy();
    let err = opt.step(1.0).err().unwrap();
    assert!(matches!(&err, OptimError::NonFiniteGrad { name } if name == "bad"), "{err}");
    assert_eq!(max_abs_diff(&x, &before), 0.0, "nothing may be updated");
    assert!(matches!(opt.clip_grad_norm(1.0), Err(OptimError::NonFiniteGrad { name }) if name == "bad"));

    // One infinite element in an otherwise finite gradient is found too.
    opt.zero_grad();
    let mask = Tensor::from_slice(&[1.0f32, f32::INFINITY, 1.0]);
    (x.sum(Kind::Float) + (&y * 1e-3 * mask).sum(Kind::Float)).backward();
    let err = opt.step(1.0).err().unwrap();
    assert!(matches!(&err, OptimError::NonFiniteGrad { name } if name == "bad"), "{err}");
}

#[test]
fn zero_grad_drops_gradients_and_a_parameter_without_one_is_not_updated() {
    let g = vec![GroupConfig { name: "heads".into(), lr: 1e-2, weight_decay: 0.1 }];
    let x = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let y = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let params = vec![
        NamedParam { name: "x".into(), group: "heads".into(), tensor: x.shallow_clone(), decay: true },
        NamedParam { name: "y".into(), group: "heads".into(), tensor: y.shallow_clone(), decay: true },
    ];
    let mut opt = AdamW::new(AdamWConfig::default(), g, params).unwrap();
    (x.sum(Kind::Float) + y.sum(Kind::Float)).backward();
    opt.step(1.0).unwrap();
    opt.zero_grad();
    assert!(!x.grad().defined() && !y.grad().defined(), "gradients dropped, as torch's zero_grad(set_to_none=True)");
    // Only x gets a gradient: y keeps its value (no decay, no momentum step), as in torch.
    let y_before = y.copy();
    (&x * 2.0).sum(Kind::Float).backward();
    assert_eq!(Vec::<f32>::try_from(x.grad()).unwrap(), vec![2.0; 3], "written fresh, not added to the old one");
    opt.step(1.0).unwrap();
    assert_eq!(max_abs_diff(&y, &y_before), 0.0);
    assert_eq!(opt.steps_taken(), 2);
}

/// Linear model y = x W^T + b, loss = mean squared error over the step's batch.
fn linear_setup() -> (Tensor, Tensor, Tensor, Tensor) {
    tch::manual_seed(3);
    let x = Tensor::randn([8, 5], (Kind::Float, tch::Device::Cpu));
    let y = Tensor::randn([8, 2], (Kind::Float, tch::Device::Cpu));
    let w = (Tensor::randn([2, 5], (Kind::Float, tch::Device::Cpu)) * 0.3).set_requires_grad(true);
    let b = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    (x, y, w, b)
}

fn run_accumulated(micro: usize, accum: usize) -> (Tensor, Tensor, Tensor) {
    let (x, y, w, b) = linear_setup();
    let params = vec![
        NamedParam { name: "w".into(), group: "heads".into(), tensor: w.shallow_clone(), decay: true },
        NamedParam { name: "b".into(), group: "heads".into(), tensor: b.shallow_clone(), decay: true },
    ];
    let g = vec![GroupConfig { name: "heads".into(), lr: 1e-2, weight_decay: 0.01 }];
    let mut opt = AdamW::new(AdamWConfig::default(), g, params).unwrap();
    let plan = Accumulation::new(micro, accum).unwrap();
    assert_eq!(plan.effective_batch(), 8);
    opt.zero_grad();
    for mb in plan.micro_batches(8) {
        let (s, e) = (mb.range.start as i64, mb.range.end as i64);
        let pred = x.slice(0, s, e, 1).matmul(&w.tr()) + &b;
        let loss = (pred - y.slice(0, s, e, 1)).square().mean(Kind::Float) * mb.loss_scale;
        loss.backward();
    }
    let grad = w.grad().copy();
    opt.step(1.0).unwrap();
    (grad, w.detach().copy(), b.detach().copy())
}

#[test]
fn accumulation_2x4_equals_8x1_and_hand_gradient() {
    let _rng = rng_lock();
    let (g_acc, w_acc, b_acc) = run_accumulated(2, 4);
    let (g_full, w_full, b_full) = run_accumulated(8, 1);
    // Hand gradient of mean((xW^T + b - y)^2) over 8 samples x 2 outputs: 2/(8*2) * (xW^T+b-y)^T x.
    let (x, y, w, b) = linear_setup();
    let x64 = x.to_kind(Kind::Double);
    let r =
        x64.matmul(&w.detach().to_kind(Kind::Double).tr()) + b.detach().to_kind(Kind::Double) - y.to_kind(Kind::Double);
    let hand = r.tr().matmul(&x64) * (2.0 / 16.0);
    assert!(max_abs_diff(&g_full.to_kind(Kind::Double), &hand) < 1e-6);
    assert!(max_abs_diff(&g_acc.to_kind(Kind::Double), &hand) < 1e-6);
    assert!(max_abs_diff(&g_acc, &g_full) < 1e-6, "grads differ by {}", max_abs_diff(&g_acc, &g_full));
    assert!(max_abs_diff(&w_acc, &w_full) < 1e-6);
    assert!(max_abs_diff(&b_acc, &b_full) < 1e-6);
}

#[test]
fn accumulation_plan_shapes() {
    let p = Accumulation::new(3, 3).unwrap();
    let mbs = p.micro_batches(7);
    assert_eq!(mbs.iter().map(|m| m.range.clone()).collect::<Vec<_>>(), vec![0..3, 3..6, 6..7]);
    let total: f64 = mbs.iter().map(|m| m.loss_scale).sum();
    assert!((total - 1.0).abs() < 1e-12);
    assert_eq!(Accumulation::new(4, 8).unwrap().halved(), Some(Accumulation { micro_batch: 2, accum_steps: 16 }));
    assert_eq!(Accumulation::new(3, 2).unwrap().halved(), Some(Accumulation { micro_batch: 1, accum_steps: 6 }));
    assert_eq!(Accumulation::new(1, 32).unwrap().halved(), None);
    assert!(Accumulation::new(0, 4).is_err());
}

#[test]
fn state_export_import_roundtrip_continues_identically() {
    let _rng = rng_lock();
    let make = || {
        let (x, y, w, b) = linear_setup();
        let params = vec![
            NamedParam { name: "w".into(), group: "heads".into(), tensor: w.shallow_clone(), decay: true },
            NamedParam { name: "b".into(), group: "heads".into(), tensor: b.shallow_clone(), decay: true },
        ];
        let g = vec![GroupConfig { name: "heads".into(), lr: 1e-2, weight_decay: 0.01 }];
        (AdamW::new(AdamWConfig::default(), g, params).unwrap(), x, y, w, b)
    };
    let step = |opt: &mut AdamW, x: &Tensor, y: &Tensor, w: &Tensor, b: &Tensor| {
        opt.zero_grad();
        (x.matmul(&w.tr()) + b - y).square().mean(Kind::Float).backward();
        opt.step(1.0).unwrap();
    };
    let (mut a, x, y, wa, ba) = make();
    for _ in 0..3 {
        step(&mut a, &x, &y, &wa, &ba);
    }
    let (mut c, _, _, wc, bc) = make();
    tch::no_grad(|| {
        wc.shallow_clone().copy_(&wa);
        bc.shallow_clone().copy_(&ba);
    });
    c.import_state(a.export_state()).unwrap();
    assert_eq!(c.steps_taken(), 3);
    for _ in 0..3 {
        step(&mut a, &x, &y, &wa, &ba);
        step(&mut c, &x, &y, &wc, &bc);
    }
    assert_eq!(max_abs_diff(&wa, &wc), 0.0);
    assert_eq!(max_abs_diff(&ba, &bc), 0.0);
    // A state for other parameters is refused, naming the parameter.
    let mut st = a.export_state();
    st.moments.retain(|(n, _, _)| n != "b");
    let err = c.import_state(st).err().unwrap();
    assert!(err.to_string().contains("`b`"), "{err}");
}

/// Every trainable parameter of small heads (one conv block, one layer each, cross-attention
/// fusion) with the decay flag the optimizer gives it under the default rules.
const HEADS_DECAY: &[(&str, bool)] = &[
    ("heads.sensor_encoder.conv.0.bias", false),
    ("heads.sensor_encoder.conv.0.weight", true),
    ("heads.sensor_encoder.conv.1.bias", false),
    ("heads.sensor_encoder.conv.1.weight", false), // BatchNorm: only the heads' flag knows
    ("heads.sensor_encoder.pos_embed", false),
    ("heads.sensor_encoder.proj.0.bias", false),
    ("heads.sensor_encoder.proj.0.weight", true),
    ("heads.sensor_encoder.proj.2.bias", false),
    ("heads.sensor_encoder.proj.2.weight", true),
    ("heads.sensor_encoder.transformer.layers.0.linear1.bias", false),
    ("heads.sensor_encoder.transformer.layers.0.linear1.weight", true),
    ("heads.sensor_encoder.transformer.layers.0.linear2.bias", false),
    ("heads.sensor_encoder.transformer.layers.0.linear2.weight", true),
    ("heads.sensor_encoder.transformer.layers.0.norm1.bias", false),
    ("heads.sensor_encoder.transformer.layers.0.norm1.weight", false),
    ("heads.sensor_encoder.transformer.layers.0.norm2.bias", false),
    ("heads.sensor_encoder.transformer.layers.0.norm2.weight", false),
    ("heads.sensor_encoder.transformer.layers.0.self_attn.in_proj_bias", false),
    ("heads.sensor_encoder.transformer.layers.0.self_attn.in_proj_weight", true),
    ("heads.sensor_encoder.transformer.layers.0.self_attn.out_proj.bias", false),
    ("heads.sensor_encoder.transformer.layers.0.self_attn.out_proj.weight", true),
    ("heads.action_expert.action_embed.bias", false),
    ("heads.action_expert.action_embed.weight", true),
    ("heads.action_expert.fusion.attn.in_proj_bias", false),
    ("heads.action_expert.fusion.attn.in_proj_weight", true),
    ("heads.action_expert.fusion.attn.out_proj.bias", false),
    ("heads.action_expert.fusion.attn.out_proj.weight", true),
    ("heads.action_expert.fusion.kv_proj.bias", false),
    ("heads.action_expert.fusion.kv_proj.weight", true),
    ("heads.action_expert.fusion.out.bias", false),
    ("heads.action_expert.fusion.out.weight", true),
    ("heads.action_expert.fusion.query.bias", false),
    ("heads.action_expert.fusion.query.weight", true),
    ("heads.action_expert.output.bias", false),
    ("heads.action_expert.output.weight", true),
    ("heads.action_expert.pos_embed", false),
    ("heads.action_expert.time_mlp.1.bias", false),
    ("heads.action_expert.time_mlp.1.weight", true),
    ("heads.action_expert.time_mlp.3.bias", false),
    ("heads.action_expert.time_mlp.3.weight", true),
    ("heads.action_expert.transformer.layers.0.linear1.bias", false),
    ("heads.action_expert.transformer.layers.0.linear1.weight", true),
    ("heads.action_expert.transformer.layers.0.linear2.bias", false),
    ("heads.action_expert.transformer.layers.0.linear2.weight", true),
    ("heads.action_expert.transformer.layers.0.norm1.bias", false),
    ("heads.action_expert.transformer.layers.0.norm1.weight", false),
    ("heads.action_expert.transformer.layers.0.norm2.bias", false),
    ("heads.action_expert.transformer.layers.0.norm2.weight", false),
    ("heads.action_expert.transformer.layers.0.self_attn.in_proj_bias", false),
    ("heads.action_expert.transformer.layers.0.self_attn.in_proj_weight", true),
    ("heads.action_expert.transformer.layers.0.self_attn.out_proj.bias", false),
    ("heads.action_expert.transformer.layers.0.self_attn.out_proj.weight", true),
];

#[test]
fn heads_parameters_decay_only_matrices() {
    let _rng = rng_lock();
    tch::set_num_threads(1);
    let cfg = PolicyConfig {
        vl_dim: 8,
        sensor: SensorEncoderConfig {
            window: 8,
            in_channels: 3,
            conv_channels: vec![8],
            d_model: 8,
            n_heads: 2,
            n_layers: 1,
            ff_dim: 16,
            out_dim: 8,
            dropout: 0.0,
        },
        fusion: FusionConfig { kind: FusionKind::CrossAttention, n_heads: 2 },
        expert: ActionExpertConfig {
            horizon: 4,
            action_dim: 2,
            d_model: 8,
            n_heads: 2,
            n_layers: 1,
            ff_dim: 16,
            dropout: 0.0,
        },
        ..PolicyConfig::default()
    };
    let heads = PolicyHeads::new(cfg, NormStats::identity(3, 0, 2), tch::Device::Cpu).unwrap();
    let groups = vec![
        GroupConfig { name: "sensor_encoder".into(), lr: 1.0, weight_decay: 0.5 },
        GroupConfig { name: "heads".into(), lr: 1.0, weight_decay: 0.5 },
    ];
    let params = heads_params(&heads, "heads.", "sensor_encoder", "heads");
    let before: Vec<Tensor> = params.iter().map(|p| p.tensor.copy()).collect();
    let mut opt = AdamW::new(AdamWConfig::default(), groups, params).unwrap();
    let listed: Vec<(&str, bool)> = opt.params().map(|(n, _, d, _)| (n, d)).collect();
    assert_eq!(listed, HEADS_DECAY);
    assert!(opt.params().all(|(n, g, _, _)| (g == "sensor_encoder") == n.starts_with("heads.sensor_encoder.")));

    // With zero gradients an AdamW step only decays: lr 1, decay 0.5 halves exactly the
    // parameters flagged to decay and leaves the others untouched.
    let zero = opt
        .params()
        .fold(Tensor::zeros([], (Kind::Float, tch::Device::Cpu)), |acc, (_, _, _, t)| acc + (t * 0.0).sum(Kind::Float));
    zero.backward();
    opt.step(1.0).unwrap();
    for ((name, decays, t), b) in opt.params().map(|(n, _, d, t)| (n, d, t)).zip(&before) {
        let want = if decays { b * 0.5 } else { b.shallow_clone() };
        assert!(t.allclose(&want, 0.0, 1e-7, false), "{name}: decays {decays}, not applied as such");
    }
}
