//! Trainer node: `~/start_finetune`, `~/cancel_finetune`, `~/progress` (throttled) and
//! `~/checkpoint` (reliable + transient-local) over the ROS-free fine-tuning service
//! (`train::service`). Jobs run on their own thread; the executor only adapts messages.
//! SIGINT / SIGTERM cancel a running job, which saves its resumable state at the next step
//! boundary; the node waits up to `shutdown_grace_s` for that.

use super::convert::{checkpoint_msg, progress_msg};
use super::interfaces::{msg, srv};
use super::params::{declare, share_file, ParamsExt};
use super::NodeRuntime;
use crate::train::controller::{CancelResponse, JobController, JobStatus, StartResponse};
use crate::train::progress::{ProgressHub, Throttle};
use crate::train::service::{controller, ServiceConfig, StartRequest};
use anyhow::Result;
use futures::StreamExt;
use r2r::QosProfile;
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::RecvError;

/// The QoS of `~/checkpoint`: a policy node started later still gets the latest announcement.
pub fn checkpoint_qos() -> QosProfile {
    QosProfile::default().reliable().transient_local().keep_last(1)
}

/// Runs the trainer node until SIGINT / SIGTERM.
pub fn main() -> Result<()> {
    let mut n = NodeRuntime::new("vla_trainer")?;
    let p = declare(&mut n.node, &n.rt, "trainer_node", |_, _| {})?;
    let train_config = p.string("train_config");
    let cfg = ServiceConfig {
        train_config: (!train_config.is_empty()).then(|| share_file(&train_config)),
        vram_preset: p.string("vram_preset"),
        device: p.string("device"),
        ..ServiceConfig::new(p.string("base_model").into(), p.string("runs_root").into(), p.string("checkpoints_root").into())
    };
    let hub = ProgressHub::new(256);
    let (published_tx, published_rx) = std::sync::mpsc::channel();
    let jobs = controller(cfg, hub.clone(), published_tx);

    let progress_pub = n.node.create_publisher::<msg::TrainingProgress>("~/progress", QosProfile::default())?;
    let mut events = hub.subscribe();
    let mut throttle = Throttle::new(p.double("progress_rate_hz"));
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
    let clock = n.clock.clone();
    std::thread::spawn(move || {
        for (job_id, published) in published_rx {
            tracing::info!("announcing checkpoint {} of job {job_id}", published.version);
            if let Err(e) = checkpoint_pub.publish(&checkpoint_msg(&published, &job_id, clock.now())) {
                tracing::error!("checkpoint announcement of {}: {e}", published.version);
            }
        }
    });

    let mut start = n.node.create_service::<srv::StartFineTune::Service>("~/start_finetune", QosProfile::services_default())?;
    let c = jobs.clone();
    n.rt.spawn(async move {
        while let Some(req) = start.next().await {
            let m = &req.message;
            let r = StartRequest { dataset: m.dataset.clone(), stage1_checkpoint: m.stage1_checkpoint.clone(), base_model: m.base_model.clone(), overrides: m.overrides.clone() };
            let resp = match c.start(r) {
                StartResponse::Accepted { job_id } => srv::StartFineTune::Response { accepted: true, job_id, reason: String::new() },
                StartResponse::Rejected(why) => srv::StartFineTune::Response { accepted: false, job_id: String::new(), reason: format!("{}: {why}", why.code()) },
            };
            if let Err(e) = req.respond(resp) {
                tracing::error!("start_finetune: could not respond: {e}");
            }
        }
    });

    let mut cancel = n.node.create_service::<srv::CancelFineTune::Service>("~/cancel_finetune", QosProfile::services_default())?;
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
                CancelResponse::NotRunning => srv::CancelFineTune::Response { cancelled: false, reason: format!("no running job `{id}`") },
            };
            if let Err(e) = req.respond(resp) {
                tracing::error!("cancel_finetune: could not respond: {e}");
            }
        }
    });

    tracing::info!("trainer ready");
    n.spin();
    cancel_running(&n.rt, &jobs, Duration::from_secs_f64(p.double("shutdown_grace_s").max(0.0)));
    Ok(())
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
        Err(_) => tracing::warn!("job {job_id} did not reach a step boundary within {grace:?}; its last saved state is kept"),
    }
}
