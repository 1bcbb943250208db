//! `vla_finetune dataset export-lerobot` and `vla_finetune import-lerobot`: LeRobot v3.0
//! datasets both ways (the work is in [`crate::dataset::lerobot`]).

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use crate::dataset::compile::{compile_lazily, CompileConfig};
use crate::dataset::lerobot::export::{export, ExportOptions, PictureMode};
use crate::dataset::lerobot::import::{import, ImportMapping, ImportOptions};
use crate::dataset::store::INDEX_FILE;

/// Arguments of `dataset export-lerobot`.
#[derive(clap::Args, Debug)]
pub struct ExportLeRobotArgs {
    /// A compiled dataset, or recorded episodes (an episode folder or a dataset root), which are
    /// compiled first (at --fps, with --config).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Output folder (a new LeRobot v3.0 dataset; must not exist unless --overwrite).
    #[arg(long)]
    pub out: PathBuf,
    /// Store camera frames as JPEG images inside the parquet files (the default).
    #[arg(long, conflicts_with = "video")]
    pub images: bool,
    /// Store camera frames as mp4 videos (AV1 with libsvtav1, else H.264; needs ffmpeg).
    #[arg(long)]
    pub video: bool,
    /// The ffmpeg program for --video (default: `ffmpeg` on PATH).
    #[arg(long)]
    pub ffmpeg: Option<PathBuf>,
    /// Frame rate when exporting recorded episodes (the compile's control rate).
    #[arg(long)]
    pub fps: Option<u32>,
    /// Compile config for recorded episodes (see config/compile.yaml); defaults when left out.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `robot_type` written to meta/info.json.
    #[arg(long)]
    pub robot_type: Option<String>,
    /// Files per chunk folder (LeRobot's chunks_size).
    #[arg(long, default_value_t = 1000)]
    pub chunks_size: usize,
    /// A data file is closed before an episode would take it to this many MB (LeRobot's
    /// data_files_size_in_mb).
    #[arg(long, default_value_t = 100)]
    pub data_files_size_mb: usize,
    /// Replace an existing output folder.
    #[arg(long)]
    pub overwrite: bool,
}

/// Arguments of `import-lerobot`.
#[derive(clap::Args, Debug)]
pub struct ImportLeRobotArgs {
    /// A local LeRobot v3.0 dataset folder (with meta/info.json).
    pub dir: PathBuf,
    /// Output compiled dataset folder (must not exist unless --overwrite).
    #[arg(long)]
    pub out: PathBuf,
    /// Feature mapping (YAML, see config/lerobot_import.yaml); left out: the mapping of a
    /// dataset `export-lerobot` wrote.
    #[arg(long)]
    pub mapping: Option<PathBuf>,
    /// The ffmpeg program, for video features (default: `ffmpeg` on PATH).
    #[arg(long)]
    pub ffmpeg: Option<PathBuf>,
    /// Replace an existing output folder.
    #[arg(long)]
    pub overwrite: bool,
}

fn bar(what: &str) -> ProgressBar {
    let b = ProgressBar::new(0);
    let style = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} frames ({per_sec}, eta {eta})")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    b.set_style(style.progress_chars("=> "));
    b.set_message(what.to_string());
    b
}

/// Runs `dataset export-lerobot`; `open` turns an episodes path into episodes.
pub fn run_export(a: &ExportLeRobotArgs, open: &super::dataset::EpisodeOpener<'_>) -> anyhow::Result<()> {
    let opts = ExportOptions {
        overwrite: a.overwrite,
        pictures: if a.video { PictureMode::Video } else { PictureMode::Images },
        robot_type: a.robot_type.clone(),
        ffmpeg: a.ffmpeg.clone(),
        chunks_size: a.chunks_size,
        data_files_size_in_mb: a.data_files_size_mb,
    };
    let compiled = if a.dataset.join(INDEX_FILE).is_file() { None } else { Some(compile_episodes(a, open)?) };
    let src = compiled.as_deref().unwrap_or(&a.dataset);
    let b = bar("export");
    let r = export(src, &a.out, &opts, &mut |done, total| {
        b.set_length(total as u64);
        b.set_position(done as u64);
    });
    b.finish_and_clear();
    if let Some(dir) = &compiled {
        let _ = std::fs::remove_dir_all(dir);
    }
    let r = r.with_context(|| format!("exporting {} to LeRobot v3.0", a.dataset.display()))?;
    println!(
        "{}: LeRobot v3.0 dataset, {} episodes, {} frames, {} data file(s)",
        a.out.display(),
        r.episodes,
        r.frames,
        r.data_files
    );
    Ok(())
}

/// Compiles recorded episodes into a folder beside the output (removed after the export).
fn compile_episodes(a: &ExportLeRobotArgs, open: &super::dataset::EpisodeOpener<'_>) -> anyhow::Result<PathBuf> {
    let mut cfg = match &a.config {
        Some(p) => CompileConfig::from_yaml_file(p)?,
        None => CompileConfig::default(),
    };
    if let Some(fps) = a.fps {
        cfg.align.control_hz = fps as f64;
    }
    let eps = open(&a.dataset).with_context(|| format!("opening episodes in {}", a.dataset.display()))?;
    let name = a.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "lerobot".into());
    let dir = a.out.with_file_name(format!(".{name}.compiled-{}", std::process::id()));
    let out = compile_lazily(&eps, &cfg, &dir, true)?;
    for f in &out.report.failed_episodes {
        eprintln!("warning: episode `{}` left out: {}", f.id, f.error);
    }
    Ok(dir)
}

/// Runs `import-lerobot`.
pub fn run_import(a: &ImportLeRobotArgs) -> anyhow::Result<()> {
    let mapping = match &a.mapping {
        Some(p) => ImportMapping::from_yaml_file(p)?,
        None => ImportMapping::default(),
    };
    let b = bar("import");
    let opts = ImportOptions { overwrite: a.overwrite, ffmpeg: a.ffmpeg.clone() };
    let r = import(&a.dir, &mapping, &a.out, &opts, &mut |done, total| {
        b.set_length(total as u64);
        b.set_position(done as u64);
    });
    b.finish_and_clear();
    let r = r.with_context(|| format!("importing the LeRobot dataset {}", a.dir.display()))?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}
