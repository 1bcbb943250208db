//! The fine-tuning service behind the trainer node (and usable without ROS): start requests are
//! validated (dataset, model folder, overrides) before anything starts, one job runs at a time
//! through [`JobController`], and each published checkpoint is sent on a channel.
//!
//! A request with a stage-1 checkpoint runs Stage 2 ([`stage2`]: LoRA on the VL model + heads,
//! configured by the embedded `config/train.yaml` with the request's folders and a manual memory
//! setting for CPU); its state, cache and logs go under `<runs_root>/<job_id>/`. A request
//! without one runs stage 1 ([`heads_job`]: the policy heads on frozen VL features, configured
//! by `config/train_heads.yaml`). Both publish under `checkpoints_root`. One override syntax for
//! both ([`RequestOverrides`]): a YAML mapping of `section.key: value`, where stage 1's keys form
//! the section `stage1` (`{stage1.epochs: 3}`) and Stage 2's are those of `config/train.yaml`
//! (`{run.epochs: 3, cache.mode: features}`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::Sender;

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
    /// YAML/JSON mapping of `section.key: value` ([`RequestOverrides`]).
    pub overrides: String,
}

/// Section of the override keys that configure stage 1 (`config/train_heads.yaml`).
pub const STAGE1_SECTION: &str = "stage1";

/// A request's overrides split by stage, each as `key=value` specs for the config loaders.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestOverrides {
    /// Keys of `config/train_heads.yaml` (given as `stage1.<key>`).
    pub stage1: Vec<String>,
    /// `section.key` of `config/train.yaml`.
    pub stage2: Vec<String>,
}

impl RequestOverrides {
    /// Parses the overrides text (empty = none): a mapping whose keys are `section.key`, values
    /// any YAML. Errors name the text or the key and what was expected.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut out = Self::default();
        if text.trim().is_empty() {
            return Ok(out);
        }
        let map: BTreeMap<String, serde_yaml::Value> = serde_yaml::from_str(text).map_err(|e| ConfigError::Override {
            spec: text.to_string(),
            reason: format!("expected a mapping of `section.key: value`: {e}"),
        })?;
        for (key, value) in map {
            let bad = |reason: String| ConfigError::Override { spec: key.clone(), reason };
            let v = serde_yaml::to_string(&value).map_err(|e| bad(e.to_string()))?;
            match key.split_once('.') {
                Some((STAGE1_SECTION, k)) => out.stage1.push(format!("{k}={}", v.trim_end())),
                Some(_) => out.stage2.push(format!("{key}={}", v.trim_end())),
                None => {
                    return Err(bad(format!(
                        "expected `section.key`: `{STAGE1_SECTION}.{key}` for stage 1 (config/train_heads.yaml), a key of config/train.yaml such as `run.{key}` for Stage 2"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// Checks that every override applies to a stage the request runs.
    fn check_stage(&self, runs_stage2: bool) -> Result<(), ConfigError> {
        let (stray, which) = if runs_stage2 { (&self.stage1, "stage 1") } else { (&self.stage2, "Stage 2") };
        match stray.first() {
            None => Ok(()),
            Some(spec) => Err(ConfigError::Override {
                spec: spec.clone(),
                reason: format!(
                    "configures {which}, which this request does not run ({})",
                    if runs_stage2 { "it runs Stage 2 from stage1_checkpoint" } else { "it runs stage 1; give stage1_checkpoint to run Stage 2" }
                ),
            }),
        }
    }

    /// The stage-1 settings: `config/train_heads.yaml`'s values with these overrides.
    pub fn stage1_config(&self) -> Result<HeadsTrainConfig, ConfigError> {
        self.check_stage(false)?;
        HeadsTrainConfig::load(None, &self.stage1)
    }
}

/// The Stage 2 configuration of a request. Precedence, lowest first: the built-in
/// `config/train.yaml`, the service's `train_config` file (replacing it), the service's
/// `vram_preset` and `device`, the request's folders (dataset, base model, stage-1 checkpoint,
/// job folders under `run_dir`), then the request's `section.key: value` overrides. With preset
/// `auto` on a CPU device (no accelerator memory to measure) a CPU-sized setting is used
/// (micro-batch 4 x 1, LoRA rank 8). Errors name the bad key or value and where it came from.
pub fn stage2_config(svc: &ServiceConfig, r: &StartRequest, run_dir: &std::path::Path) -> Result<TrainConfig, ConfigError> {
    let overrides = RequestOverrides::parse(&r.overrides)?;
    overrides.check_stage(true)?;
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
    sets.extend(overrides.stage2);
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
            return RequestOverrides::parse(&r.overrides).and_then(|o| o.stage1_config()).map(|_| ()).map_err(|e| RejectReason::ConfigInvalid(e.to_string()));
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
        let train = match RequestOverrides::parse(&r.overrides).and_then(|o| o.stage1_config()) {
            Ok(t) => t,
            Err(e) => return JobOutcome::Failed { error: e.to_string() },
        };
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
    fn one_override_syntax_for_both_stages_names_bad_keys_and_stray_stages() {
        let text = "{stage1.epochs: 3, stage1.lr: 0.0005, run.epochs: 2, cache.mode: features}";
        let o = RequestOverrides::parse(text).unwrap();
        assert_eq!(o.stage1, ["epochs=3", "lr=0.0005"]);
        assert_eq!(o.stage2, ["cache.mode=features", "run.epochs=2"]);
        assert_eq!(RequestOverrides::parse("").unwrap(), RequestOverrides::default());
        // Stage 1 only: config/train_heads.yaml's values (epochs 30) with the overrides.
        let t = RequestOverrides::parse("{stage1.epochs: 3, stage1.lr: 0.0005}").unwrap().stage1_config().unwrap();
        assert_eq!((t.epochs, t.lr, t.batch_size), (3, 0.0005, 16));
        assert_eq!(RequestOverrides::default().stage1_config().unwrap(), HeadsTrainConfig::default());
        let e = RequestOverrides::parse("{epochs: 3}").unwrap_err().to_string();
        assert_eq!(e, "override `epochs`: expected `section.key`: `stage1.epochs` for stage 1 (config/train_heads.yaml), a key of config/train.yaml such as `run.epochs` for Stage 2");
        let e = RequestOverrides::parse("{stage1.epoch: 3}").unwrap().stage1_config().unwrap_err().to_string();
        assert_eq!(e, "override `epoch=3`: no key `epoch`");
        let e = RequestOverrides::parse("{stage1.epochs: 0}").unwrap().stage1_config().unwrap_err().to_string();
        assert_eq!(e, "config key `epochs`: must be >= 1");
        let e = RequestOverrides::parse("{run.epochs: 3}").unwrap().stage1_config().unwrap_err().to_string();
        assert!(e.starts_with("override `run.epochs=3`: configures Stage 2, which this request does not run"), "{e}");
        let svc = ServiceConfig::new("m".into(), "runs".into(), "ck".into());
        let r = StartRequest { stage1_checkpoint: "ck/v0001".into(), overrides: "{stage1.epochs: 3}".into(), ..Default::default() };
        let e = stage2_config(&svc, &r, std::path::Path::new("runs/j")).unwrap_err().to_string();
        assert!(e.starts_with("override `epochs=3`: configures stage 1, which this request does not run (it runs Stage 2"), "{e}");
        let e = RequestOverrides::parse("[1, 2]").unwrap_err().to_string();
        assert!(e.starts_with("override `[1, 2]`: expected a mapping of `section.key: value`"), "{e}");
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
