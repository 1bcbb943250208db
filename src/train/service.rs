//! The fine-tuning service behind the trainer node (and usable without ROS): start requests are
//! validated (dataset, model folder, stages, overrides) before anything starts, one job runs at
//! a time through [`JobController`], and each published checkpoint is sent on a channel.
//!
//! A request names a compiled dataset or the episodes root the collector records into; a root's
//! selected episodes are compiled first ([`training_set`], phase `compiling`, reused while they
//! are unchanged). It runs stage 1 ([`heads_job`]: the policy heads on frozen VL features,
//! `config/train_heads.yaml`), Stage 2 ([`stage2`]: LoRA on the VL model + heads from a stage-1
//! checkpoint, `config/train.yaml` with the request's folders and a manual memory setting for
//! CPU), or both in one job, Stage 2 starting from the stage 1 just published ([`Stages`]).
//! Everything of a job goes under `<runs_root>/<job_id>/` (`stage1/`, `stage2/`, the record
//! [`JobRecord`]); a cancelled or failed job resumes under its id ([`start`]). Both stages
//! publish under `checkpoints_root`. One override syntax for both ([`RequestOverrides`]): a YAML
//! mapping of `section.key: value`, where stage 1's keys form the section `stage1`
//! (`{stage1.epochs: 3}`) and Stage 2's are those of `config/train.yaml` (`{run.epochs: 3}`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::Sender;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::config::{ConfigError, KeyPath, Override, TrainConfig};
use super::controller::{JobContext, JobController, JobOutcome, JobStatus, RejectReason, StartResponse, Validator};
use super::heads_job::{self, small_heads, HeadsJob, HeadsTrainConfig};
use super::job_record::{run_dir, JobRecord, JobState};
use super::progress::{Phase, ProgressEvent, ProgressHub};
use super::stage2::{self, Stage2Job};
use super::training_set::{self, DatasetSource};
use crate::checkpoint::publish::Published;
use crate::dataset::compile::CompileConfig;
use crate::dataset::selection::EpisodeSelection;

/// A start request, as StartFineTune carries it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StartRequest {
    /// An episodes root (its selected episodes are compiled) or a compiled dataset folder.
    pub dataset: String,
    /// Stage-1 deployable checkpoint folder, or a checkpoints root or its `latest` (the version
    /// `latest` names); Stage 2 starts from it.
    pub stage1_checkpoint: String,
    /// Base model folder; empty = the service default.
    pub base_model: String,
    /// YAML/JSON mapping of `section.key: value` ([`RequestOverrides`]).
    pub overrides: String,
    /// `1`, `2` or `both`; empty: `2` with a stage-1 checkpoint, else `both` ([`Stages`]).
    pub stages: String,
    /// Which episodes of an episodes root train.
    pub selection: EpisodeSelection,
    /// A cancelled or failed job to resume (every other field empty).
    pub resume_job_id: String,
}

/// The stages a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stages {
    /// Stage 1 only: the policy heads on frozen VL features.
    One,
    /// Stage 2 only, from the request's stage-1 checkpoint.
    Two,
    /// Stage 1, then Stage 2 from the checkpoint stage 1 published.
    Both,
}

impl Stages {
    /// The stages of request `r`; errors say what to send instead.
    pub fn of(r: &StartRequest) -> Result<Self, ConfigError> {
        let given = !r.stage1_checkpoint.is_empty();
        let bad =
            |reason: &str| ConfigError::Override { spec: format!("stages={}", r.stages), reason: reason.to_string() };
        match (r.stages.as_str(), given) {
            ("", true) | ("2", true) => Ok(Stages::Two),
            ("", false) | ("both", false) => Ok(Stages::Both),
            ("1", false) => Ok(Stages::One),
            ("2", false) => Err(bad("Stage 2 starts from a stage-1 checkpoint: give stage1_checkpoint, or run `both`")),
            ("1" | "both", true) => Err(bad(
                "trains stage 1 from scratch, but stage1_checkpoint is given: leave it empty, or run `2` from it",
            )),
            _ => Err(bad("expected `1`, `2` or `both` (empty: `2` with stage1_checkpoint, else `both`)")),
        }
    }

