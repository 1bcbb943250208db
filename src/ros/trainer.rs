//! Trainer node: `~/start_finetune`, `~/cancel_finetune`, `~/get_job`, the `~/finetune` action,
//! `~/progress` (throttled) and `~/checkpoint` (reliable + transient-local) over the ROS-free
//! fine-tuning service (`train::service`). Jobs run on their own thread; the executor only
//! adapts messages. SIGINT / SIGTERM cancel a running job, which saves its resumable state at
//! the next step boundary; the node waits up to `shutdown_grace_s` for that.

mod goal;

use super::clock::NodeClock;
use super::convert::{checkpoint_msg, progress_msg};
use super::interfaces::{action, msg, srv};
use super::params::{declare, share_file, Params, ParamsExt};
use super::{serve, NodeRuntime};
use crate::checkpoint::publish::Published;
use crate::dataset::compile::CompileConfig;
use crate::train::controller::{CancelResponse, JobController, JobStatus, StartResponse};
use crate::train::progress::{ProgressEvent, ProgressHub, Throttle};
use crate::train::service::{controller, job_view, start, JobView, ServiceConfig, StartRequest};
use anyhow::{Context as _, Result};
use r2r::QosProfile;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast::{self, error::RecvError};

/// The QoS of `~/checkpoint`: a policy node started later still gets the latest announcement.
pub fn checkpoint_qos() -> QosProfile {
    QosProfile::default().reliable().transient_local().keep_last(1)
}

/// The last checkpoint announced per job (the action's result).
type LastCheckpoint = Arc<Mutex<HashMap<String, msg::CheckpointInfo>>>;

/// A StartFineTune request (or FineTune goal: the same fields) as the service's request.
macro_rules! start_request {
    ($m:expr) => {{
        let m = $m;
        crate::train::service::StartRequest {
            dataset: m.dataset.clone(),
            stage1_checkpoint: m.stage1_checkpoint.clone(),
            base_model: m.base_model.clone(),
            overrides: m.overrides.clone(),
            stages: m.stages.clone(),
            selection: crate::dataset::selection::EpisodeSelection {
                outcomes: m.outcomes.clone(),
                tasks: m.tasks.clone(),
            },
            resume_job_id: m.resume_job_id.clone(),
        }
    }};
}
use start_request;

/// What the service and action handlers share: the job controller and the service settings.
#[derive(Clone)]
struct Jobs {
    controller: JobController<StartRequest>,
    cfg: ServiceConfig,
}

/// The fine-tuning service's settings from the node's parameters.
fn service_config(p: &Params) -> Result<ServiceConfig> {
    let train_config = p.string("train_config");
    let compile_config = p.string("compile_config");
    let compile = match compile_config.as_str() {
        "" => CompileConfig::default(),
        file => CompileConfig::from_yaml_file(&share_file(file))
            .with_context(|| format!("parameter compile_config = `{file}`"))?,
    };
    Ok(ServiceConfig {
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
    })
}

/// Runs the trainer node until SIGINT / SIGTERM.
pub fn main() -> Result<()> {
    let mut n = NodeRuntime::new("vla_trainer")?;
    let p = declare(&mut n.node, &n.rt, "trainer_node", |_, _| {})?;
    let cfg = service_config(&p)?;
    let hub = ProgressHub::new(256);
    let (published_tx, published_rx) = std::sync::mpsc::channel();
    let jobs = Jobs { controller: controller(cfg.clone(), hub.clone(), published_tx), cfg };
    let rate_hz = p.double("progress_rate_hz");

    let progress_pub = n.node.create_publisher::<msg::TrainingProgress>("~/progress", QosProfile::default())?;
    n.rt.spawn(publish_progress(progress_pub, hub.subscribe(), Throttle::new(rate_hz), n.clock.clone()));
    let checkpoint_pub = n.node.create_publisher::<msg::CheckpointInfo>("~/checkpoint", checkpoint_qos())?;
    let last: LastCheckpoint = Arc::default();
    let (clock, last_w) = (n.clock.clone(), last.clone());
    std::thread::spawn(move || announce_checkpoints(checkpoint_pub, published_rx, last_w, clock));

    let services = QosProfile::services_default;
    let start_srv = n.node.create_service::<srv::StartFineTune::Service>("~/start_finetune", services())?;
    let j = jobs.clone();
    n.rt.spawn(serve(start_srv, "start_finetune", move |m| start_finetune(&j, m)));
    let cancel = n.node.create_service::<srv::CancelFineTune::Service>("~/cancel_finetune", services())?;
    let j = jobs.clone();
    n.rt.spawn(serve(cancel, "cancel_finetune", move |m| cancel_finetune(&j, m)));
    let job = n.node.create_service::<srv::GetFineTuneJob::Service>("~/get_job", services())?;
    let j = jobs.clone();
    n.rt.spawn(serve(job, "get_job", move |m| get_job(&j, m)));
    let goals = n.node.create_action_server::<action::FineTune::Action>("~/finetune")?;
    n.rt.spawn(goal::serve_goals(goals, jobs.clone(), last, rate_hz, n.clock.clone()));

    tracing::info!("trainer ready");
    n.spin();
    cancel_running(&n.rt, &jobs.controller, Duration::from_secs_f64(p.double("shutdown_grace_s").max(0.0)));
    Ok(())
}

