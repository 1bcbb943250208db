//! `vla_finetune demo`: the whole loop on an embedded default, on CPU (Stage 2 and the policy on
//! a GPU with `--device cuda`), without ROS. Every step is
//! the library's real code:
//! 1. the simulated robot's episodes are recorded to MCAP (rosbag2 layout);
//! 2. they are compiled into a training set;
//! 3. stage 1: the policy heads (sensor encoder + diffusion action expert) train on frozen VL
//!    features of the tiny random Qwen2.5-VL shipped with the tests (Hugging Face layout, copied
//!    into the output) and are published as a verified checkpoint;
//! 4. a policy process (`vla_finetune policy`, a child process) starts on the simulated robot's
//!    live inputs, watching the checkpoints folder, and hot-swaps to each new version;
//! 5. Stage 2 fine-tunes LoRA + heads from the stage-1 checkpoint in cache mode `features` with a
//!    refresh epoch (so both the cached and the live path run) and publishes its checkpoints;
//! 6. once the policy acts with the last one, it is stopped and the report is written.
//!
//! In the report, `stage1_val_action_error` and `stage2_val_action_error` are measured by the same
//! Stage 2 validation code (DDIM action error, mean absolute, physical units, validation
//! episodes) on the weights the policy ends up running (the last published version);
//! `stage2_best_val_action_error` is the best validated epoch (also published);
//! `stage1_job_val_action_error` is stage 1's own validation of its result.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::checkpoint::publish::{Published, Publisher};
use crate::dataset::compile::{compile_lazily, CompileConfig};
use crate::train::comparison::Errors;
use crate::train::config::{Override, TrainConfig};
use crate::train::heads_job::{small_heads, HeadsJob, HeadsResult, HeadsTrainConfig};
use crate::train::stage2::{self, Stage2Job};
use crate::vlm::Pooling;

/// How much simulated data a run records (`demo`, `experiment`).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct SimDataArgs {
    /// Simulated training episodes to record (per seed).
    #[arg(long, default_value_t = 16)]
    pub episodes: u64,
    /// Validation episodes, recorded with simulator seed + 1000 (scenes the training never saw).
    #[arg(long, default_value_t = 6)]
    pub val_episodes: u64,
    /// Seconds per episode.
    #[arg(long, default_value_t = 6.0)]
    pub seconds: f64,
}

/// Arguments of `demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Output folder (everything the demo makes stays there).
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    /// The simulated data recorded (simulator seed `--seed`).
    #[command(flatten)]
    pub data: SimDataArgs,
    /// Training epochs of stage 1 (heads on frozen VL features).
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Stage 2 epochs (a refresh epoch every `--refresh-every` epochs).
    #[arg(long, default_value_t = 4)]
    pub stage2_epochs: u64,
    /// Stage 2 cache refresh interval, epochs.
    #[arg(long, default_value_t = 2)]
    pub refresh_every: u64,
    /// Which tokens the VL feature averages: all, image, text or last.
    #[arg(long, default_value = "all", value_parser = super::parse_pooling)]
    pub vl_pooling: Pooling,
    /// Base VL model (Hugging Face Qwen2.5-VL folder; copied into the output). Default: the
    /// embedded one.
    #[arg(long)]
    pub base_model: Option<PathBuf>,
    /// Control rate of the policy process, Hz.
    #[arg(long, default_value_t = 10.0)]
    pub policy_rate_hz: f64,
    /// A reduced run (4 + 2 short episodes, fewer epochs) for tests and CI.
    #[arg(long)]
    pub quick: bool,
    /// Seed of the simulator, the split and the training.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Where Stage 2 and the policy process run: cpu (f32; the reproducible default), or auto,
    /// cuda, cuda:N (bf16 on a GPU). Stage 1 and the recording run on the CPU.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl DemoArgs {
    /// `--device`, checked to exist in this process.
    fn device(&self) -> Result<tch::Device> {
        crate::device::parse_available(&self.device).map_err(|e| anyhow::anyhow!("--device: {e}"))
    }
}