    /// `1`, `2` or `both`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stages::One => "1",
            Stages::Two => "2",
            Stages::Both => "both",
        }
    }

    fn stage1(self) -> bool {
        self != Stages::Two
    }

    fn stage2(self) -> bool {
        self != Stages::One
    }
}

/// Section of the override keys that configure stage 1 (`config/train_heads.yaml`).
pub const STAGE1_SECTION: &str = "stage1";

/// A request's overrides split by stage, typed for the config loaders.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestOverrides {
    /// Keys of `config/train_heads.yaml` (given as `stage1.<key>`, kept without the section).
    pub stage1: Vec<Override>,
    /// `section.key` of `config/train.yaml`.
    pub stage2: Vec<Override>,
}

impl RequestOverrides {
    /// Parses the overrides text (empty = none): a mapping whose keys are `section.key`, values
    /// any YAML. Errors name the text or the key and what was expected.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut out = Self::default();
        if text.trim().is_empty() {
            return Ok(out);
        }
        let map: BTreeMap<String, serde_yaml::Value> =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Override {
                spec: text.to_string(),
                reason: format!("expected a mapping of `section.key: value`: {e}"),
            })?;
        for (key, value) in map {
            match key.split_once('.') {
                Some((STAGE1_SECTION, k)) => out.stage1.push(Override { key: KeyPath::parse(k), value }),
                Some(_) => out.stage2.push(Override { key: KeyPath::parse(&key), value }),
                None => {
                    return Err(ConfigError::Override {
                        reason: format!(
                            "expected `section.key`: `{STAGE1_SECTION}.{key}` for stage 1 (config/train_heads.yaml), a key of config/train.yaml such as `run.{key}` for Stage 2"
                        ),
                        spec: key,
                    })
                }
            }
        }
        Ok(out)
    }

    /// Checks that every override applies to a stage the request runs.
    pub fn check_stages(&self, stages: Stages) -> Result<(), ConfigError> {
        let stray = match stages {
            Stages::One => self.stage2.first().map(|s| (s, "Stage 2", "it runs stage 1 only (stages `1`)")),
            Stages::Two => self.stage1.first().map(|s| (s, "stage 1", "it runs Stage 2 from stage1_checkpoint")),
            Stages::Both => None,
        };
        match stray {
            None => Ok(()),
            Some((o, which, why)) => Err(ConfigError::Override {
                spec: o.to_string(),
                reason: format!("configures {which}, which this request does not run ({why})"),
            }),
        }
    }

    /// The stage-1 settings: `config/train_heads.yaml`'s values with these overrides.
    pub fn stage1_config(&self) -> Result<HeadsTrainConfig, ConfigError> {
        HeadsTrainConfig::load(None, &self.stage1)
    }
}

