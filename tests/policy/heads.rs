//! Policy heads: reference sizes, input handling, fusion variants, normalization, parameter
//! groups, micro-batch invariance of the loss, bf16 compute, and the VlaPolicy wrapper.

use crate::support::rng_lock;
use tch::{Device, Kind, Tensor};
use vla_finetune::policy::{
    ActionExpertConfig, CondInput, DiffusionConfig, FeatureStats, FusionConfig, FusionKind, NormMode, NormStats,
    Normalizer, ObservationBatch, PolicyBatch, PolicyConfig, PolicyError, PolicyHeads, SensorEncoderConfig,
    VlFeatureSource, VlInput, VlObservation, VlaPolicy,
};

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

fn tiny(fusion: FusionKind, state_dim: i64) -> PolicyConfig {
    tch::set_num_threads(1);
    PolicyConfig {
        vl_dim: 8,
        state_dim,
        sensor: SensorEncoderConfig {
            window: 12,
            in_channels: 3,
            conv_channels: vec![8, 16],
            d_model: 16,
            n_heads: 2,
            n_layers: 1,
            ff_dim: 32,
            out_dim: 12,
            dropout: 0.0,
        },
        fusion: FusionConfig { kind: fusion, n_heads: 4 },
        expert: ActionExpertConfig {
            horizon: 4,
            action_dim: 2,
            d_model: 16,
            n_heads: 4,
            n_layers: 1,
            ff_dim: 32,
            dropout: 0.0,
        },
        diffusion: DiffusionConfig { train_steps: 20, default_ddim_steps: 5, ..DiffusionConfig::default() },
    }
}

fn heads(cfg: PolicyConfig) -> PolicyHeads {
    tch::manual_seed(0);
    let st = cfg.state_dim as usize;
    PolicyHeads::new(cfg, NormStats::identity(3, st, 2), Device::Cpu).unwrap()
}

/// Parameters of a PyTorch `TransformerEncoderLayer(d, ff)`.
fn encoder_layer(d: i64, ff: i64) -> i64 {
    (3 * d * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d) + 4 * d
}

#[test]
fn reference_sizes_parameter_counts_and_shapes() {
    let _rng = rng_lock();
    tch::set_num_threads(1);
    let cfg = PolicyConfig::default();
    assert_eq!(cfg.sensor.tokens(), 41, "650 samples -> 325 -> 163 -> 82 -> 41 tokens");
    let h = PolicyHeads::new(cfg.clone(), NormStats::identity(1026, 0, 7), Device::Cpu).unwrap();
    // Hand count: conv + BN per layer, 2 encoder layers, pos_embed, MLP 1024 -> 3072 -> 3072.
    let conv: i64 =
        [(1026, 512), (512, 1024), (1024, 1024), (1024, 1024)].iter().map(|&(i, o)| i * o * 3 + o + 2 * o).sum();
    let sensor = conv + 2 * encoder_layer(1024, 4096) + 41 * 1024 + (1024 * 3072 + 3072) + (3072 * 3072 + 3072);
    // Fusion 5120 -> 1024, time MLP, action embedding, pos_embed, 4 encoder layers, output.
    let expert = (5120 * 1024 + 1024)
        + 2 * (1024 * 1024 + 1024)
        + (7 * 1024 + 1024)
        + 8 * 1024
        + 4 * encoder_layer(1024, 4096)
        + (1024 * 7 + 7);
    assert_eq!(h.num_parameters("sensor_encoder"), sensor);
    assert_eq!(h.num_parameters("action_expert"), expert);
    assert!((46_000_000..49_000_000).contains(&sensor), "sensor encoder ~47 M: {sensor}");
    assert!((57_000_000..59_000_000).contains(&expert), "action expert ~58 M: {expert}");
    assert_eq!(h.num_parameters(""), sensor + expert);

    let vl = VlInput::pooled(Tensor::randn([1, 2048], CPU));
    let sensor_in = Tensor::randn([1, 650, 1026], CPU);
    let c = CondInput { vl: &vl, sensor: &sensor_in, state: None };
    let _g = tch::no_grad_guard();
    assert_eq!(h.encode_sensor(&sensor_in, false).size(), vec![1, 3072]);
    assert_eq!(h.condition(&c, false).unwrap().size(), vec![1, 1024]);
    assert_eq!(h.sample(&c, 1, 0).unwrap().size(), vec![1, 8, 7]);
}

