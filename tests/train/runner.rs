//! The generic loop on a toy task: trains, validates, publishes on best, plots; a cancel
//! mid-epoch followed by a resume ends bitwise equal to an uninterrupted run.

use std::collections::BTreeMap;
use std::path::Path;

use crate::support::rng_lock;
use tch::{Device, Kind, Tensor};
use vla_finetune::checkpoint::publish::{verify, PublishItem, Source};
use vla_finetune::train::controller::{CancelToken, JobContext};
use vla_finetune::train::error::TrainError;
use vla_finetune::train::optim::{Accumulation, AdamWConfig, GroupConfig, NamedParam};
use vla_finetune::train::progress::{CacheStatus, Phase, ProgressHub};
use vla_finetune::train::runner::{run, Runner, RunnerConfig, TrainTask};

struct Toy {
    enc: Tensor,
    head: Tensor,
    x: Tensor,
    y: Tensor,
    vx: Tensor,
    vy: Tensor,
    epochs_begun: u64,
    losses: u64,
    cancel_after: Option<(u64, CancelToken)>,
    /// Simulated accelerator: micro-batches larger than this run out of memory.
    max_micro: usize,
    /// Epochs passed to `end_epoch` and to `validate`, in order.
    ended: Vec<u64>,
    validated: Vec<u64>,
}

fn toy(cancel_after: Option<(u64, CancelToken)>) -> Toy {
    let o = (Kind::Float, Device::Cpu);
    let x = Tensor::linspace(-2.0, 2.0, 90, o).view([30, 3]).sin();
    let vx = Tensor::linspace(-1.9, 1.9, 30, o).view([10, 3]).sin();
    let target = |x: &Tensor| x.matmul(&Tensor::from_slice(&[0.5f32, -1.0, 2.0]).view([3, 1])).tanh();
    Toy {
        enc: (Tensor::eye(3, o) * 0.5).set_requires_grad(true),
        head: Tensor::full([1, 3], 0.1, o).set_requires_grad(true),
        y: target(&x),
        vy: target(&vx),
        x,
        vx,
        epochs_begun: 0,
        losses: 0,
        cancel_after,
        max_micro: usize::MAX,
        ended: Vec::new(),
        validated: Vec::new(),
    }
}

impl Toy {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        x.matmul(&self.enc.tr()).relu().dropout(0.2, train).matmul(&self.head.tr())
    }
}

