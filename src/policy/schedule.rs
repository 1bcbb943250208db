//! DDPM cosine noise schedule, the forward (noising) process, and the DDIM / DDPM samplers.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::config::DiffusionConfig;
use super::error::PolicyError;

/// Betas and cumulative alpha products of a DDPM schedule, computed in f64.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoiseSchedule {
    /// `beta_t`, `t = 0 .. T-1`.
    pub betas: Vec<f64>,
    /// `alpha_bar_t = prod_{s <= t} (1 - beta_s)`.
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// The cosine schedule of Nichol & Dhariwal: `alpha_bar(t) = f(t) / f(0)`,
    /// `f(t) = cos(((t / T) + s) / (1 + s) * pi / 2)^2`, betas clipped to `max_beta`.
    pub fn cosine(cfg: &DiffusionConfig) -> Self {
        let t_max = cfg.train_steps as f64;
        let f =
            |t: f64| (((t / t_max) + cfg.cosine_s) / (1.0 + cfg.cosine_s) * std::f64::consts::FRAC_PI_2).cos().powi(2);
        let betas: Vec<f64> =
            (0..cfg.train_steps).map(|i| (1.0 - f(i as f64 + 1.0) / f(i as f64)).min(cfg.max_beta)).collect();
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Self { betas, alphas_cumprod }
    }

    /// Training timesteps `T`.
    pub fn train_steps(&self) -> usize {
        self.betas.len()
    }

    /// Checks that a stored schedule is the one `cfg` describes (same length, same values to
    /// 1e-9); `what` names it in the error.
    pub fn check_matches(&self, cfg: &DiffusionConfig, what: &str) -> Result<(), PolicyError> {
        let expected = Self::cosine(cfg);
        let err = |reason: String| PolicyError::Config { field: format!("{what}.schedule"), reason };
        if self.betas.len() != expected.betas.len() || self.alphas_cumprod.len() != expected.betas.len() {
            return Err(err(format!(
                "has {} betas / {} alphas_cumprod, the config's cosine schedule has {}",
                self.betas.len(),
                self.alphas_cumprod.len(),
                expected.betas.len()
            )));
        }
        let pairs =
            self.betas.iter().zip(&expected.betas).chain(self.alphas_cumprod.iter().zip(&expected.alphas_cumprod));
        if let Some((i, (a, b))) =
            pairs.enumerate().find(|(_, (a, b))| (*a - *b).abs().is_nan() || (*a - *b).abs() > 1e-9)
        {
            return Err(err(format!("entry {i} is {a}, the config's cosine schedule gives {b}")));
        }
        Ok(())
    }

    /// DDIM timesteps for `steps` sampling steps, descending, with "trailing" spacing
    /// (diffusers' `round(arange(T, 0, -T / steps)) - 1`, ties to even): the first is `T-1`,
    /// where `alpha_bar` is ~0, so sampling starts from what pure noise is; `steps = T` gives
    /// `T-1 .. 0`. ("Leading" spacing, `i * floor(T / steps)`, started 10 steps of 100 at
    /// `t = 90`, `alpha_bar = 0.0195`, treating pure noise as if it held 14 % signal.)
    pub fn ddim_timesteps(&self, steps: usize) -> Result<Vec<usize>, PolicyError> {
        let t = self.train_steps();
        if steps == 0 || steps > t {
            return Err(PolicyError::Input {
                name: "ddim_steps".into(),
                reason: format!("must be in 1..={t} (the training schedule's length), got {steps}"),
            });
        }
        // numpy's `arange(T, 0, -T / steps)` computes `T + i * ((T - T / steps) - T)`.
        let (t_f, delta) = (t as f64, (t as f64 - t as f64 / steps as f64) - t as f64);
        Ok((0..steps).map(|i| (t_f + i as f64 * delta).round_ties_even() as usize - 1).collect())
    }

    /// `x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise` for per-sample timesteps
    /// `t [B]` (x0, noise: `[B, ...]`, f32).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Tensor {
        let shape: Vec<i64> = std::iter::once(t.len() as i64).chain(std::iter::repeat_n(1, x0.dim() - 1)).collect();
        let col = |f: &dyn Fn(f64) -> f64| {
            let v: Vec<f32> = t.iter().map(|&i| f(self.alphas_cumprod[i]) as f32).collect();
            Tensor::from_slice(&v).to_device(x0.device()).view(shape.as_slice())
        };
        x0 * col(&|a| a.sqrt()) + noise * col(&|a| (1.0 - a).sqrt())
    }

    /// DDIM sampling from `x` (pure noise at the first timestep) with `steps` steps and
    /// stochasticity `eta` (0: deterministic, the probability-flow discretization; 1: DDPM's
    /// posterior variance). `eps(x_t, t)` predicts the noise; `noise` draws the fresh noise
    /// for `eta > 0`. `x0_range` (lower, upper; broadcast against `x`) clamps each step's `x0`
    /// estimate; None leaves it unclipped.
    pub fn ddim(
        &self,
        mut x: Tensor,
        steps: usize,
        eta: f64,
        x0_range: Option<(&Tensor, &Tensor)>,
        noise: &mut dyn FnMut() -> Tensor,
        eps: &mut dyn FnMut(&Tensor, usize) -> Tensor,
    ) -> Result<Tensor, PolicyError> {
        let ts = self.ddim_timesteps(steps)?;
        for (k, &t) in ts.iter().enumerate() {
            let a_t = self.alphas_cumprod[t];
            let a_prev = ts.get(k + 1).map_or(1.0, |&p| self.alphas_cumprod[p]);
            let e = eps(&x, t);
            let mut x0 = (&x - &e * (1.0 - a_t).sqrt()) / a_t.sqrt();
            if let Some((lo, hi)) = x0_range {
                x0 = x0.clamp_tensor(Some(lo), Some(hi));
            }
            let sigma = eta * ((1.0 - a_prev) / (1.0 - a_t)).sqrt() * (1.0 - a_t / a_prev).sqrt();
            let dir = (1.0 - a_prev - sigma * sigma).max(0.0).sqrt();
            x = x0 * a_prev.sqrt() + e * dir;
            if sigma > 0.0 {
                x += noise() * sigma;
            }
        }
        Ok(x)
    }

    /// Ancestral DDPM sampling over all `T` steps with the posterior mean
    /// `(x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)` and variance
    /// `beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)` (no noise at `t = 0`).
    pub fn ddpm(
        &self,
        mut x: Tensor,
        noise: &mut dyn FnMut() -> Tensor,
        eps: &mut dyn FnMut(&Tensor, usize) -> Tensor,
    ) -> Tensor {
        for t in (0..self.train_steps()).rev() {
            let (b, a_bar) = (self.betas[t], self.alphas_cumprod[t]);
            let e = eps(&x, t);
            x = (&x - e * (b / (1.0 - a_bar).sqrt())) / (1.0 - b).sqrt();
            if t > 0 {
                let var = b * (1.0 - self.alphas_cumprod[t - 1]) / (1.0 - a_bar);
                x += noise() * var.sqrt();
            }
        }
        x
    }
}

/// Seeded standard-normal and timestep draws, independent of libtorch's global generator.
#[derive(Debug, Clone)]
pub struct NoiseRng(StdRng);

impl NoiseRng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }

    /// A tensor of standard-normal f32 values (Box-Muller) on `device`.
    pub fn randn(&mut self, shape: &[i64], device: Device) -> Tensor {
        let n: i64 = shape.iter().product();
        let mut v = Vec::with_capacity(n as usize + 1);
        while (v.len() as i64) < n {
            let u1: f64 = 1.0 - self.0.gen::<f64>();
            let u2: f64 = self.0.gen::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let a = 2.0 * std::f64::consts::PI * u2;
            v.push((r * a.cos()) as f32);
            v.push((r * a.sin()) as f32);
        }
        v.truncate(n as usize);
        Tensor::from_slice(&v).view(shape).to_kind(Kind::Float).to_device(device)
    }

    /// A uniform timestep in `0 .. t`.
    pub fn timestep(&mut self, t: usize) -> usize {
        self.0.gen_range(0..t)
    }
}
