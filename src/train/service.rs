//! The fine-tuning service behind the trainer node (and usable without ROS): start requests are
//! validated (dataset, model folder, overrides) before anything starts, one job runs at a time
//! through [`JobController`], and each published checkpoint is sent on a channel.
//!
//! The job run here is [`heads_job`]: the policy heads fine-tuned on frozen VL features of the
//! base model. Stage 2 (LoRA on the VL model) is not wired into this service yet.

use std::path::PathBuf;
use std::sync::mpsc::Sender;

use serde::Deserialize;
use serde_json::json;

use super::controller::{JobContext, JobController, JobOutcome, RejectReason, Validator};
use super::heads_job::{self, small_heads, HeadsJob};
use super::progress::ProgressHub;
use super::publish::Published;

/// A start request, as StartFineTune carries it.
#[derive(Debug, Clone, Default)]
pub struct StartRequest {
    /// Compiled dataset folder.
    pub dataset: String,
    /// Stage-1 heads checkpoint (informational until Stage 2 is wired in).
    pub stage1_checkpoint: String,
    /// Base model folder; empty = the service default.
    pub base_model: String,
    /// YAML/JSON mapping of [`Overrides`].
    pub overrides: String,
}

/// Training settings a request may override.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Overrides {
    /// Epochs.
    pub epochs: usize,
    /// Samples per optimizer step.
    pub batch_size: usize,
    /// Peak learning rate of the heads.
    pub lr: f64,
    /// Seed.
    pub seed: u64,
}

impl Default for Overrides {
    fn default() -> Self {
        Self { epochs: 10, batch_size: 16, lr: 1e-3, seed: 0 }
    }
}

/// Parses the overrides text (empty = defaults); errors name the bad key or value.
pub fn parse_overrides(text: &str) -> Result<Overrides, String> {
    if text.trim().is_empty() {
        return Ok(Overrides::default());
    }
    let o: Overrides = serde_yaml::from_str(text).map_err(|e| format!("overrides `{text}`: {e}"))?;
    if o.epochs == 0 || o.batch_size == 0 || !(o.lr > 0.0 && o.lr.is_finite()) {
        return Err(format!("overrides `{text}`: epochs and batch_size must be >= 1 and lr a positive number"));
    }
    Ok(o)
}

/// Where the service keeps things.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Default base model folder.
    pub base_model: PathBuf,
    /// Per-job working folders go under here.
    pub runs_root: PathBuf,
    /// Published checkpoints.
    pub checkpoints_root: PathBuf,
}

impl ServiceConfig {
    fn model_dir(&self, r: &StartRequest) -> PathBuf {
        if r.base_model.is_empty() { self.base_model.clone() } else { PathBuf::from(&r.base_model) }
    }
}

/// A controller running heads fine-tuning jobs; published checkpoints go to `published`.
pub fn controller(cfg: ServiceConfig, hub: ProgressHub, published: Sender<(String, Published)>) -> JobController<StartRequest> {
    let c = cfg.clone();
    let dataset_ok = move |r: &StartRequest| {
        let p = PathBuf::from(&r.dataset);
        if p.join("index.json").is_file() { Ok(()) } else { Err(RejectReason::DatasetMissing(format!("{}: no compiled dataset (index.json)", p.display()))) }
    };
    let model_ok = move |r: &StartRequest| heads_job::check_model_dir(&c.model_dir(r)).map_err(RejectReason::ModelDirInvalid);
    let config_ok = |r: &StartRequest| parse_overrides(&r.overrides).map(|_| ()).map_err(RejectReason::ConfigInvalid);
    let validators: Vec<Box<dyn Validator<StartRequest>>> = vec![Box::new(dataset_ok), Box::new(model_ok), Box::new(config_ok)];
    let published = std::sync::Mutex::new(published);
    let job = move |ctx: JobContext, r: StartRequest| {
        let o = parse_overrides(&r.overrides).expect("validated before start");
        let job = HeadsJob {
            dataset: PathBuf::from(&r.dataset),
            base_model: cfg.model_dir(&r),
            checkpoints: cfg.checkpoints_root.clone(),
            work_dir: cfg.runs_root.join(&ctx.job_id),
            epochs: o.epochs,
            batch_size: o.batch_size,
            lr: o.lr,
            seed: o.seed,
            heads: small_heads(),
        };
        match heads_job::run(&job, Some(&ctx)) {
            Ok(res) => {
                let summary = json!({
                    "val_action_error_before": heads_job::mean(&res.val_error_before),
                    "val_action_error_after": heads_job::mean(&res.val_error_after),
                    "version": res.published.as_ref().map(|p| p.version.clone()),
                });
                match res.published {
                    Some(p) => {
                        let _ = published.lock().map(|tx| tx.send((ctx.job_id.clone(), p)));
                        JobOutcome::Completed { summary }
                    }
                    None => JobOutcome::Cancelled { summary },
                }
            }
            Err(e) => JobOutcome::Failed { error: format!("{e:#}") },
        }
    };
    JobController::new(job, validators, hub)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse_with_defaults_and_name_bad_keys() {
        assert_eq!(parse_overrides("").unwrap().epochs, 10);
        let o = parse_overrides("{epochs: 3, lr: 0.0005}").unwrap();
        assert_eq!((o.epochs, o.lr, o.batch_size), (3, 0.0005, 16));
        assert!(parse_overrides("{epoch: 3}").unwrap_err().contains("epoch"));
        assert!(parse_overrides("{epochs: 0}").unwrap_err().contains(">= 1"));
    }

    #[test]
    fn requests_with_a_missing_dataset_or_model_are_rejected_without_starting() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ServiceConfig { base_model: dir.path().join("nomodel"), runs_root: dir.path().join("runs"), checkpoints_root: dir.path().join("ck") };
        let (tx, _rx) = std::sync::mpsc::channel();
        let c = controller(cfg, ProgressHub::new(8), tx);
        let r = StartRequest { dataset: dir.path().join("nodata").display().to_string(), ..Default::default() };
        match c.start(r) {
            super::super::controller::StartResponse::Rejected(RejectReason::DatasetMissing(m)) => assert!(m.contains("nodata")),
            other => panic!("expected a dataset rejection, got {other:?}"),
        }
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/index.json"), "{}").unwrap();
        let r = StartRequest { dataset: dir.path().join("data").display().to_string(), ..Default::default() };
        assert!(matches!(c.start(r), super::super::controller::StartResponse::Rejected(RejectReason::ModelDirInvalid(_))));
        assert!(!dir.path().join("runs").exists(), "nothing started");
    }
}
