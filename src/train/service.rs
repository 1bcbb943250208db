//! The fine-tuning service behind the trainer node (and usable without ROS): start requests are
//! validated (dataset, model folder, overrides) before anything starts, one job runs at a time
//! through [`JobController`], and each published checkpoint is sent on a channel.
//!
//! A request with a stage-1 checkpoint runs Stage 2 ([`stage2`]: LoRA on the VL model + heads,
//! configured by the embedded `config/train.yaml` with the request's folders, a manual memory
//! setting for CPU, and `overrides` as a YAML mapping of `section.key: value`, e.g.
//! `{run.epochs: 3, cache.mode: features}`); its state, cache and logs go under
//! `<runs_root>/<job_id>/`. A request without one runs [`heads_job`] (the policy heads on frozen
//! VL features; `overrides` = [`Overrides`]). Both publish under `checkpoints_root`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::Sender;

use serde::Deserialize;
use serde_json::json;

use super::config::{ConfigError, TrainConfig};
use super::controller::{JobContext, JobController, JobOutcome, RejectReason, Validator};
use super::heads_job::{self, small_heads, HeadsJob, HeadsTrainConfig};
use super::progress::ProgressHub;
use super::publish::Published;
use super::stage2::{self, Stage2Job};

/// A start request, as StartFineTune carries it.
#[derive(Debug, Clone, Default)]
pub struct StartRequest {
    /// Compiled dataset folder.
    pub dataset: String,
    /// Stage-1 deployable checkpoint folder, or a checkpoints root or its `latest` (the version
    /// `latest` names); non-empty runs Stage 2 from it.
    pub stage1_checkpoint: String,
    /// Base model folder; empty = the service default.
    pub base_model: String,
    /// YAML/JSON mapping: [`Overrides`] for the heads job; `section.key: value` of
    /// `config/train.yaml` for Stage 2.
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
pub fn parse_overrides(text: &str) -> Result<Overrides, ConfigError> {
    if text.trim().is_empty() {
        return Ok(Overrides::default());
    }
    let bad = |reason: String| ConfigError::Override { spec: text.to_string(), reason };
    let o: Overrides = serde_yaml::from_str(text).map_err(|e| bad(e.to_string()))?;
    if o.epochs == 0 || o.batch_size == 0 || !(o.lr > 0.0 && o.lr.is_finite()) {
        return Err(bad("epochs and batch_size must be >= 1 and lr a positive number".into()));
    }
    Ok(o)
}

/// The Stage 2 configuration of a request. Precedence, lowest first: the built-in
/// `config/train.yaml`, the service's `train_config` file (replacing it), the service's
/// `vram_preset` and `device`, the request's folders (dataset, base model, stage-1 checkpoint,
/// job folders under `run_dir`), then the request's `section.key: value` overrides. With preset
/// `auto` on a CPU device (no accelerator memory to measure) a CPU-sized setting is used
/// (micro-batch 4 x 1, LoRA rank 8). Errors name the bad key or value and where it came from.
pub fn stage2_config(svc: &ServiceConfig, r: &StartRequest, run_dir: &std::path::Path) -> Result<TrainConfig, ConfigError> {
    let q = |p: &std::path::Path| serde_json::to_string(&p.display().to_string()).expect("strings serialize");
    let (text, origin) = match &svc.train_config {
        Some(path) => (std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.clone(), source })?, path.display().to_string()),
        None => (include_str!("../../config/train.yaml").to_string(), "config/train.yaml (embedded)".to_string()),
    };
    let cpu_auto = svc.vram_preset == "auto" && matches!(crate::device::parse(&svc.device), Ok(tch::Device::Cpu));
    let preset = if cpu_auto { "manual" } else { svc.vram_preset.as_str() };
    let mut sets = vec![format!("run.device={}", q(std::path::Path::new(&svc.device))), format!("memory.preset={}", q(std::path::Path::new(preset)))];
    if cpu_auto {
        sets.extend(["memory.micro_batch=4".into(), "memory.accum_steps=1".into(), "lora.rank=8".into()]);
    }
    sets.extend([
        format!("data.dataset_dir={}", q(std::path::Path::new(&r.dataset))),
        format!("model.base_model_dir={}", q(&svc.model_dir(r))),
        format!("model.stage1_checkpoint={}", q(std::path::Path::new(&r.stage1_checkpoint))),
        format!("run.output_dir={}", q(run_dir)),
        format!("cache.dir={}", q(&run_dir.join("cache"))),
        format!("checkpoint.state_dir={}", q(&run_dir.join("state"))),
        format!("checkpoint.publish_dir={}", q(&svc.checkpoints_root)),
        format!("progress.log_file={}", q(&run_dir.join("progress.jsonl"))),
        format!("progress.plot_file={}", q(&run_dir.join("curves.png"))),
    ]);
    if !r.overrides.trim().is_empty() {
        let map: BTreeMap<String, serde_yaml::Value> = serde_yaml::from_str(&r.overrides).map_err(|e| ConfigError::Override {
            spec: r.overrides.clone(),
            reason: format!("expected a mapping of `section.key: value`: {e}"),
        })?;
        for (k, v) in map {
            let v = serde_yaml::to_string(&v).map_err(|e| ConfigError::Override { spec: k.clone(), reason: e.to_string() })?;
            sets.push(format!("{k}={}", v.trim_end()));
        }
    }
    TrainConfig::from_yaml(&text, &origin, &sets)
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
    /// Stage 2 training config file (`None`: the built-in `config/train.yaml`).
    pub train_config: Option<PathBuf>,
    /// `memory.preset` of Stage 2 jobs: a preset of `config/vram_presets.yaml`, `auto` or `manual`.
    pub vram_preset: String,
    /// `run.device` of Stage 2 jobs: auto, cpu, cuda or cuda:N.
    pub device: String,
}

