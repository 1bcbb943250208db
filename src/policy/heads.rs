//! The policy heads as one trainable unit: sensor encoder + fusion + diffusion action expert,
//! with normalization, noise schedule, training loss and DDIM sampling in physical units.

use tch::{nn, Device, Kind, Tensor};

use super::config::{FusionKind, PolicyConfig};
use super::error::PolicyError;
use super::expert::ActionExpert;
use super::fusion::VlTokens;
use super::normalize::{self, NormStats};
use super::schedule::{NoiseRng, NoiseSchedule};
use super::sensor::{BatchStats, SensorEncoder};
use super::sync_bn::SyncBatchNorm;

/// Variable-name prefix of the sensor encoder.
pub const SENSOR_PREFIX: &str = "sensor_encoder";
/// Variable-name prefix of the action expert (fusion included).
pub const EXPERT_PREFIX: &str = "action_expert";

/// VL features of a batch: pooled, plus unpooled tokens for cross-attention fusion.
#[derive(Debug)]
pub struct VlInput {
    /// `[B, vl_dim]` (mean-pooled last hidden state).
    pub pooled: Tensor,
    /// `[B, L, vl_dim]` unpooled tokens and their `[B, L]` bool mask (true = real token);
    /// required by [`FusionKind::CrossAttention`], ignored otherwise.
    pub tokens: Option<(Tensor, Tensor)>,
}

impl VlInput {
    /// Pooled features only.
    pub fn pooled(pooled: Tensor) -> Self {
        Self { pooled, tokens: None }
    }
}

/// The conditioning inputs of one batch, in physical units.
#[derive(Debug)]
pub struct CondInput<'a> {
    /// VL features (may carry gradient when the backbone trains).
    pub vl: &'a VlInput,
    /// Sensor windows `[B, T, in_channels]` (raw; normalized and resampled here).
    pub sensor: &'a Tensor,
    /// Robot state `[B, state_dim]` (raw) when the config has `state_dim > 0`.
    pub state: Option<&'a Tensor>,
}

/// A named trainable tensor and whether weight decay applies to it.
#[derive(Debug)]
pub struct HeadsVar {
    /// Variable name, e.g. `action_expert.transformer.layers.0.linear1.weight`.
    pub name: String,
    /// The fp32 master parameter (shares storage with the model).
    pub tensor: Tensor,
    /// False for biases, norm weights and positional embeddings.
    pub decay: bool,
}

/// Trainable parameters split by component, sorted by name.
#[derive(Debug)]
pub struct ParamGroups {
    /// `sensor_encoder.*`.
    pub sensor_encoder: Vec<HeadsVar>,
    /// `action_expert.*` (fusion included).
    pub action_expert: Vec<HeadsVar>,
}

/// Sensor encoder + action expert with their variables, normalization and schedule.
pub struct PolicyHeads {
    vs: nn::VarStore,
    cfg: PolicyConfig,
    norm: NormStats,
    affine: Affine,
    schedule: NoiseSchedule,
    sensor: SensorEncoder,
    expert: ActionExpert,
    compute_kind: Kind,
    bn_frozen: bool,
    bn_sync: Option<SyncBatchNorm>,
}

/// Normalization maps as tensors on the heads' device.
struct Affine {
    sensor: (Tensor, Tensor),
    state: Option<(Tensor, Tensor)>,
    action: (Tensor, Tensor),
}

impl Affine {
    fn new(norm: &NormStats, device: Device) -> Self {
        Self {
            sensor: norm.sensor.affine_tensors(device),
            state: norm.state.as_ref().map(|s| s.affine_tensors(device)),
            action: norm.action.affine_tensors(device),
        }
    }
}

impl std::fmt::Debug for PolicyHeads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyHeads").field("cfg", &self.cfg).field("device", &self.vs.device()).finish()
    }
}

