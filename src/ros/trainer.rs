//! Trainer node: `~/start_finetune`, `~/cancel_finetune`, `~/get_job`, the `~/finetune` action,
//! `~/progress` (throttled) and `~/checkpoint` (reliable + transient-local) over the ROS-free
//! fine-tuning service (`train::service`). Jobs run on their own thread; the executor only
//! adapts messages. SIGINT / SIGTERM cancel a running job, which saves its resumable state at
//! the next step boundary; the node waits up to `shutdown_grace_s` for that.

use super::convert::{checkpoint_msg, progress_msg};
use super::interfaces::{action, msg, srv};
use super::params::{declare, share_file, ParamsExt};
use super::NodeRuntime;
use crate::dataset::compile::CompileConfig;
use crate::dataset::selection::EpisodeSelection;
use crate::train::controller::{CancelResponse, JobController, JobOutcome, JobStatus, StartResponse};
use crate::train::progress::{ProgressHub, Throttle};
use crate::train::service::{controller, job_view, start, ServiceConfig, StartRequest};
use anyhow::{Context as _, Result};
use futures::StreamExt;
use r2r::QosProfile;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::RecvError;

/// The QoS of `~/checkpoint`: a policy node started later still gets the latest announcement.
pub fn checkpoint_qos() -> QosProfile {
    QosProfile::default().reliable().transient_local().keep_last(1)
}

/// The last checkpoint announced per job (the action's result).
type LastCheckpoint = Arc<Mutex<HashMap<String, msg::CheckpointInfo>>>;

/// A StartFineTune request (or FineTune goal) as the service's request.
#[allow(clippy::too_many_arguments)]
fn request(
    dataset: &str,
    stage1: &str,
    base: &str,
    overrides: &str,
    stages: &str,
    outcomes: &[String],
    tasks: &[String],
    resume: &str,
) -> StartRequest {
    StartRequest {
        dataset: dataset.into(),
        stage1_checkpoint: stage1.into(),
        base_model: base.into(),
        overrides: overrides.into(),
        stages: stages.into(),
        selection: EpisodeSelection { outcomes: outcomes.to_vec(), tasks: tasks.to_vec() },
        resume_job_id: resume.into(),
    }
}