/// The tiny random Qwen2.5-VL (Hugging Face layout) embedded in the repository's test fixtures.
fn embedded_base_model() -> PathBuf {
    crate::repo_files::repo_file("tests/fixtures/vlm/tiny_a")
}

/// Runs the demo and prints its report (also written to `<out>/report.json`).
pub fn run(mut a: DemoArgs) -> Result<()> {
    if a.quick {
        a.data = SimDataArgs { episodes: 4, val_episodes: 2, seconds: 3.0 };
        (a.epochs, a.stage2_epochs) = (10, 3);
    }
    let t0 = Instant::now();
    a.device()?;
    tch::set_num_threads(1);
    if a.out.exists() {
        std::fs::remove_dir_all(&a.out).with_context(|| format!("clearing {}", a.out.display()))?;
    }
    std::fs::create_dir_all(&a.out)?;
    let out = std::fs::canonicalize(&a.out)?;
    let checkpoints = out.join("checkpoints");

    let data = DataPlan {
        seed: a.seed,
        sim: a.data,
        stage1_epochs: a.epochs as u64,
        vl_pooling: a.vl_pooling,
        base_model: a.base_model.clone(),
    };
    let p = prepare(&out, &data, &checkpoints)?;

    eprintln!("[5/6] policy process: hot-swapping checkpoints from {}", checkpoints.display());
    let status_file = out.join("policy_status.json");
    let mut policy = PolicyProcess::spawn(&p.base_model, &checkpoints, &status_file, &a, &out.join("policy.log"))?;
    policy.wait_active(&p.stage1_published.version, Duration::from_secs(180))?;
    // Stage 2 runs on this thread (libtorch with one intra-op thread); the policy process,
    // started before, keeps its priority.
    crate::priority::lower_this_thread(10);

    eprintln!("[6/6] Stage 2: LoRA + heads from the stage-1 checkpoint, cache mode `features` with refresh epochs");
    let s2 = run_stage2(&a, &out, &p, &checkpoints)?;
    // The policy ends on what `latest` names: Stage 2's best, or stage 1's version when no Stage 2
    // epoch beat it (see checkpoint.allow_worse_latest).
    let latest = Publisher::new(&checkpoints)?.latest()?.context("no `latest` checkpoint")?;
    policy.wait_active(&latest, Duration::from_secs(180))?;
    std::thread::sleep(Duration::from_secs(2));
    let status = policy.stop()?;

    let run = DemoRun { out: &out, prepared: &p, s2: &s2, latest: &latest, status: &status, status_file: &status_file };
    let errors = run.errors()?;
    let mut report = run.report(&errors);
    report["wall_s"] = json!(t0.elapsed().as_secs_f64());
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(out.join("report.json"), &text)?;
    println!("{text}");
    println!(
        "\nepisodes {} (samples train {} / val {}, validation scenes from simulator seed {})\n{}\n{}\n\
         policy: active {} after hot-swap in {} ms, {} missed ticks of {}\nplot {}; checkpoints {}; report {}",
        report["episodes"],
        report["samples_train"],
        report["samples_val"],
        p.val_seed,
        errors.table(),
        errors.verdict(),
        report["active_version"],
        report["hotswap_latency_ms"],
        report["missed_ticks"],
        report["policy_ticks"],
        out.join("stage2/curves.png").display(),
        checkpoints.display(),
        out.join("report.json").display()
    );
    Ok(())
}