impl ServiceConfig {
    /// Folders as given; the built-in training config, preset `auto`, device `auto`.
    pub fn new(base_model: PathBuf, runs_root: PathBuf, checkpoints_root: PathBuf) -> Self {
        Self { base_model, runs_root, checkpoints_root, train_config: None, vram_preset: "auto".into(), device: "auto".into() }
    }

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
    let model_ok = move |r: &StartRequest| heads_job::check_model_dir(&c.model_dir(r)).map_err(|e| RejectReason::ModelDirInvalid(e.to_string()));
    let c2 = cfg.clone();
    let config_ok = move |r: &StartRequest| {
        if r.stage1_checkpoint.is_empty() {
            return parse_overrides(&r.overrides).map(|_| ()).map_err(|e| RejectReason::ConfigInvalid(e.to_string()));
        }
        let invalid = |e: &dyn std::fmt::Display| RejectReason::ModelDirInvalid(format!("stage-1 checkpoint {}: {e}", r.stage1_checkpoint));
        let stage1 = super::publish::resolve_checkpoint_dir(std::path::Path::new(&r.stage1_checkpoint)).map_err(|e| invalid(&e))?;
        super::deploy::DeployInfo::read(&stage1).map_err(|e| invalid(&e))?;
        let cfg = stage2_config(&c2, r, &c2.runs_root.join("check")).map_err(|e| RejectReason::ConfigInvalid(e.to_string()))?;
        stage2::resolve_memory(&cfg).map(|_| ()).map_err(|e| RejectReason::ConfigInvalid(format!("{e:#}")))
    };
    let validators: Vec<Box<dyn Validator<StartRequest>>> = vec![Box::new(dataset_ok), Box::new(model_ok), Box::new(config_ok)];
    let published = std::sync::Mutex::new(published);
    let job = move |ctx: JobContext, r: StartRequest| {
        if !r.stage1_checkpoint.is_empty() {
            return run_stage2(&cfg, &ctx, &r, &published);
        }
        let o = parse_overrides(&r.overrides).expect("validated before start");
        let train = HeadsTrainConfig { epochs: o.epochs as u64, batch_size: o.batch_size, lr: o.lr, seed: o.seed, ..HeadsTrainConfig::default() };
        let job = HeadsJob {
            dataset: PathBuf::from(&r.dataset),
            base_model: cfg.model_dir(&r),
            checkpoints: cfg.checkpoints_root.clone(),
            work_dir: cfg.runs_root.join(&ctx.job_id),
            train,
            heads: small_heads(),
            resume: false,
        };
        let mut announce = |p: &Published| {
            let _ = published.lock().map(|tx| tx.send((ctx.job_id.clone(), p.clone())));
        };
        match heads_job::run(&job, &ctx, &mut announce) {
            Ok(res) => {
                let summary = json!({
                    "val_action_error_before": heads_job::mean(&res.val_error_before),
                    "val_action_error_after": heads_job::mean(&res.val_error_after),
                    "version": res.published.as_ref().map(|p| p.version.clone()),
                    "latest": res.published.as_ref().map(|p| p.latest),
                    "versions": res.run.published,
                    "global_step": res.run.counters.global_step,
                });
                if res.published.is_some() {
                    JobOutcome::Completed { summary }
                } else {
                    JobOutcome::Cancelled { summary }
                }
            }
            Err(e) => JobOutcome::Failed { error: format!("{e:#}") },
        }
    };
    JobController::new(job, validators, hub)
}

fn run_stage2(cfg: &ServiceConfig, ctx: &JobContext, r: &StartRequest, published: &std::sync::Mutex<Sender<(String, Published)>>) -> JobOutcome {
    let run_dir = cfg.runs_root.join(&ctx.job_id);
    let config = match stage2_config(cfg, r, &run_dir) {
        Ok(c) => c,
        Err(e) => return JobOutcome::Failed { error: e.to_string() },
    };
    let job = Stage2Job { config, resume: false };
    let mut announce = |p: &Published| {
        let _ = published.lock().map(|tx| tx.send((ctx.job_id.clone(), p.clone())));
    };
    match stage2::run(&job, ctx, &mut announce) {
        Ok(res) => {
            let summary = json!({
                "stage": 2,
                "val_action_error_before": res.val_action_error_before,
                "val_action_error_after": res.val_action_error,
                "lora_params_changed": res.lora_params_changed,
                "cache_refreshes": res.cache_refreshes,
                "versions": res.published,
                "global_step": res.run.counters.global_step,
            });
            if res.run.cancelled {
                JobOutcome::Cancelled { summary }
            } else {
                JobOutcome::Completed { summary }
            }
        }
        Err(e) => JobOutcome::Failed { error: format!("{e:#}") },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse_with_defaults_and_name_bad_keys() {
        assert_eq!(parse_overrides("").unwrap().epochs, 10);
        let o = parse_overrides("{epochs: 3, lr: 0.0005}").unwrap();
        assert_eq!((o.epochs, o.lr, o.batch_size), (3, 0.0005, 16));
        let e = parse_overrides("{epoch: 3}").unwrap_err().to_string();
        assert!(e.starts_with("override `{epoch: 3}`: unknown field `epoch`"), "{e}");
        let e = parse_overrides("{epochs: 0}").unwrap_err().to_string();
        assert!(e.contains("{epochs: 0}") && e.contains(">= 1"), "{e}");
    }

    #[test]
    fn requests_with_a_missing_dataset_or_model_are_rejected_without_starting() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ServiceConfig::new(dir.path().join("nomodel"), dir.path().join("runs"), dir.path().join("ck"));
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