/// Runs the trainer node until SIGINT / SIGTERM.
pub fn main() -> Result<()> {
    let mut n = NodeRuntime::new("vla_trainer")?;
    let p = declare(&mut n.node, &n.rt, "trainer_node", |_, _| {})?;
    let train_config = p.string("train_config");
    let compile_config = p.string("compile_config");
    let compile = match compile_config.as_str() {
        "" => CompileConfig::default(),
        file => CompileConfig::from_yaml_file(&share_file(file))
            .with_context(|| format!("parameter compile_config = `{file}`"))?,
    };
    let cfg = ServiceConfig {
        train_config: (!train_config.is_empty()).then(|| share_file(&train_config)),
        compile,
        vram_preset: p.string("vram_preset"),
        job_nice: i32::try_from(p.int("job_nice")).unwrap_or(i32::MAX).clamp(0, 19),
        device: p.string("device"),
        nproc_per_node: usize::try_from(p.int("nproc_per_node")).unwrap_or(1).max(1),
        ..ServiceConfig::new(
            p.string("base_model").into(),
            p.string("runs_root").into(),
            p.string("checkpoints_root").into(),
        )
    };
    let hub = ProgressHub::new(256);
    let (published_tx, published_rx) = std::sync::mpsc::channel();
    let jobs = controller(cfg.clone(), hub.clone(), published_tx);
    let rate_hz = p.double("progress_rate_hz");

    let progress_pub = n.node.create_publisher::<msg::TrainingProgress>("~/progress", QosProfile::default())?;
    let mut events = hub.subscribe();
    let mut throttle = Throttle::new(rate_hz);
    let clock = n.clock.clone();
    n.rt.spawn(async move {
        loop {
            let ev = match events.recv().await {
                Ok(ev) => ev,
                Err(RecvError::Lagged(skipped)) => {
                    tracing::debug!("progress: {skipped} events skipped (throttled anyway)");
                    continue;
                }
                Err(RecvError::Closed) => break,
            };
            if throttle.admit(&ev, Instant::now()) {
                if let Err(e) = progress_pub.publish(&progress_msg(&ev, clock.now())) {
                    tracing::warn!("progress: {e}");
                }
            }
        }
    });

    let checkpoint_pub = n.node.create_publisher::<msg::CheckpointInfo>("~/checkpoint", checkpoint_qos())?;
    let last: LastCheckpoint = Arc::default();
    let (clock, last_w) = (n.clock.clone(), last.clone());
    std::thread::spawn(move || {
        for (job_id, published) in published_rx {
            tracing::info!("announcing checkpoint {} of job {job_id}", published.version);
            let info = checkpoint_msg(&published, &job_id, clock.now());
            if let Err(e) = checkpoint_pub.publish(&info) {
                tracing::error!("checkpoint announcement of {}: {e}", published.version);
            }
            if let Ok(mut m) = last_w.lock() {
                m.insert(job_id, info);
            }
        }
    });

    let mut start_srv =
        n.node.create_service::<srv::StartFineTune::Service>("~/start_finetune", QosProfile::services_default())?;
    let (c, svc) = (jobs.clone(), cfg.clone());
    n.rt.spawn(async move {
        while let Some(req) = start_srv.next().await {
            let m = &req.message;
            let r = request(
                &m.dataset,
                &m.stage1_checkpoint,
                &m.base_model,
                &m.overrides,
                &m.stages,
                &m.outcomes,
                &m.tasks,
                &m.resume_job_id,
            );
            let resp = match start(&c, &svc, r) {
                StartResponse::Accepted { job_id } => {
                    srv::StartFineTune::Response { accepted: true, job_id, reason: String::new() }
                }
                StartResponse::Rejected(why) => srv::StartFineTune::Response {
                    accepted: false,
                    job_id: String::new(),
                    reason: format!("{}: {why}", why.code()),
                },
            };
            if let Err(e) = req.respond(resp) {
                tracing::error!("start_finetune: could not respond: {e}");
            }
        }
    });

    let mut cancel =
        n.node.create_service::<srv::CancelFineTune::Service>("~/cancel_finetune", QosProfile::services_default())?;
    let c = jobs.clone();
    n.rt.spawn(async move {
        while let Some(req) = cancel.next().await {
            let id = match (&req.message.job_id, c.status()) {
                (id, _) if !id.is_empty() => id.clone(),
                (_, JobStatus::Running { job_id, .. }) => job_id,
                _ => String::new(),
            };
            let resp = match c.cancel(&id) {
                CancelResponse::Cancelling => srv::CancelFineTune::Response { cancelled: true, reason: String::new() },
                CancelResponse::NotRunning if id.is_empty() => {
                    srv::CancelFineTune::Response { cancelled: false, reason: "no job is running".into() }
                }
                CancelResponse::NotRunning => {
                    srv::CancelFineTune::Response { cancelled: false, reason: format!("no running job `{id}`") }
                }
            };
            if let Err(e) = req.respond(resp) {
                tracing::error!("cancel_finetune: could not respond: {e}");
            }
        }
    });

    let mut get_job =
        n.node.create_service::<srv::GetFineTuneJob::Service>("~/get_job", QosProfile::services_default())?;
    let (c, svc) = (jobs.clone(), cfg.clone());
    n.rt.spawn(async move {
        while let Some(req) = get_job.next().await {
            let resp = match job_view(&c, &svc, &req.message.job_id) {
                Ok(v) => {
                    let rec = v.record.as_ref();
                    srv::GetFineTuneJob::Response {
                        found: true,
                        job_id: v.job_id,
                        state: v.state.as_str().into(),
                        stage: rec.map(|r| r.stage).unwrap_or(0),
                        stages: rec.map(|r| r.stages.as_str().to_string()).unwrap_or_default(),
                        dataset: rec.map(|r| r.dataset.clone()).unwrap_or_default(),
                        versions: rec.map(|r| r.versions.clone()).unwrap_or_default(),
                        resumable: v.resumable,
                        summary: v.summary,
                        reason: String::new(),
                    }
                }
                Err(reason) => srv::GetFineTuneJob::Response { found: false, reason, ..Default::default() },
            };
            if let Err(e) = req.respond(resp) {
                tracing::error!("get_job: could not respond: {e}");
            }
        }
    });

    let mut goals = n.node.create_action_server::<action::FineTune::Action>("~/finetune")?;
    let (c, svc, clock) = (jobs.clone(), cfg.clone(), n.clock.clone());
    n.rt.spawn(async move {
        while let Some(req) = goals.next().await {
            let g = &req.goal;
            let r = request(
                &g.dataset,
                &g.stage1_checkpoint,
                &g.base_model,
                &g.overrides,
                &g.stages,
                &g.outcomes,
                &g.tasks,
                &g.resume_job_id,
            );
            // Subscribed before the start: the goal gets the job's first events too.
            let events = c.progress().subscribe();
            let started = start(&c, &svc, r);
            let (mut goal, cancels) = match req.accept() {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!("finetune: could not accept a goal: {e}");
                    if let StartResponse::Accepted { job_id } = started {
                        c.cancel(&job_id);
                    }
                    continue;
                }
            };
            let job_id = match started {
                StartResponse::Accepted { job_id } => job_id,
                StartResponse::Rejected(why) => {
                    let result = action::FineTune::Result {
                        state: "rejected".into(),
                        summary: format!("{}: {why}", why.code()),
                        ..Default::default()
                    };
                    if let Err(e) = goal.abort(result) {
                        tracing::error!("finetune: could not answer a rejected goal: {e}");
                    }
                    continue;
                }
            };
            tokio::spawn(follow_goal(c.clone(), goal, cancels, events, job_id, last.clone(), rate_hz, clock.clone()));
        }
    });

    tracing::info!("trainer ready");
    n.spin();
    cancel_running(&n.rt, &jobs, Duration::from_secs_f64(p.double("shutdown_grace_s").max(0.0)));
    Ok(())
}