impl TrainTask for Toy {
    fn params(&mut self) -> Vec<NamedParam> {
        vec![
            NamedParam {
                name: "sensor.enc.weight".into(),
                group: "sensor_encoder".into(),
                tensor: self.enc.shallow_clone(),
                decay: true,
            },
            NamedParam {
                name: "heads.out.weight".into(),
                group: "heads".into(),
                tensor: self.head.shallow_clone(),
                decay: true,
            },
        ]
    }
    fn train_len(&self) -> usize {
        30
    }
    fn begin_epoch(&mut self, _epoch: u64, _chunk: usize) -> Result<Phase, TrainError> {
        self.epochs_begun += 1;
        Ok(Phase::Training)
    }
    fn loss(&mut self, samples: &[usize], _global_step: u64) -> Result<(Tensor, f64), TrainError> {
        if samples.len() > self.max_micro {
            // What libtorch raises; the one conversion into TrainError classifies it.
            return Err(tch::TchError::Torch("CUDA out of memory. Tried to allocate 2.00 GiB".into()).into());
        }
        self.losses += 1;
        if let Some((k, token)) = &self.cancel_after {
            if self.losses == *k {
                token.cancel();
            }
        }
        let idx = Tensor::from_slice(&samples.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let pred = self.forward(&self.x.index_select(0, &idx), true);
        Ok(((pred - self.y.index_select(0, &idx)).square().mean(Kind::Float), 0.0))
    }
    fn end_epoch(&mut self, epoch: u64, _chunk: usize) -> Result<(), TrainError> {
        self.ended.push(epoch);
        Ok(())
    }
    fn validate(&mut self, epoch: u64, _chunk: usize) -> Result<BTreeMap<String, f64>, TrainError> {
        self.validated.push(epoch);
        let mse =
            tch::no_grad(|| (self.forward(&self.vx, false) - &self.vy).square().mean(Kind::Float).double_value(&[]));
        Ok(BTreeMap::from([("val_mse".to_string(), mse)]))
    }
    fn deployable(&mut self) -> Result<Vec<PublishItem>, TrainError> {
        let w = Vec::<f32>::try_from(self.head.detach().flatten(0, -1))?;
        Ok(vec![PublishItem { dest: "heads.json".into(), source: Source::Bytes(serde_json::to_vec(&w).unwrap()) }])
    }
    fn cache_state(&self) -> serde_json::Value {
        serde_json::json!({"epochs_begun": self.epochs_begun})
    }
    fn restore_cache_state(&mut self, state: &serde_json::Value) -> Result<(), TrainError> {
        self.epochs_begun =
            state["epochs_begun"].as_u64().ok_or_else(|| TrainError::invalid("toy state", "no epochs_begun"))?;
        Ok(())
    }
    fn cache_status(&self) -> CacheStatus {
        CacheStatus { mode: "off".into(), ..Default::default() }
    }
}

fn config(dir: &Path, resume: bool) -> RunnerConfig {
    RunnerConfig {
        epochs: 4,
        accumulation: Accumulation::new(2, 2).unwrap(),
        adamw: AdamWConfig::default(),
        groups: vec![
            GroupConfig { name: "vl_lora".into(), lr: 1e-5, weight_decay: 0.01 },
            GroupConfig { name: "heads".into(), lr: 3e-2, weight_decay: 0.01 },
            GroupConfig { name: "sensor_encoder".into(), lr: 1e-2, weight_decay: 0.01 },
        ],
        warmup_ratio: 0.1,
        min_lr_ratio: 0.1,
        grad_clip_norm: 1.0,
        seed: 11,
        best_metric: "val_mse".into(),
        val_every_epochs: 1,
        state_dir: dir.join("state"),
        resume,
        publish_dir: Some(dir.join("checkpoints")),
        allow_worse_latest: false,
        base_model_id: "toy".into(),
        plot_file: Some(dir.join("curves.png")),
        group: None,
    }
}

fn ctx(cancel: CancelToken, hub: &ProgressHub) -> JobContext {
    JobContext { job_id: "job-test".into(), cancel, progress: hub.clone() }
}

#[test]
fn trains_validates_publishes_and_plots() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let hub = ProgressHub::new(4096);
    let mut rx = hub.subscribe();
    let mut task = toy(None);
    let before = task.validate(0, 10).unwrap()["val_mse"];
    let mut announced = Vec::new();
    let summary =
        run(&mut task, &config(dir.path(), false), &ctx(CancelToken::new(), &hub), &mut |p| announced.push(p.clone()))
            .unwrap();
    assert!(!summary.cancelled);
    assert_eq!(summary.counters.global_step, 4 * 8); // ceil(30 / 4) = 8 steps per epoch
    assert_eq!(summary.validation.len(), 4);
    let best = summary.best.unwrap();
    assert!(best < 0.7 * before, "validation error {before} -> {best}");
    assert!(!summary.published.is_empty());
    assert_eq!(announced.iter().map(|p| p.version.clone()).collect::<Vec<_>>(), summary.published);
    assert_eq!(announced.last().unwrap().manifest.info["epoch"], 3, "the last epoch is always published");
    for v in &summary.published {
        let m = verify(&dir.path().join("checkpoints").join(v)).unwrap();
        assert_eq!(m.base_model_id, "toy");
        assert!(m.metrics.contains_key("val_mse"));
    }
    let img = image::open(dir.path().join("curves.png")).unwrap();
    assert_eq!((img.width(), img.height()), (960, 400));
    assert!(dir.path().join("state/latest.safetensors").exists() && dir.path().join("state/best.safetensors").exists());
    let mut steps = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if ev.phase == Phase::Training {
            steps.push(ev.step);
            assert!(ev.loss.unwrap().is_finite());
            // Warmup starts at 0 (as transformers' schedule does), then the heads' lr.
            let lr = ev.lr.unwrap();
            assert!(if ev.step == 1 { lr == 0.0 } else { lr > 0.0 && lr <= 3e-2 }, "step {}: lr {lr}", ev.step);
        }
    }
    assert_eq!(steps, (1..=32).collect::<Vec<_>>());
}