/// The Stage 2 configuration of a request. Precedence, lowest first: the built-in
/// `config/train.yaml`, the service's `train_config` file (replacing it), the service's
/// `vram_preset` and `device`, the request's folders (dataset, base model, stage-1 checkpoint,
/// job folders under `run_dir`), then the request's `section.key: value` overrides. With preset
/// `auto` on a CPU device (no accelerator memory to measure) a CPU-sized setting is used
/// (micro-batch 4 x 1, LoRA rank 8). Errors name the bad key or value and where it came from.
pub fn stage2_config(
    svc: &ServiceConfig,
    r: &StartRequest,
    run_dir: &std::path::Path,
) -> Result<TrainConfig, ConfigError> {
    let overrides = RequestOverrides::parse(&r.overrides)?;
    let (text, origin) = match &svc.train_config {
        Some(path) => (
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.clone(), source })?,
            path.display().to_string(),
        ),
        None => (include_str!("../../config/train.yaml").to_string(), "config/train.yaml (embedded)".to_string()),
    };
    let cpu_auto = svc.vram_preset == "auto" && matches!(crate::device::parse(&svc.device), Ok(tch::Device::Cpu));
    let preset = if cpu_auto { "manual" } else { svc.vram_preset.as_str() };
    let path = |key: &str, p: &std::path::Path| Override::new(key, p.display().to_string());
    let mut sets = vec![Override::new("run.device", svc.device.as_str()), Override::new("memory.preset", preset)];
    if cpu_auto {
        sets.extend([
            Override::new("memory.micro_batch", 4u64),
            Override::new("memory.accum_steps", 1u64),
            Override::new("lora.rank", 8u64),
        ]);
    }
    sets.extend([
        Override::new("data.dataset_dir", r.dataset.as_str()),
        path("model.base_model_dir", &svc.model_dir(r)),
        Override::new("model.stage1_checkpoint", r.stage1_checkpoint.as_str()),
        path("run.output_dir", run_dir),
        path("cache.dir", &run_dir.join("cache")),
        path("checkpoint.state_dir", &run_dir.join("state")),
        path("checkpoint.publish_dir", &svc.checkpoints_root),
        path("progress.log_file", &run_dir.join("progress.jsonl")),
        path("progress.plot_file", &run_dir.join("curves.png")),
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
    /// How an episodes root is compiled.
    pub compile: CompileConfig,
    /// Added to the nice value of each job's thread (0: unchanged), so that a control loop on
    /// the same machine keeps the CPU.
    pub job_nice: i32,
    /// Stage 2 as this many data-parallel ranks under torchrun ([`super::launch`]); 1: in this
    /// process.
    pub nproc_per_node: usize,
}

impl ServiceConfig {
    /// Folders as given; the built-in training config, preset `auto`, device `auto`.
    pub fn new(base_model: PathBuf, runs_root: PathBuf, checkpoints_root: PathBuf) -> Self {
        Self {
            base_model,
            runs_root,
            checkpoints_root,
            train_config: None,
            vram_preset: "auto".into(),
            device: "auto".into(),
            compile: CompileConfig::default(),
            job_nice: 0,
            nproc_per_node: 1,
        }
    }

    fn model_dir(&self, r: &StartRequest) -> PathBuf {
        if r.base_model.is_empty() {
            self.base_model.clone()
        } else {
            PathBuf::from(&r.base_model)
        }
    }
}

/// The request's stages, overrides and per-stage settings, checked (nothing runs).
fn check_request(svc: &ServiceConfig, r: &StartRequest) -> Result<Stages, RejectReason> {
    let invalid = |e: &dyn std::fmt::Display| RejectReason::ConfigInvalid(e.to_string());
    let stages = Stages::of(r).map_err(|e| invalid(&e))?;
    let overrides = RequestOverrides::parse(&r.overrides).map_err(|e| invalid(&e))?;
    overrides.check_stages(stages).map_err(|e| invalid(&e))?;
    if stages.stage1() {
        overrides.stage1_config().map_err(|e| invalid(&e))?;
    }
    if stages.stage2() {
        if stages == Stages::Two {
            let bad = |e: &dyn std::fmt::Display| {
                RejectReason::ModelDirInvalid(format!("stage-1 checkpoint {}: {e}", r.stage1_checkpoint))
            };
            let stage1 = crate::checkpoint::publish::resolve_checkpoint_dir(std::path::Path::new(&r.stage1_checkpoint))
                .map_err(|e| bad(&e))?;
            let info = crate::checkpoint::deploy::DeployInfo::read(&stage1).map_err(|e| bad(&e))?;
            // A compiled dataset is checked now; an episodes root's layout is known once compiled.
            if let Ok(index) = crate::dataset::store::DatasetIndex::load(std::path::Path::new(&r.dataset)) {
                if let Some(why) = info.layout_mismatch(index.sensor_shape, index.action_shape) {
                    return Err(RejectReason::DatasetMissing(format!(
                        "{}: another sensor layout: stage-1 checkpoint {} {why}",
                        r.dataset, r.stage1_checkpoint
                    )));
                }
            }
        }
        // A resume plans memory as its saved state says; a new job as if it ran now.
        let dir = if r.resume_job_id.is_empty() {
            svc.runs_root.join("check")
        } else {
            svc.runs_root.join(&r.resume_job_id).join("stage2")
        };
        let cfg = stage2_config(svc, r, &dir).map_err(|e| invalid(&e))?;
        stage2::plan_memory(&cfg, !r.resume_job_id.is_empty(), &mut || stage2::free_accelerator_gib(&cfg.run.device))
            .map_err(|e| RejectReason::ConfigInvalid(format!("{e:#}")))?;
    }
    Ok(stages)
}

/// A controller running fine-tuning jobs; published checkpoints go to `published`. Start jobs
/// with [`start`] (it resumes jobs by id).
pub fn controller(
    cfg: ServiceConfig,
    hub: ProgressHub,
    published: Sender<(String, Published)>,
) -> JobController<StartRequest> {
    let dataset_ok = move |r: &StartRequest| {
        DatasetSource::resolve(std::path::Path::new(&r.dataset), &r.selection)
            .map(|_| ())
            .map_err(|e| RejectReason::DatasetMissing(e.to_string()))
    };
    let c = cfg.clone();
    let model_ok = move |r: &StartRequest| {
        heads_job::check_model_dir(&c.model_dir(r)).map_err(|e| RejectReason::ModelDirInvalid(e.to_string()))
    };
    let c = cfg.clone();
    let config_ok = move |r: &StartRequest| check_request(&c, r).map(|_| ());
    let validators: Vec<Box<dyn Validator<StartRequest>>> =
        vec![Box::new(dataset_ok), Box::new(model_ok), Box::new(config_ok)];
    let published = std::sync::Mutex::new(published);
    let job = move |ctx: JobContext, r: StartRequest| {
        let announce = |p: &Published| {
            if let Ok(tx) = published.lock() {
                let _ = tx.send((ctx.job_id.clone(), p.clone()));
            }
        };
        run_job(&cfg, &ctx, r, &announce)
    };
    JobController::new(job, validators, hub)
}

/// Starts `r` on `jobs`: a new job, or with `resume_job_id` the recorded job of that id under
/// its own request and id, continuing from its saved state (its compiled dataset reused).
pub fn start(jobs: &JobController<StartRequest>, svc: &ServiceConfig, r: StartRequest) -> StartResponse {
    if r.resume_job_id.is_empty() {
        return jobs.start(r);
    }
    let id = r.resume_job_id.clone();
    let record = match run_dir(&svc.runs_root, &id).map(|d| JobRecord::read(&d)) {
        Some(Ok(rec)) => rec,
        Some(Err(e)) => return StartResponse::Rejected(RejectReason::UnknownJob(format!("`{id}`: {e}"))),
        None => return StartResponse::Rejected(RejectReason::UnknownJob(format!("`{id}` is not a job id"))),
    };
    if r != (StartRequest { resume_job_id: id.clone(), ..Default::default() }) {
        return StartResponse::Rejected(RejectReason::NotResumable(format!(
            "`{id}`: a resume runs the job's own request; leave every field but resume_job_id empty"
        )));
    }
    if let JobStatus::Running { job_id, .. } = jobs.status() {
        return StartResponse::Rejected(RejectReason::AlreadyRunning { job_id });
    }
    match record.state_now().0 {
        JobState::Cancelled | JobState::Failed => {}
        s => {
            return StartResponse::Rejected(RejectReason::NotResumable(format!(
                "`{id}` is {}; only a cancelled or failed job resumes",
                s.as_str()
            )))
        }
    }
    let mut again = record.request.clone();
    again.resume_job_id = id.clone();
    if !record.dataset.is_empty() {
        again.dataset = record.dataset.clone();
    }
    jobs.start_as(again, Some(id))
}

/// What [`job_view`] says of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    /// The job.
    pub job_id: String,
    /// Where it stands.
    pub state: JobState,
    /// Its record (request, dataset, stage, versions).
    pub record: Option<JobRecord>,
    /// Final numbers (JSON) or the error.
    pub summary: String,
    /// Whether [`start`] can resume it.
    pub resumable: bool,
}