#[test]
fn other_window_lengths_are_resampled() {
    let _rng = rng_lock();
    let h = heads(tiny(FusionKind::Concat, 0));
    let _g = tch::no_grad_guard();
    // A window that is constant in time is the same signal at any length.
    let sample = Tensor::randn([2, 1, 3], CPU);
    let at = |t: i64| h.encode_sensor(&sample.expand([2, t, 3], false).contiguous(), false);
    let d = (at(12) - at(30)).abs().max().double_value(&[]);
    assert!(d < 1e-5, "constant window at 12 vs 30 samples differ by {d}");
    // A linear ramp resampled (endpoints kept) is the same ramp.
    let ramp = |t: i64| Tensor::linspace(-1.0, 1.0, t, CPU).view([1, t, 1]).expand([2, t, 3], false).contiguous();
    let d = (h.encode_sensor(&ramp(12), false) - h.encode_sensor(&ramp(47), false)).abs().max().double_value(&[]);
    assert!(d < 1e-5, "ramp at 12 vs 47 samples differ by {d}");
    // Another signal gives another feature (the comparison is not vacuous).
    assert!((at(12) - h.encode_sensor(&ramp(12), false)).abs().max().double_value(&[]) > 1e-3);
}

#[test]
fn bad_inputs_name_the_tensor() {
    let _rng = rng_lock();
    let h = heads(tiny(FusionKind::Concat, 0));
    let vl = VlInput::pooled(Tensor::randn([2, 8], CPU));
    let err_name = |sensor: &Tensor, vl: &VlInput, state: Option<&Tensor>| match h.sample(
        &CondInput { vl, sensor, state },
        5,
        0,
    ) {
        Err(PolicyError::Input { name, .. }) => name,
        other => panic!("expected an input error, got {other:?}"),
    };
    assert_eq!(err_name(&Tensor::randn([2, 12, 4], CPU), &vl, None), "sensor");
    assert_eq!(err_name(&Tensor::randn([2, 12], CPU), &vl, None), "sensor");
    let nan = Tensor::randn([2, 12, 3], CPU);
    let _ = nan.get(1).get(3).get(0).fill_(f64::NAN);
    assert_eq!(err_name(&nan, &vl, None), "sensor");
    let ok = Tensor::randn([2, 12, 3], CPU);
    assert_eq!(err_name(&ok, &VlInput::pooled(Tensor::randn([3, 8], CPU)), None), "vl.pooled");
    assert_eq!(err_name(&ok, &vl, Some(&Tensor::zeros([2, 1], CPU))), "state");
    let actions = Tensor::zeros([2, 5, 2], CPU);
    match h.loss(&CondInput { vl: &vl, sensor: &ok, state: None }, &actions, &[0, 1], false) {
        Err(e @ PolicyError::Input { .. }) => {
            assert!(e.to_string().contains("`actions`: expected shape [2, 4, 2]"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    let actions = Tensor::zeros([2, 4, 2], CPU);
    match h.loss(&CondInput { vl: &vl, sensor: &ok, state: None }, &actions, &[0], false) {
        Err(PolicyError::Input { name, .. }) => assert_eq!(name, "sample_seeds"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn config_validation_names_the_field() {
    let _rng = rng_lock();
    let mut cfg = tiny(FusionKind::Concat, 0);
    cfg.sensor.conv_channels = vec![8, 32];
    match PolicyHeads::new(cfg, NormStats::identity(3, 0, 2), Device::Cpu) {
        Err(PolicyError::Config { field, .. }) => assert_eq!(field, "sensor.conv_channels"),
        other => panic!("{other:?}"),
    }
    let mut cfg = tiny(FusionKind::Concat, 0);
    cfg.expert.n_heads = 3;
    assert!(
        matches!(PolicyHeads::new(cfg, NormStats::identity(3, 0, 2), Device::Cpu), Err(PolicyError::Config { field, .. }) if field == "expert.n_heads")
    );
    // Stats of the wrong size.
    match PolicyHeads::new(tiny(FusionKind::Concat, 0), NormStats::identity(4, 0, 2), Device::Cpu) {
        Err(e @ PolicyError::Stats { .. }) => assert!(e.to_string().contains("sensor.mean"), "{e}"),
        other => panic!("{other:?}"),
    }
    // Partial YAML takes the reference defaults for the rest; unknown fields are refused.
    let cfg: PolicyConfig = serde_yaml::from_str("expert: {horizon: 16}\nfusion: {kind: gated}").unwrap();
    assert_eq!((cfg.expert.horizon, cfg.expert.d_model, cfg.fusion.kind), (16, 1024, FusionKind::Gated));
    assert!(serde_yaml::from_str::<PolicyConfig>("expert: {horizn: 16}").is_err());
}

#[test]
fn normalization_statistics_and_unclamped_denormalization() {
    let _rng = rng_lock();
    // 0, 1, ..., 100 in one dimension and its negation in another: hand-computed statistics.
    let v: Vec<f32> = (0..=100).flat_map(|i| [i as f32, -(i as f32)]).collect();
    let s = FeatureStats::from_samples(&v, 2).unwrap();
    assert_eq!((s.mean[0], s.min[0], s.max[0], s.q01[0], s.q99[0]), (50.0, 0.0, 100.0, 1.0, 99.0));
    assert_eq!((s.mean[1], s.min[1], s.q01[1], s.q99[1]), (-50.0, -100.0, -99.0, -1.0));
    let var: f64 = (0..=100).map(|i| (i as f64 - 50.0).powi(2)).sum::<f64>() / 101.0;
    assert!((s.std[0] as f64 - var.sqrt()).abs() < 1e-4);
    assert!(FeatureStats::from_samples(&[1.0, f32::NAN], 1).is_err());

    let q = Normalizer { mode: NormMode::Quantile, stats: s.clone() };
    assert_eq!(q.affine(), (vec![50.0, -50.0], vec![49.0, 49.0]));
    let m = Normalizer { mode: NormMode::MinMax, stats: s.clone() };
    assert_eq!(m.affine(), (vec![50.0, -50.0], vec![50.0, 50.0]));

    // Actions: network output x -> x * std + mean, far outside the data range stays unclamped.
    let mut h = heads(tiny(FusionKind::Concat, 0));
    let action = Normalizer { mode: NormMode::MeanStd, stats: s };
    h.set_norm(NormStats { action, ..NormStats::identity(3, 0, 2) }).unwrap();
    let x = Tensor::from_slice(&[0.0f32, 0.0, 10.0, -10.0]).view([1, 2, 2]);
    let phys = Vec::<f32>::try_from(h.denormalize_actions(&x).reshape([-1])).unwrap();
    let sd = var.sqrt() as f32;
    let want = [50.0, -50.0, 50.0 + 10.0 * sd, -50.0 - 10.0 * sd];
    for (p, w) in phys.iter().zip(want) {
        assert!((p - w).abs() < 1e-3, "{phys:?} vs {want:?}");
    }
    let back = h.normalize_actions(&h.denormalize_actions(&x));
    assert!(back.allclose(&x, 1e-5, 1e-5, false));
}

#[test]
fn gated_and_state_fusion_use_every_input() {
    let _rng = rng_lock();
    let h = heads(tiny(FusionKind::Gated, 5));
    let _g = tch::no_grad_guard();
    let vl = VlInput::pooled(Tensor::randn([2, 8], CPU));
    let sensor = Tensor::randn([2, 12, 3], CPU);
    let state = Tensor::randn([2, 5], CPU);
    let cond = |vl: &VlInput, sensor: &Tensor, state: &Tensor| {
        h.condition(&CondInput { vl, sensor, state: Some(state) }, false).unwrap()
    };
    let base = cond(&vl, &sensor, &state);
    assert_eq!(base.size(), vec![2, 16]);
    let changed = |c: Tensor| (c - &base).abs().max().double_value(&[]) > 1e-4;
    assert!(changed(cond(&VlInput::pooled(Tensor::randn([2, 8], CPU)), &sensor, &state)), "VL matters");
    assert!(changed(cond(&vl, &(&sensor + 1.0), &state)), "sensor matters");
    assert!(changed(cond(&vl, &sensor, &(&state + 1.0))), "state matters");
    assert!(
        matches!(h.sample(&CondInput { vl: &vl, sensor: &sensor, state: None }, 5, 0), Err(PolicyError::Input { name, .. }) if name == "state")
    );
}

#[test]
fn cross_attention_fusion_attends_over_unpooled_tokens_and_uses_the_sensor() {
    let _rng = rng_lock();
    let h = heads(tiny(FusionKind::CrossAttention, 0));
    let _g = tch::no_grad_guard();
    let tokens = Tensor::randn([2, 6, 8], CPU);
    // Sample 0 has 4 real tokens, sample 1 all 6.
    let mask =
        Tensor::from_slice(&[true, true, true, true, false, false, true, true, true, true, true, true]).view([2, 6]);
    let sensor = Tensor::randn([2, 12, 3], CPU);
    let pooled = Tensor::zeros([2, 8], CPU);
    let cond = |tokens: &Tensor, sensor: &Tensor| {
        let vl =
            VlInput { pooled: pooled.shallow_clone(), tokens: Some((tokens.shallow_clone(), mask.shallow_clone())) };
        h.condition(&CondInput { vl: &vl, sensor, state: None }, false).unwrap()
    };
    let base = cond(&tokens, &sensor);
    let diff = |c: &Tensor, i: i64| (c.get(i) - base.get(i)).abs().max().double_value(&[]);
    // Padding does not leak: changing sample 0's masked tokens changes nothing.
    let padded = tokens.copy();
    let _ = padded.get(0).narrow(0, 4, 2).fill_(100.0);
    let c = cond(&padded, &sensor);
    assert!(diff(&c, 0) < 1e-6 && diff(&c, 1) < 1e-6, "masked tokens changed the condition");
    // A real token matters, and so does the sensor (the reference's variant ignored it).
    let real = tokens.copy();
    let _ = real.get(0).get(1).fill_(3.0);
    assert!(diff(&cond(&real, &sensor), 0) > 1e-4);
    assert!(diff(&cond(&tokens, &(&sensor + 1.0)), 0) > 1e-4);
    // Without tokens, or with a fully masked row: a clear error.
    let vl = VlInput::pooled(pooled.shallow_clone());
    assert!(
        matches!(h.condition(&CondInput { vl: &vl, sensor: &sensor, state: None }, false), Err(PolicyError::Input { name, .. }) if name == "vl.tokens")
    );
    let vl = VlInput { pooled: pooled.shallow_clone(), tokens: Some((tokens.shallow_clone(), mask.zeros_like())) };
    assert!(
        matches!(h.condition(&CondInput { vl: &vl, sensor: &sensor, state: None }, false), Err(PolicyError::Input { name, .. }) if name == "vl.mask")
    );
}

#[test]
fn parameter_groups_split_components_and_exclude_biases_norms_from_decay() {
    let _rng = rng_lock();
    let h = heads(tiny(FusionKind::Concat, 0));
    let g = h.param_groups();
    assert!(g.sensor_encoder.iter().all(|p| p.name.starts_with("sensor_encoder.")));
    assert!(g.action_expert.iter().all(|p| p.name.starts_with("action_expert.")));
    let all: Vec<_> = g.sensor_encoder.iter().chain(&g.action_expert).collect();
    let total: i64 = all.iter().map(|p| p.tensor.numel() as i64).sum();
    assert_eq!(total, h.num_parameters(""));
    assert!(all.iter().all(|p| p.tensor.kind() == Kind::Float && p.tensor.requires_grad()), "fp32 trainable masters");
    assert!(!all.iter().any(|p| p.name.contains("running_")), "BatchNorm statistics are not parameters");
    let decay = |name: &str| all.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("{name}")).decay;
    assert!(decay("action_expert.transformer.layers.0.linear1.weight"));
    assert!(decay("sensor_encoder.conv.0.weight"));
    assert!(!decay("action_expert.transformer.layers.0.linear1.bias"));
    assert!(!decay("action_expert.transformer.layers.0.norm1.weight"));
    assert!(!decay("sensor_encoder.conv.1.weight"), "BatchNorm weight");
    assert!(!decay("action_expert.pos_embed"));
}

#[test]
fn loss_is_invariant_to_micro_batching_and_trains_in_bf16() {
    let _rng = rng_lock();
    let mut h = heads(tiny(FusionKind::Concat, 0));
    let vl = VlInput::pooled(Tensor::randn([4, 8], CPU));
    let sensor = Tensor::randn([4, 12, 3], CPU);
    let actions = Tensor::randn([4, 4, 2], CPU);
    let seeds = [11, 12, 13, 14];
    let full = h.loss(&CondInput { vl: &vl, sensor: &sensor, state: None }, &actions, &seeds, false).unwrap();
    let half = |r: std::ops::Range<i64>| {
        let vl = VlInput::pooled(vl.pooled.narrow(0, r.start, 2));
        let c = CondInput { vl: &vl, sensor: &sensor.narrow(0, r.start, 2), state: None };
        h.loss(&c, &actions.narrow(0, r.start, 2), &seeds[r.start as usize..r.end as usize], false)
            .unwrap()
            .double_value(&[])
    };
    let micro = (half(0..2) + half(2..4)) / 2.0;
    assert!((full.double_value(&[]) - micro).abs() < 1e-5, "batch {} vs micro-batches {micro}", full.double_value(&[]));
    // Other seeds draw other timesteps/noise.
    let other = h.loss(&CondInput { vl: &vl, sensor: &sensor, state: None }, &actions, &[1, 2, 3, 4], false).unwrap();
    assert!((other.double_value(&[]) - full.double_value(&[])).abs() > 1e-4);

    // bf16 compute: finite loss close to f32, gradients land on the fp32 masters.
    h.set_compute_kind(Kind::BFloat16);
    let c = CondInput { vl: &vl, sensor: &sensor, state: None };
    let loss = h.loss(&c, &actions, &seeds, true).unwrap();
    assert_eq!(loss.kind(), Kind::Float);
    let rel = (loss.double_value(&[]) - full.double_value(&[])).abs() / full.double_value(&[]);
    assert!(rel < 0.1, "bf16 loss {} vs f32 {}", loss.double_value(&[]), full.double_value(&[]));
    loss.backward();
    let g = h.param_groups();
    let w = &g.action_expert.iter().find(|p| p.name == "action_expert.output.weight").unwrap().tensor;
    let grad = w.grad();
    assert!(grad.defined() && grad.kind() == Kind::Float && grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

/// A VL feature source that maps each observation's instruction length to a constant feature.
struct FakeVl;

impl VlFeatureSource for FakeVl {
    fn vl_dim(&self) -> i64 {
        8
    }
    fn features(&self, obs: &[VlObservation]) -> Result<VlInput, vla_finetune::vlm::VlmError> {
        let v: Vec<f32> = obs.iter().flat_map(|o| vec![o.instruction.len() as f32; 8]).collect();
        Ok(VlInput::pooled(Tensor::from_slice(&v).view([obs.len() as i64, 8])))
    }
}

#[test]
fn vla_policy_uses_the_feature_source_or_given_features() {
    let _rng = rng_lock();
    let obs_in = |s: &str| VlObservation { images: vec![], instruction: s.into() };
    let sensor = Tensor::randn([2, 12, 3], CPU);
    let policy = VlaPolicy::new(heads(tiny(FusionKind::Concat, 0))).with_vl_source(Box::new(FakeVl)).unwrap();
    let obs = ObservationBatch {
        vl: None,
        vl_inputs: vec![obs_in("abc"), obs_in("abcdef")],
        sensor: sensor.shallow_clone(),
        state: None,
    };
    let via_source = policy.act(&obs, None, 3).unwrap();
    let given = Tensor::from_slice(&[[3.0f32; 8], [6.0; 8]].concat()).view([2, 8]);
    let obs2 = ObservationBatch {
        vl: Some(VlInput::pooled(given)),
        vl_inputs: vec![],
        sensor: sensor.shallow_clone(),
        state: None,
    };
    assert!(via_source.equal(&policy.act(&obs2, Some(5), 3).unwrap()), "default steps (5) and the same features");
    assert_eq!(via_source.size(), vec![2, 4, 2]);

    let bare = VlaPolicy::new(heads(tiny(FusionKind::Concat, 0)));
    assert!(matches!(bare.act(&obs, None, 0), Err(PolicyError::NoVlFeatures)));
    let mut cfg = tiny(FusionKind::Concat, 0);
    cfg.vl_dim = 16;
    let wrong = VlaPolicy::new(PolicyHeads::new(cfg, NormStats::identity(3, 0, 2), Device::Cpu).unwrap());
    assert!(
        matches!(wrong.with_vl_source(Box::new(FakeVl)), Err(PolicyError::Config { field, .. }) if field == "vl_dim")
    );

    let batch = PolicyBatch {
        vl: VlInput::pooled(Tensor::randn([2, 8], CPU)),
        sensor,
        state: None,
        actions: Tensor::randn([2, 4, 2], CPU),
        sample_seeds: vec![1, 2],
    };
    let l = policy.loss(&batch, false).unwrap();
    assert!(l.double_value(&[]).is_finite() && l.size().is_empty());
}
