//! Job controller with a real toy training job (AdamW + exact-resume state): one job at a time,
//! validators, cancel within one step leaving a consistent checkpoint, failures reported.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender};

use tch::{Device, Kind, Tensor};
use vla_finetune::train::controller::{
    CancelResponse, JobContext, JobController, JobOutcome, JobStatus, RejectReason, StartResponse, Validator,
};
use vla_finetune::train::optim::{Accumulation, AdamW, AdamWConfig, CosineSchedule, GroupConfig, NamedParam};
use vla_finetune::train::progress::{Phase, ProgressEvent, ProgressHub};
use vla_finetune::train::state::{load_state, save_state, Counters, RunState};

struct Req {
    dataset: PathBuf,
    state: PathBuf,
    steps: u64,
    /// Each finished step is reported here (a rendezvous channel paces the job for the test).
    pace: Option<SyncSender<u64>>,
    panic_at: Option<u64>,
}

struct Toy {
    w: Tensor,
    opt: AdamW,
    x: Tensor,
    y: Tensor,
}

/// Deterministic without any random generator (tests in this file run in parallel).
fn toy() -> Toy {
    let o = (Kind::Float, Device::Cpu);
    let w = (Tensor::arange(6, o).view([2, 3]) * 0.1).set_requires_grad(true);
    let x = Tensor::linspace(-1.0, 1.0, 30, o).view([10, 3]);
    let y = x.sin().matmul(&Tensor::ones([3, 2], o));
    let params =
        vec![NamedParam { name: "head.weight".into(), group: "heads".into(), tensor: w.shallow_clone(), decay: true }];
    let groups = vec![GroupConfig { name: "heads".into(), lr: 0.05, weight_decay: 0.01 }];
    Toy { w, opt: AdamW::new(AdamWConfig::default(), groups, params).unwrap(), x, y }
}

fn train_step(t: &mut Toy) -> f64 {
    t.opt.zero_grad();
    let loss = (t.x.matmul(&t.w.tr()) - &t.y).square().mean(Kind::Float);
    loss.backward();
    t.opt.clip_grad_norm(1.0).unwrap();
    t.opt.step(1.0).unwrap();
    loss.double_value(&[])
}

fn run_state(step: u64) -> RunState {
    RunState {
        run_seed: 1,
        counters: Counters { epoch: 0, step_in_epoch: step, global_step: step, samples_seen: step * 10 },
        schedule: CosineSchedule { warmup_steps: 0, total_steps: 1000, min_lr_ratio: 1.0 },
        accumulation: Accumulation::new(10, 1).unwrap(),
        world_size: 1,
        cache_state: serde_json::Value::Null,
        extra: serde_json::Value::Null,
    }
}

fn toy_job(ctx: JobContext, req: Req) -> JobOutcome {
    let mut t = toy();
    for step in 0..req.steps {
        if ctx.cancel.is_cancelled() {
            if let Err(e) = save_state(&req.state, &t.opt, &run_state(step)) {
                return JobOutcome::Failed { error: e.to_string() };
            }
            return JobOutcome::Cancelled { summary: serde_json::json!({"step": step}) };
        }
        if req.panic_at == Some(step) {
            panic!("boom at step {step}");
        }
        let loss = train_step(&mut t);
        let mut ev = ProgressEvent::new(&ctx.job_id, Phase::Training);
        ev.step = step + 1;
        ev.total_steps = req.steps;
        ev.loss = Some(loss);
        ctx.progress.publish(ev);
        if let Some(p) = &req.pace {
            let _ = p.send(step + 1);
        }
    }
    match save_state(&req.state, &t.opt, &run_state(req.steps)) {
        Ok(()) => JobOutcome::Completed { summary: serde_json::json!({"step": req.steps}) },
        Err(e) => JobOutcome::Failed { error: e.to_string() },
    }
}

fn dataset_exists(r: &Req) -> Result<(), RejectReason> {
    if r.dataset.is_dir() {
        Ok(())
    } else {
        Err(RejectReason::DatasetMissing(format!("`{}` is not a folder", r.dataset.display())))
    }
}

fn steps_positive(r: &Req) -> Result<(), RejectReason> {
    if r.steps > 0 {
        Ok(())
    } else {
        Err(RejectReason::ConfigInvalid("steps must be >= 1".into()))
    }
}

fn controller(hub: ProgressHub) -> JobController<Req> {
    let validators: Vec<Box<dyn Validator<Req>>> = vec![Box::new(dataset_exists), Box::new(steps_positive)];
    JobController::new(toy_job, validators, hub)
}