/// The state of job `job_id` (empty: the running or last job), from the controller while it
/// runs and from its record after; `Err` says why there is none.
pub fn job_view(jobs: &JobController<StartRequest>, svc: &ServiceConfig, job_id: &str) -> Result<JobView, String> {
    let status = jobs.status();
    let id = match (job_id, &status) {
        ("", JobStatus::Running { job_id, .. } | JobStatus::Finished { job_id, .. }) => job_id.clone(),
        ("", JobStatus::Idle) => return Err("no job has run since the trainer started; name a job id".into()),
        (id, _) => id.to_string(),
    };
    let dir = run_dir(&svc.runs_root, &id).ok_or_else(|| format!("`{id}` is not a job id"))?;
    let record = JobRecord::read(&dir).ok();
    let (state, summary) = match (&status, &record) {
        (JobStatus::Running { job_id, cancelling }, _) if *job_id == id => {
            (if *cancelling { JobState::Cancelling } else { JobState::Running }, String::new())
        }
        (JobStatus::Finished { job_id, outcome }, _) if *job_id == id => match outcome {
            JobOutcome::Completed { summary } => (JobState::Done, summary.to_string()),
            JobOutcome::Cancelled { summary } => (JobState::Cancelled, summary.to_string()),
            JobOutcome::Failed { error } => (JobState::Failed, error.clone()),
        },
        (_, Some(rec)) => rec.state_now(),
        (_, None) => return Err(format!("no job `{id}` under {}", svc.runs_root.display())),
    };
    let resumable = record.is_some() && matches!(state, JobState::Cancelled | JobState::Failed);
    Ok(JobView { job_id: id, state, record, summary, resumable })
}