/// Publishes the jobs' progress on `~/progress`, at most as often as `throttle` admits.
async fn publish_progress(
    publisher: r2r::Publisher<msg::TrainingProgress>,
    mut events: broadcast::Receiver<ProgressEvent>,
    mut throttle: Throttle,
    clock: NodeClock,
) {
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
            if let Err(e) = publisher.publish(&progress_msg(&ev, clock.now())) {
                tracing::warn!("progress: {e}");
            }
        }
    }
}

/// Announces each published checkpoint on `~/checkpoint` and keeps it as its job's last (a
/// thread: the jobs send from their own threads).
fn announce_checkpoints(
    publisher: r2r::Publisher<msg::CheckpointInfo>,
    published: std::sync::mpsc::Receiver<(String, Published)>,
    last: LastCheckpoint,
    clock: NodeClock,
) {
    for (job_id, published) in published {
        tracing::info!("announcing checkpoint {} of job {job_id}", published.version);
        let info = checkpoint_msg(&published, &job_id, clock.now());
        if let Err(e) = publisher.publish(&info) {
            tracing::error!("checkpoint announcement of {}: {e}", published.version);
        }
        if let Ok(mut m) = last.lock() {
            m.insert(job_id, info);
        }
    }
}

/// `~/start_finetune`: starts (or resumes) a job.
fn start_finetune(jobs: &Jobs, m: &srv::StartFineTune::Request) -> srv::StartFineTune::Response {
    match start(&jobs.controller, &jobs.cfg, start_request!(m)) {
        StartResponse::Accepted { job_id } => {
            srv::StartFineTune::Response { accepted: true, job_id, reason: String::new() }
        }
        StartResponse::Rejected(why) => srv::StartFineTune::Response {
            accepted: false,
            job_id: String::new(),
            reason: format!("{}: {why}", why.code()),
        },
    }
}

/// `~/cancel_finetune`: cancels the named job, or the running one when none is named.
fn cancel_finetune(jobs: &Jobs, m: &srv::CancelFineTune::Request) -> srv::CancelFineTune::Response {
    let id = match (&m.job_id, jobs.controller.status()) {
        (id, _) if !id.is_empty() => id.clone(),
        (_, JobStatus::Running { job_id, .. }) => job_id,
        _ => String::new(),
    };
    match jobs.controller.cancel(&id) {
        CancelResponse::Cancelling => srv::CancelFineTune::Response { cancelled: true, reason: String::new() },
        CancelResponse::NotRunning if id.is_empty() => {
            srv::CancelFineTune::Response { cancelled: false, reason: "no job is running".into() }
        }
        CancelResponse::NotRunning => {
            srv::CancelFineTune::Response { cancelled: false, reason: format!("no running job `{id}`") }
        }
    }
}

/// `~/get_job`: a job's state, stage, dataset and versions (the last job when none is named).
fn get_job(jobs: &Jobs, m: &srv::GetFineTuneJob::Request) -> srv::GetFineTuneJob::Response {
    match job_view(&jobs.controller, &jobs.cfg, &m.job_id) {
        Ok(v) => job_response(v),
        Err(reason) => srv::GetFineTuneJob::Response { found: false, reason, ..Default::default() },
    }
}

/// The GetFineTuneJob answer for a found job.
fn job_response(v: JobView) -> srv::GetFineTuneJob::Response {
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