#[test]
fn cancel_then_resume_equals_uninterrupted() {
    let _g = rng_lock();
    let hub = ProgressHub::new(16);
    let full_dir = tempfile::tempdir().unwrap();
    let mut full = toy(None);
    let full_sum =
        run(&mut full, &config(full_dir.path(), false), &ctx(CancelToken::new(), &hub), &mut |_| {}).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let token = CancelToken::new();
    // An epoch is 7 steps of 2 micro-batches + 1 step of 1 (30 samples, 2 x 2 per step).
    // Cancel during the 2nd micro-batch of epoch 1's 3rd step; that step completes, then it stops.
    let mut first = toy(Some((15 + 2 * 2 + 2, token.clone())));
    let part = run(&mut first, &config(dir.path(), true), &ctx(token, &hub), &mut |_| {}).unwrap();
    assert!(part.cancelled);
    assert_eq!((part.counters.epoch, part.counters.step_in_epoch, part.counters.global_step), (1, 3, 11));
    drop(first);

    tch::manual_seed(777); // the resumed run must not depend on the generator's state
    let mut second = toy(None);
    let rest = run(&mut second, &config(dir.path(), true), &ctx(CancelToken::new(), &hub), &mut |_| {}).unwrap();
    assert!(!rest.cancelled);
    assert_eq!(rest.counters, full_sum.counters);
    // Cache state restored: epochs 0 and 1 were begun before the cancel; 1 (again), 2, 3 after.
    assert_eq!(second.epochs_begun, 5);
    for (a, b) in [(&full.enc, &second.enc), (&full.head, &second.head)] {
        assert_eq!(a.eq_tensor(b).all().int64_value(&[]), 1, "max diff {}", (a - b).abs().max().double_value(&[]));
    }
    assert_eq!(rest.validation, full_sum.validation);
    assert_eq!(rest.best, full_sum.best);
}

#[test]
fn out_of_memory_halves_the_micro_batch_without_losing_the_step() {
    let _g = rng_lock();
    let hub = ProgressHub::new(16);
    // Reference: micro-batch 1 x 4 from the start.
    let ref_dir = tempfile::tempdir().unwrap();
    let mut reference = toy(None);
    let ref_cfg = RunnerConfig { accumulation: Accumulation::new(1, 4).unwrap(), ..config(ref_dir.path(), false) };
    let ref_sum = run(&mut reference, &ref_cfg, &ctx(CancelToken::new(), &hub), &mut |_| {}).unwrap();

    // Configured 2 x 2 on a device that only fits 1: the first step fails, is redone at 1 x 4.
    let dir = tempfile::tempdir().unwrap();
    let mut small = toy(None);
    small.max_micro = 1;
    let sum = run(&mut small, &config(dir.path(), false), &ctx(CancelToken::new(), &hub), &mut |_| {}).unwrap();
    assert_eq!(sum.accumulation, Accumulation::new(1, 4).unwrap());
    assert_eq!(sum.counters, ref_sum.counters, "no step lost, same steps per epoch");
    assert_eq!(small.head.eq_tensor(&reference.head).all().int64_value(&[]), 1);
    assert_eq!(small.enc.eq_tensor(&reference.enc).all().int64_value(&[]), 1);

    // Already at micro-batch 1: a clear error.
    let dir = tempfile::tempdir().unwrap();
    let mut none = toy(None);
    none.max_micro = 0;
    let err = run(&mut none, &config(dir.path(), false), &ctx(CancelToken::new(), &hub), &mut |_| {}).unwrap_err();
    assert!(err.is_out_of_memory(), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("at micro-batch 1") && text.contains("CUDA out of memory"), "{text}");
    // Any other libtorch error stops the run at once.
    assert!(matches!(TrainError::from(tch::TchError::Torch("shape mismatch".into())), TrainError::Torch(_)));
}