impl PolicyHeads {
    /// Fresh (randomly initialized, fp32) heads on `device`; checks config and stats.
    pub fn new(cfg: PolicyConfig, norm: NormStats, device: Device) -> Result<Self, PolicyError> {
        cfg.validate()?;
        norm.validate(cfg.sensor.in_channels as usize, cfg.state_dim as usize, cfg.expert.action_dim as usize)?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let sensor = SensorEncoder::new(&root / SENSOR_PREFIX, &cfg.sensor);
        let expert = ActionExpert::new(&root / EXPERT_PREFIX, &cfg);
        let schedule = NoiseSchedule::cosine(&cfg.diffusion);
        let affine = Affine::new(&norm, device);
        Ok(Self {
            vs,
            cfg,
            norm,
            affine,
            schedule,
            sensor,
            expert,
            compute_kind: Kind::Float,
            bn_frozen: false,
            bn_sync: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// The normalization statistics.
    pub fn norm(&self) -> &NormStats {
        &self.norm
    }

    /// Replaces the normalization statistics (e.g. with the dataset's, before training).
    pub fn set_norm(&mut self, norm: NormStats) -> Result<(), PolicyError> {
        let c = &self.cfg;
        norm.validate(c.sensor.in_channels as usize, c.state_dim as usize, c.expert.action_dim as usize)?;
        self.affine = Affine::new(&norm, self.vs.device());
        self.norm = norm;
        Ok(())
    }

    /// The noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The device the variables live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Every variable (trainable and BatchNorm running statistics), by name.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Mutable access to the variables (optimizers, loading).
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// Dtype of the forward computation (f32 default, bf16 for mixed precision). Parameters stay
    /// fp32; they are cast on use so gradients reach the fp32 masters.
    pub fn set_compute_kind(&mut self, kind: Kind) {
        self.compute_kind = kind;
    }

    /// Freezes the sensor encoder's BatchNorm: training forwards use its running statistics
    /// instead of batch statistics (fine-tuning with small micro-batches; makes a gradient
    /// independent of how a batch is split into micro-batches).
    pub fn set_batch_norm_frozen(&mut self, frozen: bool) {
        self.bn_frozen = frozen;
    }

    /// Training forwards normalise with the statistics of every rank of `group` (data-parallel
    /// training; see [`SyncBatchNorm`]); None: this process's batch.
    pub fn set_batch_norm_sync(&mut self, group: Option<std::sync::Arc<crate::dist::Group>>) {
        self.bn_sync = group.map(|g| SyncBatchNorm::new(g, self.cfg.sensor.conv_channels.clone()));
    }

    /// The BatchNorm synchronisation, when set.
    pub fn batch_norm_sync(&self) -> Option<&SyncBatchNorm> {
        self.bn_sync.as_ref()
    }

    /// A data-parallel micro-batch without samples here ([`SyncBatchNorm::idle_pass`]); a no-op
    /// without synchronisation.
    pub fn batch_norm_idle_pass(&self) -> Result<(), crate::dist::DistError> {
        match &self.bn_sync {
            Some(sync) => sync.idle_pass(&self.sensor.batch_norm_running()),
            None => Ok(()),
        }
    }

    /// Number of trainable scalars whose name starts with `prefix` (`""` for all).
    pub fn num_parameters(&self, prefix: &str) -> i64 {
        self.vs
            .variables()
            .iter()
            .filter(|(n, t)| n.starts_with(prefix) && t.requires_grad())
            .map(|(_, t)| t.numel() as i64)
            .sum()
    }

    /// Trainable parameters by component with weight-decay flags, sorted by name.
    pub fn param_groups(&self) -> ParamGroups {
        let mut vars: Vec<(String, Tensor)> =
            self.vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut groups = ParamGroups { sensor_encoder: vec![], action_expert: vec![] };
        for (name, tensor) in vars {
            let decay = tensor.dim() > 1 && !name.ends_with("pos_embed");
            let p = HeadsVar { decay, tensor, name };
            if p.name.starts_with(SENSOR_PREFIX) {
                groups.sensor_encoder.push(p);
            } else {
                groups.action_expert.push(p);
            }
        }
        groups
    }

    /// Checks shapes and finiteness of the conditioning inputs; returns the batch size.
    fn check_cond(&self, c: &CondInput) -> Result<i64, PolicyError> {
        let cfg = &self.cfg;
        let sz = c.sensor.size();
        if sz.len() != 3 || sz[2] != cfg.sensor.in_channels || sz[1] < 1 {
            return Err(input(
                "sensor",
                format!("expected [B, T, {}] with T >= 1, got {sz:?}", cfg.sensor.in_channels),
            ));
        }
        let b = sz[0];
        check_shape("vl.pooled", &c.vl.pooled, &[b, cfg.vl_dim])?;
        check_finite("sensor", c.sensor)?;
        check_finite("vl.pooled", &c.vl.pooled)?;
        match (cfg.state_dim, c.state) {
            (0, None) => {}
            (0, Some(_)) => return Err(input("state", "given, but the config has state_dim 0".into())),
            (d, Some(s)) => {
                check_shape("state", s, &[b, d])?;
                check_finite("state", s)?;
            }
            (d, None) => return Err(input("state", format!("missing, the config has state_dim {d}"))),
        }
        if cfg.fusion.kind == FusionKind::CrossAttention {
            let Some((tokens, mask)) = &c.vl.tokens else {
                return Err(input(
                    "vl.tokens",
                    "cross-attention fusion needs unpooled VL tokens and their mask".into(),
                ));
            };
            let ts = tokens.size();
            if ts.len() != 3 || ts[0] != b || ts[2] != cfg.vl_dim || ts[1] < 1 {
                return Err(input("vl.tokens", format!("expected [{b}, L, {}], got {ts:?}", cfg.vl_dim)));
            }
            check_shape("vl.mask", mask, &[b, ts[1]])?;
            if mask.kind() != Kind::Bool {
                return Err(input("vl.mask", format!("expected bool, got {:?}", mask.kind())));
            }
            if mask.any_dim(1, false).logical_not().any().int64_value(&[]) != 0 {
                return Err(input("vl.mask", "a row has no real token".into()));
            }
            check_finite("vl.tokens", tokens)?;
        }
        Ok(b)
    }

    /// Encodes raw sensor windows `[B, T, C]` -> `[B, out_dim]` (compute dtype).
    pub fn encode_sensor(&self, sensor: &Tensor, train: bool) -> Tensor {
        let x = normalize::apply(&sensor.to_device(self.device()), &self.affine.sensor).to_kind(self.compute_kind);
        let stats = match &self.bn_sync {
            _ if !train || self.bn_frozen => BatchStats::Running,
            Some(sync) => BatchStats::Synced(sync),
            None => BatchStats::Batch,
        };
        self.sensor.forward_bn(&x, train, stats)
    }

    /// The denoiser's condition `[B, d_model]` (compute dtype) after checking the inputs.
    pub fn condition(&self, c: &CondInput, train: bool) -> Result<Tensor, PolicyError> {
        self.check_cond(c)?;
        Ok(self.condition_unchecked(c, train))
    }

    fn condition_unchecked(&self, c: &CondInput, train: bool) -> Tensor {
        let dev = self.device();
        let k = self.compute_kind;
        let s = self.encode_sensor(c.sensor, train);
        let state = match (c.state, &self.affine.state) {
            (Some(x), Some(a)) => Some(normalize::apply(&x.to_device(dev), a).to_kind(k)),
            _ => None,
        };
        let tokens = c.vl.tokens.as_ref().map(|(t, m)| (t.to_device(dev).to_kind(k), m.to_device(dev)));
        let tok = tokens.as_ref().map(|(t, m)| VlTokens { tokens: t, mask: m });
        let vl = c.vl.pooled.to_device(dev).to_kind(k);
        self.expert.fusion.forward_t(&vl, tok.as_ref(), &s, state.as_ref(), train)
    }

    /// Predicted noise `[B, H, A]` (f32) for normalized noisy actions `x_t`, timesteps `t [B]`
    /// and a condition from [`Self::condition`].
    pub fn denoise(&self, x_t: &Tensor, t: &Tensor, cond: &Tensor, train: bool) -> Tensor {
        self.expert.forward_t(x_t, &t.to_device(self.device()), cond, train)
    }

    /// Normalizes physical actions `[B, H, A]`.
    pub fn normalize_actions(&self, actions: &Tensor) -> Tensor {
        normalize::apply(&actions.to_device(self.device()), &self.affine.action)
    }

    /// De-normalizes network-space actions to physical units (no clamping).
    pub fn denormalize_actions(&self, actions: &Tensor) -> Tensor {
        normalize::invert(actions, &self.affine.action)
    }

    fn check_actions(&self, actions: &Tensor, b: i64) -> Result<(), PolicyError> {
        check_shape("actions", actions, &[b, self.cfg.expert.horizon, self.cfg.expert.action_dim])?;
        check_finite("actions", actions)
    }

    /// Diffusion loss: MSE between the true and predicted noise, with a uniform timestep and
    /// standard-normal noise per sample drawn from `sample_seeds[i]` (one seed per sample, so
    /// a batch split into micro-batches draws the same values). Dropout (when `train`) uses
    /// libtorch's global generator. Returns an f32 scalar.
    pub fn loss(
        &self,
        c: &CondInput,
        actions: &Tensor,
        sample_seeds: &[u64],
        train: bool,
    ) -> Result<Tensor, PolicyError> {
        let b = self.check_cond(c)?;
        self.check_actions(actions, b)?;
        if sample_seeds.len() as i64 != b {
            return Err(input(
                "sample_seeds",
                format!("expected {b} seeds (one per sample), got {}", sample_seeds.len()),
            ));
        }
        let e = &self.cfg.expert;
        let dev = self.device();
        let t_max = self.schedule.train_steps();
        let (ts, noise): (Vec<usize>, Vec<Tensor>) = sample_seeds
            .iter()
            .map(|&s| {
                let mut rng = NoiseRng::new(s);
                let t = rng.timestep(t_max);
                (t, rng.randn(&[1, e.horizon, e.action_dim], dev))
            })
            .unzip();
        let noise = Tensor::cat(&noise, 0);
        let x0 = self.normalize_actions(actions);
        let x_t = self.schedule.add_noise(&x0, &noise, &ts);
        let t = Tensor::from_slice(&ts.iter().map(|&t| t as i64).collect::<Vec<_>>()).to_device(dev);
        let cond = self.condition_unchecked(c, train);
        Ok(self.denoise(&x_t, &t, &cond, train).mse_loss(&noise, tch::Reduction::Mean))
    }

    /// Samples an action chunk `[B, H, A]` in physical units with deterministic DDIM (`eta` 0)
    /// and `ddim_steps` steps (1 ..= T) from noise drawn with `seed`; no gradient.
    pub fn sample(&self, c: &CondInput, ddim_steps: usize, seed: u64) -> Result<Tensor, PolicyError> {
        self.sample_eta(c, ddim_steps, 0.0, seed)
    }

    /// [`Self::sample`] with DDIM stochasticity `eta` (1: DDPM-like ancestral sampling).
    pub fn sample_eta(&self, c: &CondInput, ddim_steps: usize, eta: f64, seed: u64) -> Result<Tensor, PolicyError> {
        let b = c.sensor.size().first().copied().unwrap_or(0);
        let mut rng = NoiseRng::new(seed);
        let x_t = rng.randn(&[b, self.cfg.expert.horizon, self.cfg.expert.action_dim], self.device());
        self.sample_from(c, x_t, ddim_steps, eta, &mut rng)
    }

    /// DDIM from the given initial noise `x_t [B, H, A]` (normalized space); `rng` draws the
    /// fresh noise when `eta > 0`. Each step's `x0` estimate is clamped to the training actions'
    /// range: the first step starts at `alpha_bar ~ 0` (SNR 2.4e-7 for the default schedule),
    /// where a noise prediction's error reaches `x0` amplified ~2000 times. Returns physical
    /// units; no gradient.
    pub fn sample_from(
        &self,
        c: &CondInput,
        x_t: Tensor,
        ddim_steps: usize,
        eta: f64,
        rng: &mut NoiseRng,
    ) -> Result<Tensor, PolicyError> {
        if !(0.0..=1.0).contains(&eta) {
            return Err(input("eta", format!("must be in [0, 1], got {eta}")));
        }
        let _guard = tch::no_grad_guard();
        let cond = self.condition(c, false)?;
        let b = cond.size()[0];
        let shape = [b, self.cfg.expert.horizon, self.cfg.expert.action_dim];
        check_shape("x_t", &x_t, &shape)?;
        let dev = self.device();
        let x_t = x_t.to_device(dev).to_kind(Kind::Float);
        let mut noise = || rng.randn(&shape, dev);
        let mut eps =
            |x: &Tensor, t: usize| self.denoise(x, &Tensor::full([b], t as i64, (Kind::Int64, dev)), &cond, false);
        let (lo, hi) = self.action_range();
        let x0 = self.schedule.ddim(x_t, ddim_steps, eta, Some((&lo, &hi)), &mut noise, &mut eps)?;
        Ok(self.denormalize_actions(&x0))
    }

    /// The training actions' range per action dimension in network space, `[1, 1, A]` each
    /// (normalized min and max; `[-1, 1]` under identity statistics, the reference's clamp).
    fn action_range(&self) -> (Tensor, Tensor) {
        let st = &self.norm.action.stats;
        let a = self.cfg.expert.action_dim;
        let norm = |v: &[f32]| self.normalize_actions(&Tensor::from_slice(v).view([1, 1, a]));
        (norm(&st.min), norm(&st.max))
    }
}

fn input(name: &str, reason: String) -> PolicyError {
    PolicyError::Input { name: name.into(), reason }
}

fn check_shape(name: &str, t: &Tensor, expected: &[i64]) -> Result<(), PolicyError> {
    let s = t.size();
    if s != expected {
        return Err(input(name, format!("expected shape {expected:?}, got {s:?}")));
    }
    if !t.is_floating_point() && t.kind() != Kind::Bool {
        return Err(input(name, format!("expected a float tensor, got {:?}", t.kind())));
    }
    Ok(())
}

fn check_finite(name: &str, t: &Tensor) -> Result<(), PolicyError> {
    if !t.is_floating_point() {
        return Err(input(name, format!("expected a float tensor, got {:?}", t.kind())));
    }
    let bad = t.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
    if bad > 0 {
        return Err(input(name, format!("{bad} non-finite value(s)")));
    }
    Ok(())
}