/// Feeds a FineTune goal the progress of its job, cancels the job on a cancel request, and
/// ends the goal with the job's outcome and last announced checkpoint.
#[allow(clippy::too_many_arguments)]
async fn follow_goal(
    jobs: JobController<StartRequest>,
    mut goal: r2r::ActionServerGoal<action::FineTune::Action>,
    mut cancels: impl futures::Stream<Item = r2r::ActionServerCancelRequest> + Unpin,
    mut events: tokio::sync::broadcast::Receiver<crate::train::progress::ProgressEvent>,
    job_id: String,
    last: LastCheckpoint,
    rate_hz: f64,
    clock: super::clock::NodeClock,
) {
    let mut throttle = Throttle::new(rate_hz);
    let ended = {
        let (j, id) = (jobs.clone(), job_id.clone());
        async move { j.wait(&id).await }
    };
    tokio::pin!(ended);
    let mut cancel_accepted = false;
    let outcome = loop {
        tokio::select! {
            outcome = &mut ended => break outcome,
            ev = events.recv() => match ev {
                Ok(ev) if ev.job_id == job_id && throttle.admit(&ev, Instant::now()) => feedback(&goal, &ev, &clock),
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => {}
            },
            Some(cancel) = cancels.next() => {
                match jobs.cancel(&job_id) {
                    CancelResponse::Cancelling => {
                        cancel.accept();
                        cancel_accepted = true;
                    }
                    CancelResponse::NotRunning => cancel.reject(),
                }
            }
        }
    };
    // The controller records the end before it publishes the terminal event: wait (briefly)
    // for that event, so that the last feedback says how the job ended.
    let grace = tokio::time::sleep(Duration::from_secs(2));
    tokio::pin!(grace);
    loop {
        tokio::select! {
            _ = &mut grace => break,
            ev = events.recv() => match ev {
                Ok(ev) if ev.job_id == job_id => {
                    feedback(&goal, &ev, &clock);
                    if ev.phase.is_terminal() {
                        break;
                    }
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => break,
            },
        }
    }
    let checkpoint = last.lock().ok().and_then(|m| m.get(&job_id).cloned()).unwrap_or_default();
    let result = |state: &str, summary: String| action::FineTune::Result {
        state: state.into(),
        job_id: job_id.clone(),
        checkpoint: checkpoint.clone(),
        summary,
    };
    let sent = match outcome {
        Some(JobOutcome::Completed { summary }) => goal.succeed(result("done", summary.to_string())),
        // r2r moves a goal whose cancel was accepted to `canceling` itself (and forgets its
        // handle, so only `cancel` may end it); a job cancelled through ~/cancel_finetune left
        // the goal executing: it aborts then.
        Some(JobOutcome::Cancelled { summary }) => {
            let r = result("cancelled", summary.to_string());
            if cancel_accepted {
                goal.cancel(r)
            } else {
                goal.abort(r)
            }
        }
        Some(JobOutcome::Failed { error }) => goal.abort(result("failed", error)),
        None => goal.abort(result("failed", "the job's outcome was lost (another job replaced it)".into())),
    };
    if let Err(e) = sent {
        tracing::error!("finetune: could not send the result of {job_id}: {e}");
    }
}

/// Sends `ev` as the goal's feedback, stamped by the node clock.
fn feedback(
    goal: &r2r::ActionServerGoal<action::FineTune::Action>,
    ev: &crate::train::progress::ProgressEvent,
    clock: &super::clock::NodeClock,
) {
    if let Err(e) = goal.publish_feedback(action::FineTune::Feedback { progress: progress_msg(ev, clock.now()) }) {
        tracing::warn!("finetune feedback: {e}");
    }
}

/// Cancels the running job (if any) and waits up to `grace` for it to save its state and end.
fn cancel_running(rt: &tokio::runtime::Runtime, jobs: &JobController<StartRequest>, grace: Duration) {
    let JobStatus::Running { job_id, .. } = jobs.status() else { return };
    jobs.cancel(&job_id);
    let mut status = jobs.watch_status();
    let ended = rt.block_on(tokio::time::timeout(grace, async {
        while matches!(*status.borrow_and_update(), JobStatus::Running { .. }) {
            if status.changed().await.is_err() {
                break;
            }
        }
    }));
    match ended {
        Ok(()) => tracing::info!("job {job_id} cancelled; its state is saved (resume it with the same runs folder)"),
        Err(_) => {
            tracing::warn!("job {job_id} did not reach a step boundary within {grace:?}; its last saved state is kept")
        }
    }
}