/// Runs one job: compiles an episodes root, then its stages, keeping its record up to date.
fn run_job(cfg: &ServiceConfig, ctx: &JobContext, r: StartRequest, announce: &dyn Fn(&Published)) -> JobOutcome {
    crate::priority::lower_this_thread(cfg.job_nice);
    let dir = cfg.runs_root.join(&ctx.job_id);
    let resume = !r.resume_job_id.is_empty();
    let mut record = match (resume, JobRecord::read(&dir)) {
        (true, Ok(mut rec)) => {
            rec.state = JobState::Running;
            rec.pid = std::process::id();
            rec
        }
        (true, Err(e)) => return JobOutcome::Failed { error: e },
        (false, _) => {
            let stages = match Stages::of(&r) {
                Ok(s) => s,
                Err(e) => return JobOutcome::Failed { error: e.to_string() },
            };
            JobRecord {
                job_id: ctx.job_id.clone(),
                request: r.clone(),
                stages,
                dataset: String::new(),
                stage: 0,
                stage1_checkpoint: String::new(),
                versions: Vec::new(),
                state: JobState::Running,
                summary: String::new(),
                pid: std::process::id(),
            }
        }
    };
    let save = |rec: &JobRecord| {
        if let Err(e) = rec.write(&dir) {
            tracing::warn!("job {}: could not write its record: {e}", rec.job_id);
        }
    };
    save(&record);
    let env = JobEnv { cfg, ctx, run_dir: &dir, resume, announce, save: &save };
    let outcome = run_stages(&env, &r, &mut record);
    let (state, summary) = match &outcome {
        JobOutcome::Completed { summary } => (JobState::Done, summary.to_string()),
        JobOutcome::Cancelled { summary } => (JobState::Cancelled, summary.to_string()),
        JobOutcome::Failed { error } => (JobState::Failed, error.clone()),
    };
    record.state = state;
    record.summary = summary;
    save(&record);
    outcome
}