#[test]
fn validates_every_n_epochs_and_at_the_last_with_best_among_validated() {
    let _g = rng_lock();
    let (every, sparse) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let hub = ProgressHub::new(4096);
    let mut a = toy(None);
    let ra = run(
        &mut a,
        &RunnerConfig { epochs: 5, ..config(every.path(), false) },
        &ctx(CancelToken::default(), &hub),
        &mut |_| {},
    )
    .unwrap();
    let mut b = toy(None);
    let cb = RunnerConfig { epochs: 5, val_every_epochs: 2, ..config(sparse.path(), false) };
    let rb = run(&mut b, &cb, &ctx(CancelToken::default(), &hub), &mut |_| {}).unwrap();
    assert_eq!(b.ended, vec![0, 1, 2, 3, 4], "every epoch ends");
    assert_eq!(b.validated, vec![1, 3, 4], "every 2nd epoch and the last");
    assert_eq!(rb.validated_epochs, vec![1, 3, 4]);
    assert_eq!(ra.validated_epochs, vec![0, 1, 2, 3, 4]);
    // Validation does not touch training: the same epochs give the same metrics.
    let pick: Vec<_> = [1, 3, 4].iter().map(|&e| ra.validation[e].clone()).collect();
    assert_eq!(rb.validation, pick);
    let best = pick.iter().map(|m| m["val_mse"]).fold(f64::INFINITY, f64::min);
    assert_eq!(rb.best, Some(best));
    assert_eq!(rb.counters, ra.counters);
    // Published: each new best among validated epochs, and the last.
    let mut want = 0;
    let mut so_far = f64::INFINITY;
    for (i, m) in pick.iter().enumerate() {
        let new_best = m["val_mse"] < so_far;
        so_far = so_far.min(m["val_mse"]);
        want += usize::from(new_best || i == pick.len() - 1);
    }
    assert_eq!(rb.published.len(), want);
}

#[test]
fn every_event_of_a_run_carries_the_current_step_and_steps_never_decrease() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let hub = ProgressHub::new(4096);
    let mut rx = hub.subscribe();
    let token = CancelToken::new();
    // Cancelled in epoch 1, then resumed: both processes' events, in order.
    let mut first = toy(Some((15 + 2 * 2 + 2, token.clone())));
    assert!(run(&mut first, &config(dir.path(), true), &ctx(token, &hub), &mut |_| {}).unwrap().cancelled);
    let mut second = toy(None);
    let sum = run(&mut second, &config(dir.path(), true), &ctx(CancelToken::new(), &hub), &mut |_| {}).unwrap();
    let mut events = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        events.push(ev);
    }
    let steps: Vec<u64> = events.iter().map(|e| e.step).collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "steps decrease: {steps:?}");
    assert_eq!(*steps.last().unwrap(), sum.counters.global_step);
    // Validating (of epoch e) and publishing (once epoch e+1 is the current one) happen after
    // epoch e's 8 steps and report them.
    for ev in events.iter() {
        match ev.phase {
            Phase::Validating => assert_eq!(ev.step, 8 * (ev.epoch + 1), "validating epoch {}", ev.epoch),
            Phase::Publishing => assert_eq!(ev.step, 8 * ev.epoch, "publishing at epoch {}", ev.epoch),
            _ => {}
        }
    }
    assert_eq!(events.iter().filter(|e| e.phase == Phase::Validating).count(), 4);
}

#[test]
fn the_loop_can_be_driven_step_by_step() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let hub = ProgressHub::new(64);
    let c = ctx(CancelToken::new(), &hub);
    let cfg = config(dir.path(), false);
    let mut task = toy(None);
    let mut on_publish = |_: &vla_finetune::checkpoint::publish::Published| {};
    let mut runner = Runner::new(&mut task, &cfg, &c, &mut on_publish).unwrap();
    let err = runner.step().unwrap_err().to_string();
    assert!(err.contains("before begin_epoch"), "{err}");
    assert_eq!(runner.steps_per_epoch(), 8);
    runner.begin_epoch().unwrap();
    for _ in 0..8 {
        assert!(runner.step().unwrap().is_finite());
    }
    let c0 = runner.counters();
    assert_eq!((c0.epoch, c0.step_in_epoch, c0.global_step, c0.samples_seen), (0, 8, 8, 30));
    runner.end_epoch().unwrap();
    let c1 = runner.counters();
    assert_eq!((c1.epoch, c1.step_in_epoch, c1.global_step), (1, 0, 8));
    let s = runner.summary(false);
    assert_eq!((s.validated_epochs.clone(), s.published.len(), s.train_loss_per_epoch.len()), (vec![0], 1, 1));
    assert!(dir.path().join("state/latest.safetensors").exists());
    drop(runner);
    assert_eq!((task.ended.clone(), task.validated.clone()), (vec![0], vec![0]));
}
