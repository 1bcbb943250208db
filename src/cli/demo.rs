//! `vla_finetune demo`: the loop on an embedded default, on CPU, without ROS.
//!
//! What runs now (each step is the library's real code): the simulated robot's episodes are
//! recorded to MCAP, compiled into a training set, VL features are computed with the tiny
//! random Qwen2.5-VL shipped with the tests (Hugging Face layout, copied into the output), the
//! policy heads (sensor encoder + diffusion action expert) are trained on them with frozen VL
//! features (stage 1), validated (DDIM action error in physical units before and after), and the
//! result is published as a verified checkpoint. Stage 2 (LoRA on the VL model) and the parallel
//! policy process with hot-swap are not part of this build yet; the report says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::dataset::compile::{compile, CompileConfig};
use crate::dataset::reader::Dataset;
use crate::dataset::store::Split;
use crate::policy::config::PolicyConfig;
use crate::policy::heads::{CondInput, PolicyHeads, VlFeatures};
use crate::policy::normalize::NormStats;
use crate::train::deploy::{DeployInfo, ProcessorSettings, DEPLOY_FILE, DEPLOY_FORMAT_VERSION, HEADS_FILE, STATS_FILE};
use crate::train::optim::{AdamW, AdamWConfig, CosineSchedule, GroupConfig, NamedParam};
use crate::train::publish::{verify, PublishItem, PublishRequest, Publisher, Source};
use crate::vlm::{Pooling, Qwen25VL, VlProcessor};

/// Arguments of `demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Output folder (everything the demo makes stays there).
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    /// Simulated episodes to record.
    #[arg(long, default_value_t = 8)]
    pub episodes: u64,
    /// Seconds per episode.
    #[arg(long, default_value_t = 6.0)]
    pub seconds: f64,
    /// Training epochs of the heads.
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Seed of the simulator, the split and the training.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// The tiny random Qwen2.5-VL (Hugging Face layout) embedded in the repository's test fixtures.
fn embedded_base_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vlm/tiny_a")
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(ProgressStyle::with_template("{msg:>22} [{bar:30}] {pos}/{len} {elapsed}").expect("valid template").progress_chars("=> "));
    pb.set_message(what.to_string());
    pb
}

