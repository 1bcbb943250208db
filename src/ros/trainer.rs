//! Trainer node: `~/start_finetune`, `~/cancel_finetune`, `~/progress` (throttled) and
//! `~/checkpoint` (reliable + transient-local) over the ROS-free fine-tuning service
//! (`train::service`). Jobs run on their own thread; the executor only adapts messages.

use super::convert::{checkpoint_msg, progress_msg};
use super::interfaces::{msg, srv};
use super::params::{declare, ParamsExt};
use crate::train::controller::{CancelResponse, JobStatus, StartResponse};
use crate::train::progress::{ProgressHub, Throttle};
use crate::train::service::{controller, ServiceConfig, StartRequest};
use anyhow::Result;
use futures::StreamExt;
use r2r::QosProfile;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// Runs the trainer node until the process is stopped.
pub fn main() -> Result<()> {
    crate::logging::init("info");
    let ctx = r2r::Context::create()?;
    let mut node = r2r::Node::create(ctx, "vla_trainer", "")?;
    let p = declare(&node, "trainer_node")?;
    let cfg = ServiceConfig {
        base_model: p.string("base_model").into(),
        runs_root: p.string("runs_root").into(),
        checkpoints_root: p.string("checkpoints_root").into(),
    };
    let hub = ProgressHub::new(256);
    let (published_tx, published_rx) = std::sync::mpsc::channel();
    let jobs = controller(cfg, hub.clone(), published_tx);
    let rt = tokio::runtime::Runtime::new()?;

    let progress_pub = node.create_publisher::<msg::TrainingProgress>("~/progress", QosProfile::default())?;
    let mut events = hub.subscribe();
    let mut throttle = Throttle::new(p.double("progress_rate_hz"));
    rt.spawn(async move {
        while let Ok(ev) = events.recv().await {
            if throttle.admit(&ev, Instant::now()) {
                if let Err(e) = progress_pub.publish(&progress_msg(&ev)) {
                    tracing::warn!("progress: {e}");
                }
            }
        }
    });

    let checkpoint_pub = node.create_publisher::<msg::CheckpointInfo>("~/checkpoint", QosProfile::default().reliable().transient_local().keep_last(1))?;
    std::thread::spawn(move || {
        for (job_id, published) in published_rx {
            if let Err(e) = checkpoint_pub.publish(&checkpoint_msg(&published, &job_id)) {
                tracing::error!("checkpoint announcement of {}: {e}", published.version);
            }
        }
    });

    let mut start = node.create_service::<srv::StartFineTune::Service>("~/start_finetune", QosProfile::services_default())?;
    let c = jobs.clone();
    rt.spawn(async move {
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

    let mut cancel = node.create_service::<srv::CancelFineTune::Service>("~/cancel_finetune", QosProfile::services_default())?;
    let c = jobs.clone();
    rt.spawn(async move {
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
    super::spin(&mut node, &AtomicBool::new(false));
    Ok(())
}
