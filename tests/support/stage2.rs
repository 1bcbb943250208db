//! The Stage 2 tests' fixture: a small dataset recorded from the simulated robot and compiled,
//! the tiny random Qwen2.5-VL (tests/fixtures/vlm/tiny_a), a stage-1 checkpoint trained on them
//! with `heads_job`, and the embedded config/train.yaml pointed at them.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tch::Tensor;
use vla_finetune::dataset::compile::{compile, CompileConfig};
use vla_finetune::policy::config::PolicyConfig;
use vla_finetune::train::config::{Override, TrainConfig};
use vla_finetune::train::controller::JobContext;
use vla_finetune::train::heads_job::{self, small_heads, HeadsJob, HeadsTrainConfig};
use vla_finetune::train::progress::ProgressHub;

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub dataset: PathBuf,
    pub base: PathBuf,
    pub stage1: PathBuf,
}

pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        tch::set_num_threads(1);
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("rec");
        vla_finetune::cli::record::run(vla_finetune::cli::record::RecordArgs {
            sim: true,
            episodes: 3,
            seconds: 1.6,
            out: rec.clone(),
            seed: 3,
            cameras: 1,
            width: 56,
            height: 56,
            camera_hz: 10.0,
            sensor_hz: 650.0,
            pose_hz: 100.0,
            realtime: false,
            queue: 4096,
            queue_mb: 64,
            compression: vla_finetune::dataset::mcap_episode::Compression::Zstd,
            operator: "test".into(),
            json: true,
        })
        .unwrap();
        let eps: Vec<Box<dyn vla_finetune::dataset::episode::EpisodeSource>> =
            vla_finetune::dataset::mcap_episode::list_episodes(&rec)
                .unwrap()
                .into_iter()
                .map(|d| Box::new(vla_finetune::dataset::mcap_episode::McapEpisode::open(&d).unwrap()) as Box<_>)
                .collect();
        let refs: Vec<&dyn vla_finetune::dataset::episode::EpisodeSource> = eps.iter().map(|e| e.as_ref()).collect();
        let mut cc = CompileConfig::default();
        cc.align.sensor_window_s = 0.05;
        cc.align.sensor_samples = 16;
        cc.split.val_fraction = 0.34;
        cc.split.seed = 3;
        let dataset = dir.path().join("data");
        compile(&refs, &cc, &dataset, true).unwrap();
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vlm/tiny_a");
        let job = HeadsJob {
            dataset: dataset.clone(),
            base_model: base.clone(),
            checkpoints: dir.path().join("ck1"),
            work_dir: dir.path().join("heads_job"),
            train: stage1_training(),
            heads: tiny_heads(),
            resume: false,
            group: None,
        };
        let stage1 = heads_job::run(&job, &ctx(), &mut |_| {}).unwrap().published.unwrap().dir;
        Fixture { _dir: dir, dataset, base, stage1 }
    })
}

/// `fixture()` for tests that do not hold `rng_lock`: built on first use holding it, since the
/// build trains in this process, beside tests that compare seeded runs.
pub fn fixture_under_lock() -> &'static Fixture {
    let _rng = super::rng_lock();
    fixture()
}

/// Stage-1 heads small enough for the tiny model on CPU.
pub fn tiny_heads() -> PolicyConfig {
    let mut heads = small_heads();
    heads.sensor.conv_channels = vec![16, 16];
    (heads.sensor.d_model, heads.sensor.ff_dim, heads.sensor.out_dim, heads.sensor.dropout) = (16, 32, 16, 0.0);
    (heads.expert.d_model, heads.expert.ff_dim, heads.expert.n_layers, heads.expert.dropout) = (32, 64, 1, 0.0);
    heads
}

/// The fixture's stage-1 training settings.
pub fn stage1_training() -> HeadsTrainConfig {
    HeadsTrainConfig { epochs: 2, batch_size: 8, lr: 1e-3, seed: 3, ..HeadsTrainConfig::default() }
}

/// The embedded config/train.yaml pointed at the fixture, with outputs under `out`.
pub fn config(out: &Path, sets: &[&str]) -> TrainConfig {
    let f = fixture();
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let mut all = vec![
        format!("data.dataset_dir={}", q(&f.dataset)),
        format!("model.base_model_dir={}", q(&f.base)),
        format!("model.stage1_checkpoint={}", q(&f.stage1)),
        format!("run.output_dir={}", q(out)),
        format!("cache.dir={}", q(&out.join("cache"))),
        format!("checkpoint.state_dir={}", q(&out.join("state"))),
        format!("checkpoint.publish_dir={}", q(&out.join("ck"))),
        format!("progress.log_file={}", q(&out.join("log.jsonl"))),
        format!("progress.plot_file={}", q(&out.join("curves.png"))),
        "run.device=cpu".into(),
        "run.seed=5".into(),
        "model.compute_dtype=f32".into(),
        "memory.preset=manual".into(),
        "memory.micro_batch=4".into(),
        "memory.accum_steps=1".into(),
        "lora.rank=4".into(),
        "optim.lr_vl_lora=1.0e-3".into(),
        "optim.lr_heads=1.0e-3".into(),
        "optim.lr_sensor_encoder=1.0e-3".into(),
        "optim.warmup_ratio=0.0".into(),
    ];
    all.extend(sets.iter().map(|s| s.to_string()));
    let all: Vec<Override> = all.iter().map(|s| s.parse().unwrap()).collect();
    TrainConfig::from_yaml(include_str!("../../config/train.yaml"), "train.yaml", &all).unwrap()
}

pub fn ctx() -> JobContext {
    JobContext { job_id: "t".into(), cancel: Default::default(), progress: ProgressHub::new(1024) }
}

/// `v` with the key slice of every attention `in_proj_bias` zeroed: that slice has a zero true
/// gradient (softmax ignores a per-query constant), and Adam scales its float-noise gradient to
/// full lr-sized steps, so runs that split a batch differently disagree there only.
pub fn without_key_bias(v: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    v.into_iter()
        .map(|(n, t)| {
            if n.ends_with("in_proj_bias") {
                let d = t.size()[0] / 3;
                let t = t.copy();
                let _ = t.narrow(0, d, d).fill_(0.0);
                (n, t)
            } else {
                (n, t)
            }
        })
        .collect()
}