/// The demo's Stage 2 (on `a.device`, cache mode `features` with refresh epochs) from `p`'s
/// stage-1 checkpoint, publishing to `checkpoints`.
fn run_stage2(a: &DemoArgs, out: &Path, p: &Prepared, checkpoints: &Path) -> Result<stage2::Stage2Result> {
    let plan = Stage2Plan {
        epochs: a.stage2_epochs,
        seed: a.seed,
        device: a.device.clone(),
        cache_mode: "features".into(),
        refresh_every: a.refresh_every,
        drift_threshold: None,
        lr_vl_lora: LR_VL_LORA,
    };
    let config =
        stage2_config(&plan, &out.join("stage2"), &p.dataset, &p.base_model, &p.stage1_published.dir, checkpoints)?;
    super::with_progress_bar("demo", false, |ctx| {
        Ok(stage2::run(&Stage2Job { config, resume: false, group: None }, ctx, &mut |p| {
            eprintln!("published {}", p.version)
        })?)
    })
}

/// What a finished demo run produced, for its report.
struct DemoRun<'a> {
    out: &'a Path,
    prepared: &'a Prepared,
    s2: &'a stage2::Stage2Result,
    /// The version `latest` names, which the policy ended on.
    latest: &'a str,
    /// The policy process's final status.
    status: &'a Value,
    status_file: &'a Path,
}

impl DemoRun<'_> {
    /// The validation action errors compared in the report.
    fn errors(&self) -> Result<Errors<'_>> {
        let (s1, s2, oracle) = (&self.prepared.stage1, self.s2, &self.prepared.oracle);
        Ok(Errors {
            untrained: (s1.val_action_error_before, &s1.val_error_before),
            stage1: (s2.val_action_error_before, &s2.val_action_error_before_per_dim),
            stage2: (s2.val_action_error.context("Stage 2 validated no epoch")?, &s2.val_action_error_per_dim),
            oracle: (oracle.val_action_error_after.context("the oracle validated no epoch")?, &oracle.val_error_after),
            stage1_vl_swapped: s1.val_action_error_conditioning_swapped,
        })
    }

    /// The report (`report.json`, without `wall_s`).
    fn report(&self, errors: &Errors<'_>) -> Value {
        let (p, s1, s2, status) = (self.prepared, &self.prepared.stage1, self.s2, self.status);
        let checkpoints = self.out.join("checkpoints");
        let swap = status["swaps"]
            .as_array()
            .and_then(|s| s.iter().rev().find(|s| s["version"] == self.latest))
            .cloned()
            .unwrap_or(Value::Null);
        let mut published = vec![p.stage1_published.version.clone()];
        published.extend(s2.published.iter().cloned());
        let mut report = json!({
            "episodes": p.compiled.report.episodes.len(),
            "validation_episodes_seed": p.val_seed,
            "samples_train": s1.samples.0,
            "samples_val": s1.samples.1,
            "drops": p.compiled.report.drops,
            "val_action_error_unit": "training-set std (mean over the varying action dimensions)",
            "untrained_val_action_error": errors.untrained.0,
            "stage1_job_val_action_error": s1.val_action_error_after,
            "stage1_val_action_error": errors.stage1.0,
            "stage2_val_action_error": errors.stage2.0,
            "oracle_val_action_error": errors.oracle.0,
            "stage1_vl_swapped_val_action_error": errors.stage1_vl_swapped,
            "val_action_error_per_dim": errors.per_dim(),
            "stage2_val_action_error_per_dim": s2.val_action_error_per_dim,
            "stage2_best_val_action_error": s2.run.best,
            "stage2_gain_over_stage1": 1.0 - errors.stage2.0 / errors.stage1.0,
            "stage1_over_oracle": errors.stage1.0 / errors.oracle.0,
            "verdict": errors.verdict(),
            "stage1_train_loss_per_epoch": s1.run.train_loss_per_epoch,
            "oracle_train_loss_per_epoch": p.oracle.run.train_loss_per_epoch,
            "stage2_validation_per_epoch": s2.run.validation,
            "lora_params_changed": s2.lora_params_changed,
            "cache_refreshes": s2.cache_refreshes,
            "published_versions": published,
            "latest_version": self.latest,
            "active_version": status["active_version"],
            "hotswap_latency_ms": swap["hotswap_latency_ms"],
            "missed_ticks": status["missed_ticks"],
            "policy_ticks": status["ticks"],
            "policy_actions": status["actions"],
            "policy_control_latency_ms": status["control_latency"],
            "checkpoints": checkpoints,
            "plot": self.out.join("stage2/curves.png"),
            "dataset": p.dataset,
            "base_model": p.base_model,
            "policy_status": self.status_file,
        });
        if let Some(last) = s2.published.last() {
            report["adapter"] = json!(checkpoints.join(last).join(crate::checkpoint::deploy::ADAPTER_DIR));
        }
        report
    }
}