#[test]
fn second_start_is_rejected_and_cancel_leaves_a_consistent_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let hub = ProgressHub::new(1024);
    let mut events = hub.subscribe();
    let c = controller(hub);
    let state = dir.path().join("state.safetensors");
    let (tx, rx) = sync_channel(0);
    let req = |pace, state: &PathBuf| Req {
        dataset: dir.path().to_path_buf(),
        state: state.clone(),
        steps: 1_000_000,
        pace,
        panic_at: None,
    };
    let StartResponse::Accepted { job_id } = c.start(req(Some(tx), &state)) else {
        panic!("first start must be accepted")
    };
    assert_eq!(rx.recv().unwrap(), 1);

    // A second start while it runs is refused, naming the running job; nothing else starts.
    let other = dir.path().join("other.safetensors");
    assert_eq!(
        c.start(req(None, &other)),
        StartResponse::Rejected(RejectReason::AlreadyRunning { job_id: job_id.clone() })
    );
    assert_eq!(c.cancel("ft-unknown"), CancelResponse::NotRunning);

    assert_eq!(rx.recv().unwrap(), 2);
    assert_eq!(rx.recv().unwrap(), 3);
    assert_eq!(c.cancel(&job_id), CancelResponse::Cancelling);
    assert_eq!(c.status(), JobStatus::Running { job_id: job_id.clone(), cancelling: true });
    // Drain: the job may finish the step it is in, no more.
    let mut last = 3;
    while let Ok(s) = rx.recv() {
        last = s;
    }
    assert!(last <= 4, "job ran {last} steps after a cancel at step 3");
    let JobStatus::Finished { job_id: done_id, outcome } = c.join() else { panic!("job must have finished") };
    assert_eq!(done_id, job_id);
    assert_eq!(outcome, JobOutcome::Cancelled { summary: serde_json::json!({"step": last}) });
    assert!(!other.exists());

    // The checkpoint is consistent: its counters match its parameters, which equal an
    // uninterrupted run of the same number of steps.
    let mut resumed = toy();
    let meta = load_state(&state, &mut resumed.opt).unwrap();
    assert_eq!(meta.counters.global_step, last);
    assert_eq!(resumed.opt.steps_taken(), last);
    let mut reference = toy();
    for _ in 0..last {
        train_step(&mut reference);
    }
    assert_eq!((&resumed.w - &reference.w).abs().max().double_value(&[]), 0.0);
    // And resuming continues as the reference does.
    train_step(&mut resumed);
    train_step(&mut reference);
    assert_eq!((&resumed.w - &reference.w).abs().max().double_value(&[]), 0.0);

    // Progress: steps in order, then exactly one terminal event, `cancelled`.
    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        seen.push(ev);
    }
    let steps: Vec<u64> = seen.iter().filter(|e| e.phase == Phase::Training).map(|e| e.step).collect();
    assert_eq!(steps, (1..=last).collect::<Vec<_>>());
    let last_ev = seen.last().unwrap();
    assert_eq!((last_ev.phase, last_ev.job_id.as_str(), last_ev.step), (Phase::Cancelled, job_id.as_str(), last));
    assert_eq!(seen.iter().filter(|e| e.phase.is_terminal()).count(), 1);

    // Once it ended, a new job is accepted and runs to completion.
    let StartResponse::Accepted { job_id: second } = c.start(Req { steps: 5, ..req(None, &other) }) else { panic!() };
    assert_ne!(second, job_id);
    let outcome = tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(c.wait(&second));
    assert_eq!(outcome, Some(JobOutcome::Completed { summary: serde_json::json!({"step": 5}) }));
    let meta = vla_finetune::train::state::read_state_meta(&other).unwrap();
    assert_eq!(meta.counters.global_step, 5);
    assert_eq!(c.progress().latest().unwrap().phase, Phase::Done);
}

#[test]
fn validators_refuse_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let c = controller(ProgressHub::new(8));
    let state = dir.path().join("s.safetensors");
    let missing = Req { dataset: dir.path().join("nope"), state: state.clone(), steps: 3, pace: None, panic_at: None };
    match c.start(missing) {
        StartResponse::Rejected(r) => {
            assert_eq!(r.code(), "dataset_missing");
            assert!(r.to_string().contains("nope"), "{r}");
        }
        other => panic!("{other:?}"),
    }
    let bad = Req { dataset: dir.path().to_path_buf(), state: state.clone(), steps: 0, pace: None, panic_at: None };
    assert!(matches!(c.start(bad), StartResponse::Rejected(RejectReason::ConfigInvalid(_))));
    assert_eq!(c.status(), JobStatus::Idle);
    assert!(!state.exists());
    assert!(c.progress().latest().is_none());
}

#[test]
fn a_panicking_job_is_reported_failed_and_the_controller_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let c = controller(ProgressHub::new(64));
    let state = dir.path().join("s.safetensors");
    let req = Req { dataset: dir.path().to_path_buf(), state: state.clone(), steps: 10, pace: None, panic_at: Some(2) };
    let StartResponse::Accepted { job_id } = c.start(req) else { panic!() };
    match c.join() {
        JobStatus::Finished { job_id: id, outcome: JobOutcome::Failed { error } } => {
            assert_eq!(id, job_id);
            assert!(error.contains("boom at step 2"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    let ev = c.progress().latest().unwrap();
    assert_eq!((ev.phase, ev.step), (Phase::Failed, 2));
    assert!(ev.message.contains("boom"));
    let req = Req { dataset: dir.path().to_path_buf(), state, steps: 2, pace: None, panic_at: None };
    assert!(matches!(c.start(req), StartResponse::Accepted { .. }));
    assert!(matches!(c.join(), JobStatus::Finished { outcome: JobOutcome::Completed { .. }, .. }));
}