/// What the stages of a running job share.
struct JobEnv<'a> {
    cfg: &'a ServiceConfig,
    ctx: &'a JobContext,
    /// `<runs_root>/<job_id>`.
    run_dir: &'a std::path::Path,
    /// The job continues a cancelled or failed run.
    resume: bool,
    announce: &'a dyn Fn(&Published),
    /// Writes the job's record.
    save: &'a dyn Fn(&JobRecord),
}

impl JobEnv<'_> {
    /// The job's context, its progress labelled with `stage`.
    fn stage_ctx(&self, stage: u8) -> JobContext {
        JobContext { progress: self.ctx.progress.with_stage(stage), ..self.ctx.clone() }
    }
}

/// How a stage ended (a failure is an `Err` with its message).
struct StageEnd {
    /// Its part of the job's summary.
    summary: serde_json::Value,
    /// It stopped without finishing (stage 1: without publishing).
    cancelled: bool,
}

/// The job's stages after its dataset is compiled (once; a resume reuses it), each recorded.
fn run_stages(env: &JobEnv, r: &StartRequest, record: &mut JobRecord) -> JobOutcome {
    let failed = |error: String| JobOutcome::Failed { error };
    if record.dataset.is_empty() {
        match compile_episodes(env.cfg, env.ctx, r) {
            Ok(d) => record.dataset = d,
            Err(e) => return failed(e),
        }
        (env.save)(record);
    }
    let mut r = StartRequest { dataset: record.dataset.clone(), ..r.clone() };
    let mut summary = json!({ "stages": record.stages.as_str(), "dataset": record.dataset });
    if record.stages.stage1() && record.stage1_checkpoint.is_empty() {
        match run_stage1(env, &r, record) {
            Ok(end) => {
                summary["stage1"] = end.summary;
                if end.cancelled {
                    return JobOutcome::Cancelled { summary };
                }
            }
            Err(e) => return failed(e),
        }
    }
    if !record.stages.stage2() {
        return JobOutcome::Completed { summary };
    }
    if record.stages == Stages::Both {
        r.stage1_checkpoint = record.stage1_checkpoint.clone();
    }
    match run_stage2(env, &r, record) {
        Ok(end) => {
            summary["stage2"] = end.summary;
            if end.cancelled {
                JobOutcome::Cancelled { summary }
            } else {
                JobOutcome::Completed { summary }
            }
        }
        Err(e) => failed(e),
    }
}

/// Stage 1 of `r` under `<run_dir>/stage1`; its versions and published checkpoint go into `record`.
fn run_stage1(env: &JobEnv, r: &StartRequest, record: &mut JobRecord) -> Result<StageEnd, String> {
    record.stage = 1;
    (env.save)(record);
    let train = RequestOverrides::parse(&r.overrides).and_then(|o| o.stage1_config()).map_err(|e| e.to_string())?;
    let job = HeadsJob {
        dataset: PathBuf::from(&r.dataset),
        base_model: env.cfg.model_dir(r),
        checkpoints: env.cfg.checkpoints_root.clone(),
        work_dir: env.run_dir.join("stage1"),
        train,
        heads: small_heads(),
        resume: env.resume,
        group: None,
    };
    let mut versions = Vec::new();
    let res = heads_job::run(&job, &env.stage_ctx(1), &mut |p: &Published| {
        versions.push(p.clone());
        (env.announce)(p);
    });
    record.versions.extend(versions.iter().map(|p| p.version.clone()));
    let res = res.map_err(|e| format!("stage 1: {e:#}"))?;
    let summary = json!({
        "val_action_error_before": res.val_action_error_before,
        "val_action_error_after": res.val_action_error_after,
        "val_action_error_conditioning_swapped": res.val_action_error_conditioning_swapped,
        "val_action_error_before_per_dim": res.val_error_before,
        "val_action_error_per_dim": res.val_error_after,
        "version": res.published.as_ref().map(|p| p.version.clone()),
        "latest": res.published.as_ref().map(|p| p.latest),
        "versions": res.run.published,
        "global_step": res.run.counters.global_step,
        "samples": [res.samples.0, res.samples.1],
        "train_loss_per_epoch": res.run.train_loss_per_epoch,
    });
    let Some(p) = res.published else { return Ok(StageEnd { summary, cancelled: true }) };
    record.stage1_checkpoint = p.dir.display().to_string();
    (env.save)(record);
    Ok(StageEnd { summary, cancelled: false })
}