/// What the demo (and `experiment`) records and trains before Stage 2.
#[derive(Debug, Clone)]
pub(super) struct DataPlan {
    /// Simulator seed of the training episodes (and seed of the split and of stage 1).
    pub seed: u64,
    /// Episodes and their length (validation ones with simulator seed `seed + VAL_SEED_OFFSET`).
    pub sim: SimDataArgs,
    /// Stage-1 epochs (the oracle's too).
    pub stage1_epochs: u64,
    /// The VL feature pooling of stage 1 (Stage 2 follows the checkpoint).
    pub vl_pooling: Pooling,
    /// The base VL model to copy in (None: the embedded one).
    pub base_model: Option<PathBuf>,
}

/// A recorded and compiled dataset with its stage-1 checkpoint and oracle floor.
pub(super) struct Prepared {
    pub dataset: PathBuf,
    pub base_model: PathBuf,
    pub compiled: crate::dataset::compile::CompileOutput,
    pub val_seed: u64,
    pub stage1: HeadsResult,
    pub stage1_published: Published,
    pub oracle: HeadsResult,
}

/// Records `d`'s episodes under `out/recordings` (the simulator's truth log beside them),
/// compiles them (validation: the unseen-seed episodes), trains stage 1 (published to
/// `checkpoints`) and the oracle floor on the same samples.
pub(super) fn prepare(out: &Path, d: &DataPlan, checkpoints: &Path) -> Result<Prepared> {
    let (data_root, dataset_dir, base_dir) = (out.join("recordings"), out.join("dataset"), out.join("base_model"));
    let source = d.base_model.clone().unwrap_or_else(embedded_base_model);
    crate::train::heads_job::check_model_dir(&source).map_err(|e| anyhow::anyhow!("--base-model: {e}"))?;
    let val_seed = d.seed + VAL_SEED_OFFSET;
    eprintln!(
        "[1/6] recording {} training episodes (simulator seed {}) and {} validation episodes (seed {val_seed})",
        d.sim.episodes, d.seed, d.sim.val_episodes
    );
    for (seed, n) in [(d.seed, d.sim.episodes), (val_seed, d.sim.val_episodes)] {
        super::record::run(record_args(&data_root, seed, n, d.sim.seconds))?;
    }

    eprintln!("[2/6] compiling the training set");
    let episodes = super::open_recorded_episodes(&data_root)?;
    let mut cc = CompileConfig::default();
    cc.align.sensor_window_s = 0.1;
    cc.align.sensor_samples = 65;
    cc.split.val_episodes = (0..d.sim.val_episodes).map(|i| super::record::episode_id(val_seed, i)).collect();
    cc.split.seed = d.seed;
    let compiled = compile_lazily(&episodes, &cc, &dataset_dir, true)?;

    eprintln!("[3/6] stage 1: policy heads on frozen VL features of {}", source.display());
    copy_dir(&source, &base_dir)?;
    let job = HeadsJob {
        dataset: dataset_dir.clone(),
        base_model: base_dir.clone(),
        checkpoints: checkpoints.to_path_buf(),
        work_dir: out.join("stage1"),
        train: HeadsTrainConfig {
            epochs: d.stage1_epochs,
            seed: d.seed,
            vl_pooling: d.vl_pooling,
            ..HeadsTrainConfig::default()
        },
        heads: small_heads(),
        resume: false,
        group: None,
    };
    let stage1 = super::with_progress_bar("demo", false, |ctx| {
        Ok(crate::train::heads_job::run(&job, ctx, &mut |p| eprintln!("published {}", p.version))?)
    })?;
    let stage1_published = stage1.published.clone().context("stage 1 ended without a checkpoint")?;

    eprintln!("[4/6] oracle: the same heads conditioned on the simulator's ground truth instead of VL features");
    let truth = crate::train::oracle::read_truth(&data_root.join(crate::sim::truth::TRUTH_FILE))?;
    let oracle_job = HeadsJob { work_dir: out.join("oracle"), ..job };
    let oracle = super::with_progress_bar("demo", false, |ctx| {
        Ok(crate::train::heads_job::run_oracle(&oracle_job, &truth, ctx)?)
    })?;
    Ok(Prepared { dataset: dataset_dir, base_model: base_dir, compiled, val_seed, stage1, stage1_published, oracle })
}

