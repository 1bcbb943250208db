//! Noise schedule and samplers against hand-computed references, seed determinism, and a toy
//! two-mode fit of the diffusion action expert.

use crate::support::rng_lock;
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};
use vla_finetune::policy::{
    ActionExpertConfig, CondInput, DiffusionConfig, FeatureStats, NoiseRng, NoiseSchedule, NormMode, NormStats,
    Normalizer, PolicyConfig, PolicyError, PolicyHeads, SensorEncoderConfig, VlInput,
};

/// libtorch on one thread: the CI machine's 2 cores are shared, and oversubscribed intra-op
/// threads make these small ops an order of magnitude slower.
fn one_thread() {
    tch::set_num_threads(1);
}

fn schedule() -> NoiseSchedule {
    one_thread();
    NoiseSchedule::cosine(&DiffusionConfig::default())
}

#[test]
fn cosine_schedule_matches_closed_form() {
    let s = schedule();
    assert_eq!(s.train_steps(), 100);
    let f = |t: f64| ((t / 100.0 + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
    // Unclipped steps: alpha_bar_t = f(t + 1) / f(0) exactly.
    for t in [0usize, 10, 50, 90, 98] {
        let want = f(t as f64 + 1.0) / f(0.0);
        assert!((s.alphas_cumprod[t] - want).abs() < 1e-12, "t {t}: {} vs {want}", s.alphas_cumprod[t]);
    }
    // The last beta hits the 0.999 cap (f(T) = 0).
    assert_eq!(s.betas[99], 0.999);
    assert!(s.betas.windows(2).all(|w| w[1] >= w[0]), "betas increase");
    // Trailing spacing, as diffusers' `round(arange(T, 0, -T / steps)) - 1` (ties to even).
    assert_eq!(s.ddim_timesteps(10).unwrap(), vec![99, 89, 79, 69, 59, 49, 39, 29, 19, 9]);
    assert_eq!(s.ddim_timesteps(8).unwrap(), vec![99, 87, 74, 61, 49, 37, 24, 11]);
    assert_eq!(s.ddim_timesteps(3).unwrap(), vec![99, 66, 32]);
    assert_eq!(s.ddim_timesteps(1).unwrap(), vec![99]);
    assert_eq!(s.ddim_timesteps(100).unwrap(), (0..100).rev().collect::<Vec<_>>());
    assert!(matches!(s.ddim_timesteps(0), Err(PolicyError::Input { .. })));
    assert!(matches!(s.ddim_timesteps(101), Err(PolicyError::Input { .. })));
}

/// An arbitrary smooth noise predictor (f64).
fn toy_eps(x: &Tensor, t: usize) -> Tensor {
    (x * (0.3 + 0.01 * t as f64)).tanh() + (t as f64 * 0.1).sin() * 0.2
}

#[test]
fn ddim_eta_one_with_all_steps_is_ddpm_ancestral_sampling() {
    let s = schedule();
    let x_t = NoiseRng::new(1).randn(&[64, 8, 7], Device::Cpu).to_kind(Kind::Double);
    let draws = |seed| {
        let mut rng = NoiseRng::new(seed);
        move || rng.randn(&[64, 8, 7], Device::Cpu).to_kind(Kind::Double)
    };
    let ddim = s.ddim(x_t.copy(), 100, 1.0, None, &mut draws(7), &mut toy_eps).unwrap();
    let ddpm = s.ddpm(x_t.copy(), &mut draws(7), &mut toy_eps);
    let scale = ddpm.abs().max().double_value(&[]);
    let d = (&ddim - &ddpm).abs().max().double_value(&[]);
    assert!(d <= 1e-9 * scale.max(1.0), "DDIM(eta 1, T steps) vs DDPM: max diff {d} (scale {scale})");
    // Different noise gives a different result (the comparison is not vacuous).
    let other = s.ddpm(x_t, &mut draws(8), &mut toy_eps);
    assert!((&other - &ddpm).abs().max().double_value(&[]) > 1e-3);
}

/// Exact noise prediction for data x0 ~ N(mu, sd^2) per dimension:
/// E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a sd^2 + 1 - a).
fn gaussian_oracle<'a>(s: &'a NoiseSchedule, mu: &'a Tensor, sd: f64) -> impl FnMut(&Tensor, usize) -> Tensor + 'a {
    move |x: &Tensor, t: usize| {
        let a = s.alphas_cumprod[t];
        (x - mu * a.sqrt()) * ((1.0 - a).sqrt() / (a * sd * sd + 1.0 - a))
    }
}

#[test]
fn ddim_with_all_steps_follows_the_probability_flow_ode() {
    // DDPM's deterministic limit is the probability-flow ODE; for Gaussian data its solution keeps
    // z = (x_t - sqrt(a_t) mu) / sqrt(a_t sd^2 + 1 - a_t), so x_T maps to mu + sd z.
    let s = schedule();
    let sd = 0.5;
    let mu = Tensor::from_slice(&[2.0f64, -1.0, 0.0, 0.5]).view([1, 1, 4]);
    let x_t = NoiseRng::new(3).randn(&[256, 1, 4], Device::Cpu).to_kind(Kind::Double);
    let a = s.alphas_cumprod[99];
    let z = (&x_t - &mu * a.sqrt()) / (a * sd * sd + 1.0 - a).sqrt();
    let exact = &mu + z * sd;
    let mut no_noise = || -> Tensor { unreachable!("eta 0 draws no noise") };
    let ddim = s.ddim(x_t.copy(), 100, 0.0, None, &mut no_noise, &mut gaussian_oracle(&s, &mu, sd)).unwrap();
    let err = |x: &Tensor| (x - &exact).abs().mean(Kind::Double).double_value(&[]);
    let max_err = (&ddim - &exact).abs().max().double_value(&[]);
    assert!(
        max_err < 0.05 && err(&ddim) < 0.01,
        "DDIM(T steps) vs the exact ODE map: max {max_err}, mean {}",
        err(&ddim)
    );
    // DDIM is a first-order discretization of the ODE: half the steps, about twice the error.
    let ddim50 = s.ddim(x_t.copy(), 50, 0.0, None, &mut no_noise, &mut gaussian_oracle(&s, &mu, sd)).unwrap();
    let ratio = err(&ddim50) / err(&ddim);
    assert!((1.6..2.6).contains(&ratio), "error ratio 50 vs 100 steps: {ratio}");

    // The stochastic DDPM sampler reaches the right distribution (mean and std per dimension).
    let mut rng = NoiseRng::new(11);
    let mut noise = || rng.randn(&[4096, 1, 4], Device::Cpu).to_kind(Kind::Double);
    let start = NoiseRng::new(12).randn(&[4096, 1, 4], Device::Cpu).to_kind(Kind::Double);
    let x = s.ddpm(start, &mut noise, &mut gaussian_oracle(&s, &mu, sd));
    let mean_err = (x.mean_dim(0, false, Kind::Double) - mu.view([1, 4])).abs().max().double_value(&[]);
    let std = x.std_dim(0, true, false);
    let std_err = (std - sd).abs().max().double_value(&[]);
    assert!(mean_err < 0.05 && std_err < 0.05, "DDPM samples: mean error {mean_err}, std error {std_err}");
}

#[test]
fn ddim_first_step_starts_from_pure_noise() {
    let s = schedule();
    let f = |t: f64| ((t / 100.0 + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
    // alpha_bar_99 = f(99) / f(0) * (1 - 0.999): the last beta is capped, f(100) = 0.
    let a_first = f(99.0) / f(0.0) * (1.0 - 0.999);
    let snr_first = a_first / (1.0 - a_first);
    assert!((snr_first - 2.4285729e-7).abs() < 1e-13, "hand-computed SNR {snr_first}");
    let mu = Tensor::from_slice(&[2.0f64, -1.0, 0.0, 0.5]).view([1, 1, 4]);
    let sd = 0.5;
    for steps in [1usize, 3, 10, 100] {
        let mut seen = vec![];
        let mut oracle = gaussian_oracle(&s, &mu, sd);
        let mut eps = |x: &Tensor, t: usize| {
            seen.push(t);
            oracle(x, t)
        };
        let mut no_noise = || -> Tensor { unreachable!("eta 0 draws no noise") };
        let x = NoiseRng::new(5).randn(&[16, 1, 4], Device::Cpu).to_kind(Kind::Double);
        let _ = s.ddim(x, steps, 0.0, None, &mut no_noise, &mut eps).unwrap();
        assert_eq!(seen.len(), steps);
        let a = s.alphas_cumprod[seen[0]];
        let snr = a / (1.0 - a);
        assert!(
            (snr - snr_first).abs() <= 1e-9 * snr_first,
            "{steps} steps: first step at t {} has SNR {snr}",
            seen[0]
        );
    }
    // Pure noise is a sample of x_99 (SNR ~ 0), so 10 steps of the exact-oracle sampler land on
    // the data's mean (float64 numpy of the same loop: max mean error 0.001); starting at t = 90
    // (alpha_bar 0.0195, "leading") treats the noise as holding 14 % signal and misses it by 0.12.
    // The std's error (~0.07 either way) is the 10-step discretization's.
    let mut no_noise = || -> Tensor { unreachable!("eta 0 draws no noise") };
    let x_t = NoiseRng::new(9).randn(&[8192, 1, 4], Device::Cpu).to_kind(Kind::Double);
    let x = s.ddim(x_t, 10, 0.0, None, &mut no_noise, &mut gaussian_oracle(&s, &mu, sd)).unwrap();
    let mean_err = (x.mean_dim(0, false, Kind::Double) - mu.view([1, 4])).abs().max().double_value(&[]);
    let std_err = (x.std_dim(0, true, false) - sd).abs().max().double_value(&[]);
    assert!(mean_err < 0.03 && std_err < 0.1, "10-step DDIM samples: mean error {mean_err}, std error {std_err}");
}

fn tiny_config() -> PolicyConfig {
    one_thread();
    PolicyConfig {
        vl_dim: 8,
        state_dim: 0,
        sensor: SensorEncoderConfig {
            window: 8,
            in_channels: 3,
            conv_channels: vec![16],
            d_model: 16,
            n_heads: 2,
            n_layers: 1,
            ff_dim: 32,
            out_dim: 16,
            dropout: 0.0,
        },
        expert: ActionExpertConfig {
            horizon: 4,
            action_dim: 2,
            d_model: 64,
            n_heads: 4,
            n_layers: 2,
            ff_dim: 128,
            dropout: 0.0,
        },
        diffusion: DiffusionConfig { train_steps: 50, ..DiffusionConfig::default() },
        ..PolicyConfig::default()
    }
}

#[test]
fn same_seed_same_actions() {
    let _rng = rng_lock();
    tch::manual_seed(0);
    let heads = PolicyHeads::new(tiny_config(), NormStats::identity(3, 0, 2), Device::Cpu).unwrap();
    let vl = VlInput::pooled(Tensor::randn([3, 8], (Kind::Float, Device::Cpu)));
    let sensor = Tensor::randn([3, 8, 3], (Kind::Float, Device::Cpu));
    let c = CondInput { vl: &vl, sensor: &sensor, state: None };
    let a = heads.sample(&c, 10, 42).unwrap();
    let b = heads.sample(&c, 10, 42).unwrap();
    let other = heads.sample(&c, 10, 43).unwrap();
    assert_eq!(a.size(), vec![3, 4, 2]);
    assert!(a.equal(&b), "same seed, same output");
    assert!(!a.equal(&other), "different seed, different output");
    let ea = heads.sample_eta(&c, 10, 0.5, 5).unwrap();
    assert!(ea.equal(&heads.sample_eta(&c, 10, 0.5, 5).unwrap()), "stochastic DDIM is seeded too");
    assert!(matches!(heads.sample(&c, 51, 0), Err(PolicyError::Input { ref name, .. }) if name == "ddim_steps"));
}

#[test]
fn expert_fits_two_modes_without_averaging_them() {
    let _rng = rng_lock();
    tch::manual_seed(1);
    let cfg = tiny_config();
    // Physical actions: every step is +(30, 10) or -(30, 10) (mm-like units), small jitter.
    let n = 64i64;
    let sign =
        Tensor::from_slice(&(0..n).map(|i| if i % 2 == 0 { 1.0f32 } else { -1.0 }).collect::<Vec<_>>()).view([n, 1, 1]);
    let base = Tensor::from_slice(&[30.0f32, 10.0]).view([1, 1, 2]);
    let actions = &sign * &base + Tensor::randn([n, 4, 2], (Kind::Float, Device::Cpu)) * 0.5;
    let flat = Vec::<f32>::try_from(actions.reshape([-1])).unwrap();
    let action_stats = Normalizer { mode: NormMode::MeanStd, stats: FeatureStats::from_samples(&flat, 2).unwrap() };
    let norm = NormStats { action: action_stats, ..NormStats::identity(3, 0, 2) };
    let heads = PolicyHeads::new(cfg, norm, Device::Cpu).unwrap();
    // The condition carries no information about the mode.
    let vl = VlInput::pooled(Tensor::zeros([n, 8], (Kind::Float, Device::Cpu)));
    let sensor = Tensor::ones([n, 8, 3], (Kind::Float, Device::Cpu));
    let c = CondInput { vl: &vl, sensor: &sensor, state: None };

    let mut opt = nn::Adam::default().build(heads.var_store(), 1e-3).unwrap();
    let mut losses = vec![];
    for step in 0..800u64 {
        let seeds: Vec<u64> = (0..n as u64).map(|i| step * 1000 + i).collect();
        let loss = heads.loss(&c, &actions, &seeds, true).unwrap();
        opt.backward_step(&loss);
        losses.push(loss.double_value(&[]));
    }
    let first = losses[..20].iter().sum::<f64>() / 20.0;
    let last = losses[losses.len() - 50..].iter().sum::<f64>() / 50.0;
    assert!(last < 0.5 * first, "loss went from {first} to {last}");

    let vl1 = VlInput::pooled(Tensor::zeros([128, 8], (Kind::Float, Device::Cpu)));
    let s1 = Tensor::ones([128, 8, 3], (Kind::Float, Device::Cpu));
    let x = heads.sample(&CondInput { vl: &vl1, sensor: &s1, state: None }, 10, 7).unwrap();
    // Per sample: the mean first coordinate over the horizon, in physical units.
    let m = Vec::<f32>::try_from(x.select(2, 0).mean_dim(1, false, Kind::Float)).unwrap();
    let near = |c: f32| m.iter().filter(|v| (**v - c).abs() < 6.0).count();
    let (pos, neg, mid) = (near(30.0), near(-30.0), m.iter().filter(|v| v.abs() < 15.0).count());
    assert!(pos >= 32 && neg >= 32, "both modes covered: {pos} near +30, {neg} near -30 of 128");
    eprintln!("modes: {pos} near +30, {neg} near -30, {mid} in between; loss {first} -> {last}");
    assert!(mid <= 10, "{mid} of 128 samples near the average of the modes");
}