/// Stage 2 of `r` under `<run_dir>/stage2` (as torchrun ranks with `nproc_per_node > 1`); its
/// versions go into `record`.
fn run_stage2(env: &JobEnv, r: &StartRequest, record: &mut JobRecord) -> Result<StageEnd, String> {
    record.stage = 2;
    (env.save)(record);
    let config = stage2_config(env.cfg, r, &env.run_dir.join("stage2")).map_err(|e| e.to_string())?;
    // A Stage 2 resumes only when the job was in it already (a stage 1 that just finished
    // leaves no Stage 2 state).
    let job = Stage2Job { config, resume: env.resume && env.run_dir.join("stage2/state").exists(), group: None };
    let mut published = Vec::new();
    let mut on_publish = |p: &Published| {
        published.push(p.version.clone());
        (env.announce)(p);
    };
    let res = match env.cfg.nproc_per_node {
        1 => stage2::run(&job, &env.stage_ctx(2), &mut on_publish),
        n => super::launch::Launch::local(n)
            .and_then(|l| super::launch::run_stage2(&job, &l, &env.stage_ctx(2), &mut on_publish)),
    };
    record.versions.extend(published);
    let res = res.map_err(|e| format!("stage 2: {e:#}"))?;
    let summary = json!({
        "val_action_error_before": res.val_action_error_before,
        "val_action_error_after": res.val_action_error,
        "val_action_error_before_per_dim": res.val_action_error_before_per_dim,
        "val_action_error_per_dim": res.val_action_error_per_dim,
        "best": res.run.best,
        "validation": res.run.validation,
        "train_loss_per_epoch": res.run.train_loss_per_epoch,
        "lora_params_changed": res.lora_params_changed,
        "cache_refreshes": res.cache_refreshes,
        "versions": res.published,
        "global_step": res.run.counters.global_step,
    });
    Ok(StageEnd { summary, cancelled: res.run.cancelled })
}