/// A Stage 2 run of the demo (and of `experiment`).
#[derive(Debug, Clone)]
pub(super) struct Stage2Plan {
    pub epochs: u64,
    pub seed: u64,
    /// `--device`.
    pub device: String,
    /// `cache.mode`.
    pub cache_mode: String,
    /// `cache.rebuild_interval_epochs`.
    pub refresh_every: u64,
    /// `cache.drift_threshold`.
    pub drift_threshold: Option<f64>,
    /// `optim.lr_vl_lora` (0: the VL model is not adapted, only the heads train).
    pub lr_vl_lora: f64,
}

/// The demo's LoRA learning rate: the tiny random model needs larger steps than a pretrained 3B.
pub(super) const LR_VL_LORA: f64 = 1.0e-3;

/// Offset of the validation episodes' simulator seed from `--seed`.
const VAL_SEED_OFFSET: u64 = 1000;

/// `record --sim` settings of the demo: `n` episodes of simulator `seed` into `root`.
fn record_args(root: &Path, seed: u64, n: u64, seconds: f64) -> super::record::RecordArgs {
    super::record::RecordArgs {
        sim: true,
        episodes: n,
        seconds,
        out: root.to_path_buf(),
        seed,
        cameras: 2,
        width: 112,
        height: 84,
        camera_hz: 10.0,
        sensor_hz: 650.0,
        pose_hz: 100.0,
        realtime: false,
        queue: 4096,
        queue_mb: 256,
        compression: crate::dataset::mcap_episode::Compression::Zstd,
        operator: "demo".into(),
        json: false,
    }
}

