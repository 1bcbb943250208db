//! `vla_finetune demo`: the loop on an embedded default, on CPU, without ROS.
//!
//! What runs now (each step is the library's real code): the simulated robot's episodes are
//! recorded to MCAP, compiled into a training set, VL features are computed with the tiny
//! random Qwen2.5-VL shipped with the tests (Hugging Face layout, copied into the output), the
//! policy heads (sensor encoder + diffusion action expert) are trained on them with frozen VL
//! features (`train::heads_job`), validated (DDIM action error in physical units before and
//! after), and the result is published as a verified checkpoint. Stage 2 (LoRA on the VL model)
//! and the parallel policy process with hot-swap are not part of this build yet; the report says so.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;

use crate::dataset::compile::{compile, CompileConfig};
use crate::train::heads_job::{mean, small_heads, HeadsJob};

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

/// Runs the demo and prints its report (also written to `<out>/report.json`).
pub fn run(a: DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    tch::set_num_threads(1);
    if a.out.exists() {
        std::fs::remove_dir_all(&a.out).with_context(|| format!("clearing {}", a.out.display()))?;
    }
    std::fs::create_dir_all(&a.out)?;
    let (data_root, dataset_dir, base_dir) = (a.out.join("recordings"), a.out.join("dataset"), a.out.join("base_model"));

    eprintln!("[1/3] recording {} simulated episodes", a.episodes);
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

    eprintln!("[2/3] compiling the training set");
    let episodes = super::open_recorded_episodes(&data_root)?;
    let refs: Vec<&dyn crate::dataset::episode::EpisodeSource> = episodes.iter().map(|e| e.as_ref()).collect();
    let mut cc = CompileConfig::default();
    cc.align.sensor_window_s = 0.1;
    cc.align.sensor_samples = 65;
    cc.split.val_fraction = 0.25;
    cc.split.seed = a.seed;
    let compiled = compile(&refs, &cc, &dataset_dir, true)?;

    eprintln!("[3/3] VL features with the embedded tiny Qwen2.5-VL, policy heads training, publication");
    copy_dir(&embedded_base_model(), &base_dir)?;
    let job = HeadsJob {
        dataset: dataset_dir.clone(),
        base_model: base_dir.clone(),
        checkpoints: a.out.join("checkpoints"),
        work_dir: a.out.join("heads_job"),
        epochs: a.epochs,
        batch_size: 16,
        lr: 1e-3,
        seed: a.seed,
        heads: small_heads(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let hub = crate::train::progress::ProgressHub::new(64);
    let ctx = crate::train::controller::JobContext { job_id: "demo".into(), cancel: Default::default(), progress: hub.clone() };
    let mut events = hub.subscribe();
    let printer = std::thread::spawn(move || {
        let bar = crate::train::progress::BarRenderer::stderr();
        while rx.try_recv().is_err() {
            match events.try_recv() {
                Ok(ev) => bar.update(&ev),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    });
    let result = crate::train::heads_job::run(&job, Some(&ctx));
    let _ = tx.send(());
    let _ = printer.join();
    let r = result?;
    let published = r.published.expect("not cancelled");

    let report = json!({
        "episodes": compiled.report.episodes.len(),
        "samples_train": r.samples.0,
        "samples_val": r.samples.1,
        "drops": compiled.report.drops,
        "untrained_val_action_error": mean(&r.val_error_before),
        "stage1_val_action_error": mean(&r.val_error_after),
        "stage1_val_action_error_per_dim": r.val_error_after,
        "stage1_train_loss_per_epoch": r.train_loss,
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
        "validation action error (mean abs, physical units): untrained {:.3} -> trained heads {:.3}; checkpoint {}; report {}",
        mean(&r.val_error_before),
        mean(&r.val_error_after),
        published.dir.display(),
        a.out.join("report.json").display()
    );
    Ok(())
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