/// The compiled dataset of `r.dataset` (compiling an episodes root's selection under
/// `<runs_root>/datasets`), reporting phase `compiling` with what was compiled, dropped and left out.
fn compile_episodes(cfg: &ServiceConfig, ctx: &JobContext, r: &StartRequest) -> Result<String, String> {
    let source = DatasetSource::resolve(std::path::Path::new(&r.dataset), &r.selection).map_err(|e| e.to_string())?;
    let report = |message: String| {
        let mut ev = ProgressEvent::new(&ctx.job_id, Phase::Compiling);
        ev.message = message;
        ctx.progress.with_stage(0).publish(ev);
    };
    if let DatasetSource::Episodes { root, selected } = &source {
        report(format!(
            "compiling {} episode(s) of {} ({} left out by the selection)",
            selected.dirs.len(),
            root.display(),
            selected.left_out.len()
        ));
    }
    let set =
        training_set::prepare(&source, &cfg.compile, &cfg.runs_root.join("datasets")).map_err(|e| e.to_string())?;
    if matches!(source, DatasetSource::Episodes { .. }) {
        let text = training_set::describe(&set);
        tracing::info!("job {}: {text}", ctx.job_id);
        report(text);
    }
    Ok(set.dir.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_override_syntax_for_both_stages_names_bad_keys_and_stray_stages() {
        let text = "{stage1.epochs: 3, stage1.lr: 0.0005, run.epochs: 2, cache.mode: features}";
        let o = RequestOverrides::parse(text).unwrap();
        let shown = |v: &[Override]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(shown(&o.stage1), ["epochs=3", "lr=0.0005"]);
        assert_eq!(shown(&o.stage2), ["cache.mode=features", "run.epochs=2"]);
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
        let e = RequestOverrides::parse("{run.epochs: 3}").unwrap().check_stages(Stages::One).unwrap_err().to_string();
        assert!(e.starts_with("override `run.epochs=3`: configures Stage 2, which this request does not run"), "{e}");
        let e =
            RequestOverrides::parse("{stage1.epochs: 3}").unwrap().check_stages(Stages::Two).unwrap_err().to_string();
        assert!(
            e.starts_with("override `epochs=3`: configures stage 1, which this request does not run (it runs Stage 2"),
            "{e}"
        );
        RequestOverrides::parse(text).unwrap().check_stages(Stages::Both).unwrap();
        let e = RequestOverrides::parse("[1, 2]").unwrap_err().to_string();
        assert!(e.starts_with("override `[1, 2]`: expected a mapping of `section.key: value`"), "{e}");
    }

    #[test]
    fn stages_default_to_both_without_a_stage1_checkpoint_and_mismatches_say_what_to_send() {
        let r = |stages: &str, ck: &str| StartRequest {
            stages: stages.into(),
            stage1_checkpoint: ck.into(),
            ..Default::default()
        };
        assert_eq!(Stages::of(&r("", "")).unwrap(), Stages::Both);
        assert_eq!(Stages::of(&r("", "ck")).unwrap(), Stages::Two);
        assert_eq!(Stages::of(&r("1", "")).unwrap(), Stages::One);
        assert_eq!(Stages::of(&r("both", "")).unwrap(), Stages::Both);
        let e = Stages::of(&r("2", "")).unwrap_err().to_string();
        assert_eq!(
            e,
            "override `stages=2`: Stage 2 starts from a stage-1 checkpoint: give stage1_checkpoint, or run `both`"
        );
        assert!(Stages::of(&r("1", "ck")).unwrap_err().to_string().contains("stage1_checkpoint is given"));
        assert!(Stages::of(&r("3", "")).unwrap_err().to_string().contains("expected `1`, `2` or `both`"));
    }

    #[test]
    fn requests_with_a_missing_dataset_or_model_are_rejected_without_starting() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ServiceConfig::new(dir.path().join("nomodel"), dir.path().join("runs"), dir.path().join("ck"));
        let (tx, _rx) = std::sync::mpsc::channel();
        let c = controller(cfg, ProgressHub::new(8), tx);
        let r = StartRequest { dataset: dir.path().join("nodata").display().to_string(), ..Default::default() };
        match c.start(r) {
            StartResponse::Rejected(RejectReason::DatasetMissing(m)) => {
                assert!(
                    m.ends_with("nodata: neither a compiled dataset (index.json) nor an episodes root (episodes/)"),
                    "{m}"
                )
            }
            other => panic!("expected a dataset rejection, got {other:?}"),
        }
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/index.json"), "{}").unwrap();
        let r = StartRequest { dataset: dir.path().join("data").display().to_string(), ..Default::default() };
        assert!(matches!(c.start(r), StartResponse::Rejected(RejectReason::ModelDirInvalid(_))));
        // An episodes root without a usable episode names what it found.
        std::fs::create_dir_all(dir.path().join("rec/episodes")).unwrap();
        let r = StartRequest { dataset: dir.path().join("rec").display().to_string(), ..Default::default() };
        match c.start(r) {
            StartResponse::Rejected(RejectReason::DatasetMissing(m)) => {
                assert!(m.ends_with("rec: no usable episode: the `episodes/` folder is empty"), "{m}")
            }
            other => panic!("expected a dataset rejection, got {other:?}"),
        }
        assert!(!dir.path().join("runs").exists(), "nothing started");
    }
}