/// Runs the demo and prints its report (also written to `<out>/report.json`).
pub fn run(a: DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    tch::manual_seed(a.seed as i64);
    tch::set_num_threads(1);
    if a.out.exists() {
        std::fs::remove_dir_all(&a.out).with_context(|| format!("clearing {}", a.out.display()))?;
    }
    std::fs::create_dir_all(&a.out)?;
    let (data_root, dataset_dir, base_dir, ckpt_root) =
        (a.out.join("recordings"), a.out.join("dataset"), a.out.join("base_model"), a.out.join("checkpoints"));

    eprintln!("[1/5] recording {} simulated episodes", a.episodes);
    super::record::run(super::record::RecordArgs {
        sim: true,
        episodes: a.episodes,
        seconds: a.seconds,
        out: data_root.clone(),
        seed: a.seed,
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
    })?;

    eprintln!("[2/5] compiling the training set");
    let episodes = super::open_recorded_episodes(&data_root)?;
    let refs: Vec<&dyn crate::dataset::episode::EpisodeSource> = episodes.iter().map(|e| e.as_ref()).collect();
    let mut cc = CompileConfig::default();
    cc.align.sensor_window_s = 0.1;
    cc.align.sensor_samples = 65;
    cc.split.val_fraction = 0.25;
    cc.split.seed = a.seed;
    let compiled = compile(&refs, &cc, &dataset_dir, true)?;
    let ds = Dataset::open(&dataset_dir)?;
    let (train_idx, val_idx) = (ds.split_indices(Split::Train), ds.split_indices(Split::Val));
    if train_idx.is_empty() || val_idx.is_empty() {
        return Err(anyhow!("the compiled set has {} train / {} validation samples; both must be non-empty", train_idx.len(), val_idx.len()));
    }

    eprintln!("[3/5] VL features with the embedded tiny Qwen2.5-VL");
    copy_dir(&embedded_base_model(), &base_dir)?;
    let vl_config = crate::vlm::Config::from_file(&base_dir.join("config.json"))?;
    let vlm = Qwen25VL::load(&base_dir, Kind::Float, Device::Cpu)?;
    let processor = VlProcessor::from_model_dir(&base_dir, &vl_config, None, None)?;
    let pb = bar(ds.len() as u64, "VL features");
    let mut features = Vec::with_capacity(ds.len());
    for i in 0..ds.len() {
        let s = ds.sample(i)?;
        let batch = processor.collate(&[processor.sample(&s.images, &s.instruction)?])?;
        let f = tch::no_grad(|| vlm.forward(&batch, false))?;
        features.push(f.pooled(Pooling::All)?.detach());
        pb.inc(1);
    }
    pb.finish();

    eprintln!("[4/5] training the policy heads (stage 1, frozen VL features)");
    let [t_len, channels] = ds.index.sensor_shape;
    let [horizon, action_dim] = ds.index.action_shape;
    let mut cfg = PolicyConfig { vl_dim: vl_config.text.hidden_size, ..Default::default() };
    cfg.sensor.window = t_len as i64;
    cfg.sensor.in_channels = channels as i64;
    cfg.sensor.conv_channels = vec![64, 64];
    cfg.sensor.d_model = 64;
    cfg.sensor.n_heads = 4;
    cfg.sensor.n_layers = 1;
    cfg.sensor.ff_dim = 128;
    cfg.sensor.out_dim = 64;
    cfg.expert.horizon = horizon as i64;
    cfg.expert.action_dim = action_dim as i64;
    cfg.expert.d_model = 128;
    cfg.expert.n_heads = 4;
    cfg.expert.n_layers = 2;
    cfg.expert.ff_dim = 256;
    let heads = PolicyHeads::new(cfg, NormStats::from_dataset(&ds.stats, 0), Device::Cpu)?;
    let eval = |heads: &PolicyHeads| validation_error(heads, &ds, &val_idx, &features, a.seed);
    let before = eval(&heads)?;
    let groups = heads.param_groups();
    let params: Vec<NamedParam> = groups
        .sensor_encoder
        .into_iter()
        .chain(groups.action_expert)
        .map(|p| NamedParam { name: p.name, group: "heads".into(), tensor: p.tensor })
        .collect();
    let mut opt = AdamW::new(AdamWConfig::default(), vec![GroupConfig { name: "heads".into(), lr: 1e-3, weight_decay: 1e-4 }], params)?;
    let batch_size = 16;
    let steps_per_epoch = train_idx.len().div_ceil(batch_size);
    let schedule = CosineSchedule { warmup_steps: steps_per_epoch as u64, total_steps: (steps_per_epoch * a.epochs) as u64, min_lr_ratio: 0.1 };
    let pb = bar((steps_per_epoch * a.epochs) as u64, "heads training");
    let mut losses = Vec::new();
    let mut step = 0usize;
    for epoch in 0..a.epochs {
        let order = crate::train::state::epoch_order(a.seed, epoch as u64, train_idx.len());
        let mut epoch_loss = 0.0;
        for chunk in order.chunks(batch_size) {
            let idx: Vec<usize> = chunk.iter().map(|&k| train_idx[k]).collect();
            let b = ds.batch(&idx)?;
            let vl = VlFeatures::pooled(Tensor::cat(&idx.iter().map(|&i| features[i].shallow_clone()).collect::<Vec<_>>(), 0));
            let sensor = b.sensor.to_tensor();
            let actions = b.action.to_tensor();
            let seeds: Vec<u64> = idx.iter().map(|&i| crate::train::state::derive_seed(a.seed, &[step as u64, i as u64])).collect();
            opt.zero_grad();
            let loss = heads.loss(&CondInput { vl: &vl, sensor: &sensor, state: None }, &actions, &seeds, true)?;
            loss.backward();
            opt.clip_grad_norm(1.0)?;
            opt.step(schedule.factor(step as u64))?;
            epoch_loss += loss.double_value(&[]) * idx.len() as f64;
            step += 1;
            pb.inc(1);
        }
        losses.push(epoch_loss / train_idx.len() as f64);
    }
    pb.finish();
    let after = eval(&heads)?;

    eprintln!("[5/5] publishing the checkpoint");
    let stage_dir = a.out.join("stage1");
    std::fs::create_dir_all(&stage_dir)?;
    let heads_path = stage_dir.join(HEADS_FILE);
    heads.save(&heads_path, crate::policy::checkpoint::CheckpointStage::Stage1, BTreeMap::new())?;
    let base_model_id = format!("demo-tiny-qwen2_5_vl:{}", hex_sha256(&std::fs::read(base_dir.join("model.safetensors"))?));
    let deploy = DeployInfo {
        format_version: DEPLOY_FORMAT_VERSION,
        base_model_id: base_model_id.clone(),
        adapter: None,
        cameras: ds.index.cameras.iter().map(|c| c.name.clone()).collect(),
        processor: ProcessorSettings { min_pixels: processor.image.min_pixels, max_pixels: processor.image.max_pixels },
        pooling: "all".into(),
        sensor_channels: channels,
        sensor_window: t_len,
        sensor_window_s: cc.align.sensor_window_s,
        state_dim: 0,
        horizon,
        action_dim,
        step_period_s: 1.0 / ds.index.control_hz,
        ddim_steps: 10,
        dtype: "f32".into(),
    };
    let mut metrics = BTreeMap::new();
    metrics.insert("val_action_error".to_string(), mean(&after));
    for (d, e) in after.iter().enumerate() {
        metrics.insert(format!("val_action_error/dim{d}"), *e);
    }
    let published = Publisher::new(&ckpt_root)?.publish(&PublishRequest {
        base_model_id,
        metrics,
        info: json!({"stage": 1, "epoch": a.epochs, "global_step": step}),
        items: vec![
            PublishItem { dest: HEADS_FILE.into(), source: Source::File(heads_path) },
            PublishItem { dest: DEPLOY_FILE.into(), source: Source::Bytes(deploy.to_json().into_bytes()) },
            PublishItem { dest: STATS_FILE.into(), source: Source::File(dataset_dir.join("stats.json")) },
        ],
    })?;
    verify(&published.dir)?;

    let report = json!({
        "episodes": compiled.report.episodes.len(),
        "samples_train": train_idx.len(),
        "samples_val": val_idx.len(),
        "drops": compiled.report.drops,
        "stage0_val_action_error": mean(&before),
        "stage1_val_action_error": mean(&after),
        "stage1_val_action_error_per_dim": after,
        "stage1_train_loss_per_epoch": losses,
        "stage2": "not run: Stage 2 (LoRA on the VL model) and the hot-swapping policy process are not wired into the demo in this build",
        "published_versions": [published.version],
        "checkpoint": published.dir,
        "dataset": dataset_dir,
        "base_model": base_dir,
        "wall_s": t0.elapsed().as_secs_f64(),
    });
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(a.out.join("report.json"), &text)?;
    println!("{text}");
    println!(
        "validation action error (mean abs, physical units): untrained {:.3} -> stage 1 {:.3}; checkpoint {}; report {}",
        mean(&before),
        mean(&after),
        published.dir.display(),
        a.out.join("report.json").display()
    );
    Ok(())
}

/// Mean absolute DDIM action error per action dimension over the validation samples, in
/// physical units (mm, deg), with a fixed sampling seed.
fn validation_error(heads: &PolicyHeads, ds: &Dataset, val: &[usize], features: &[Tensor], seed: u64) -> Result<Vec<f64>> {
    let b = ds.batch(val)?;
    let vl = VlFeatures::pooled(Tensor::cat(&val.iter().map(|&i| features[i].shallow_clone()).collect::<Vec<_>>(), 0));
    let sensor = b.sensor.to_tensor();
    let pred = heads.sample(&CondInput { vl: &vl, sensor: &sensor, state: None }, 10, seed)?;
    let err = (pred - b.action.to_tensor()).abs().mean_dim(&[0i64, 1][..], false, Kind::Double);
    Ok(Vec::<f64>::try_from(err)?)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
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