/// The Stage 2 configuration of `p`: config/train.yaml with CPU-sized settings (on
/// `p.device`), its files under `work`.
pub(super) fn stage2_config(
    p: &Stage2Plan,
    work: &Path,
    dataset: &Path,
    base: &Path,
    stage1: &Path,
    checkpoints: &Path,
) -> Result<TrainConfig> {
    let on_cuda = crate::device::parse_available(&p.device).map_err(|e| anyhow::anyhow!("--device: {e}"))?.is_cuda();
    let path = |key: &str, dir: &Path| Override::new(key, dir.display().to_string());
    let presets = std::fs::canonicalize(crate::repo_files::repo_file("config/vram_presets.yaml"))?;
    let all = vec![
        path("memory.presets_file", &presets),
        path("data.dataset_dir", dataset),
        path("model.base_model_dir", base),
        path("model.stage1_checkpoint", stage1),
        path("run.output_dir", work),
        Override::new("run.epochs", p.epochs),
        Override::new("run.seed", p.seed),
        Override::new("run.device", p.device.as_str()),
        // f32 on the CPU, bf16 (the GPU default) on CUDA; checkpointing as on a GPU.
        Override::new("model.compute_dtype", if on_cuda { "bf16" } else { "f32" }),
        Override::new("memory.preset", "manual"),
        Override::new("memory.micro_batch", 4u64),
        Override::new("memory.accum_steps", 2u64),
        Override::new("lora.rank", 8u64),
        // The tiny random model needs larger steps than a pretrained 3B.
        Override::new("optim.lr_vl_lora", p.lr_vl_lora),
        Override::new("optim.lr_heads", 3.0e-4),
        Override::new("optim.lr_sensor_encoder", 3.0e-4),
        Override::new("cache.mode", p.cache_mode.as_str()),
        Override::new("cache.rebuild_interval_epochs", p.refresh_every),
        Override::new("cache.drift_threshold", p.drift_threshold.map_or(serde_yaml::Value::Null, Into::into)),
        path("cache.dir", &work.join("cache")),
        path("checkpoint.state_dir", &work.join("state")),
        path("checkpoint.publish_dir", checkpoints),
        Override::new("checkpoint.keep_versions", 20u64),
        path("progress.log_file", &work.join("progress.jsonl")),
        path("progress.plot_file", &work.join("curves.png")),
    ];
    Ok(TrainConfig::from_yaml(include_str!("../../config/train.yaml"), "config/train.yaml", &all)?)
}

/// The `vla_finetune policy` child process and its status file.
struct PolicyProcess {
    child: Child,
    status_file: PathBuf,
}

impl PolicyProcess {
    fn spawn(base: &Path, checkpoints: &Path, status_file: &Path, a: &DemoArgs, log: &Path) -> Result<Self> {
        let (rate_hz, seed) = (a.policy_rate_hz, a.seed);
        let log_file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(std::env::current_exe()?)
            .arg("policy")
            .arg("--base-model")
            .arg(base)
            .arg("--checkpoints")
            .arg(checkpoints)
            .args(["--sim", "--rate-hz", &rate_hz.to_string(), "--seed", &seed.to_string(), "--status-period-s", "0.5"])
            // On the device of the demo's Stage 2.
            .args(["--device", &a.device])
            .arg("--status-json")
            .arg(status_file)
            .env("TORCH_NUM_THREADS", "1")
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting the policy process")?;
        Ok(Self { child, status_file: status_file.to_path_buf() })
    }

    fn status(&self) -> Option<Value> {
        serde_json::from_slice(&std::fs::read(&self.status_file).ok()?).ok()
    }

    /// Waits until the policy acts with `version`.
    fn wait_active(&mut self, version: &str, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        loop {
            if let Some(code) = self.child.try_wait()? {
                bail!(
                    "the policy process exited ({code}) before activating {version}; see policy.log beside {}",
                    self.status_file.display()
                );
            }
            if let Some(s) = self.status() {
                let acting = s["swaps"].as_array().is_some_and(|sw| {
                    sw.iter().any(|w| w["version"] == version && w["hotswap_latency_ms"].is_number())
                });
                if s["active_version"] == version && acting {
                    return Ok(());
                }
                if let Some(r) = s["rejected"].as_array().and_then(|r| r.iter().find(|r| r["version"] == version)) {
                    bail!("the policy process refused {version}: {}", r["reason"]);
                }
            }
            if t.elapsed() > timeout {
                bail!("the policy process did not act with {version} within {} s", timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Closes its stdin (the stop signal), waits for it and returns its final status.
    fn stop(mut self) -> Result<Value> {
        drop(self.child.stdin.take());
        let code = self.child.wait()?;
        if !code.success() {
            bail!("the policy process failed ({code})");
        }
        let s = self.status().context("the policy process wrote no final status")?;
        if s["finished"] != true {
            bail!("the policy process's last status is not final");
        }
        Ok(s)
    }
}

impl Drop for PolicyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let p = e?.path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().expect("file name")))?;
        }
    }
    Ok(())
}
