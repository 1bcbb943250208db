//! `vla_finetune dataset compile|info`: build a training dataset from recorded episodes and
//! describe one.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::dataset::compile::{compile_lazily, CompileConfig, CompileReport};
use crate::dataset::episode::{Damage, LazyEpisode};
use crate::dataset::selection::{set_discarded, EpisodeSelection, ANY_OUTCOME};
use crate::dataset::stats::{DatasetStats, FieldStats};
use crate::dataset::store::{read_json, DatasetIndex, Split, REPORT_FILE, STATS_FILE};

/// Arguments of `dataset`.
#[derive(Args, Debug)]
pub struct DatasetArgs {
    #[command(subcommand)]
    pub command: DatasetCommand,
}

/// Dataset jobs.
#[derive(Subcommand, Debug)]
pub enum DatasetCommand {
    /// Align recorded episodes into a training dataset (shards, index, stats, report).
    Compile(CompileArgs),
    /// Print episode/sample counts, drops by reason, per-stream rates and skew, statistics.
    Info(InfoArgs),
    /// Leave a recorded episode out of training (or take that back); its files stay.
    Discard(DiscardArgs),
    /// Write a compiled dataset (or recorded episodes) as a LeRobot v3.0 dataset.
    ExportLerobot(super::lerobot::ExportLeRobotArgs),
}

/// Arguments of `dataset compile`.
#[derive(Args, Debug)]
pub struct CompileArgs {
    /// Recorded episode folders, or folders holding them.
    #[arg(long, required = true, num_args = 1..)]
    pub episodes: Vec<PathBuf>,
    /// Compile config (YAML, see config/compile.yaml); defaults when left out.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output dataset folder (must not exist unless --overwrite).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing dataset folder.
    #[arg(long)]
    pub overwrite: bool,
    /// Exit 0 even when episodes were left out or damaged (the dataset is written either way;
    /// without this the exit status is 3 then).
    #[arg(long)]
    pub allow_losses: bool,
    /// Compile only episodes with this outcome (repeatable; `any`: every outcome). Discarded
    /// episodes are always left out. The trainer service's default is `success`.
    #[arg(long = "outcome", default_value = ANY_OUTCOME)]
    pub outcomes: Vec<String>,
    /// Compile only episodes of this task (repeatable; default: every task).
    #[arg(long = "task")]
    pub tasks: Vec<String>,
}

/// Arguments of `dataset discard`.
#[derive(Args, Debug)]
pub struct DiscardArgs {
    /// Episodes root (the folder holding `episodes/`).
    #[arg(long)]
    pub root: PathBuf,
    /// Episode id (its folder name under `episodes/`).
    #[arg(long)]
    pub id: String,
    /// Why (kept in episode.json).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Take an earlier discard back.
    #[arg(long)]
    pub restore: bool,
}

/// Exit status of a compile that wrote a dataset but left episodes out or read damaged ones.
pub const EXIT_LOSSES: u8 = 3;

/// Arguments of `dataset info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Dataset folder.
    pub dir: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The recorded episodes found at a path given to `--episodes`, each opened while compiled.
pub type EpisodeOpener<'a> = dyn Fn(&Path) -> anyhow::Result<Vec<LazyEpisode<'static>>> + 'a;

/// Runs a `dataset` subcommand; `open` turns each `--episodes` path into episodes.
pub fn run(args: DatasetArgs, open: &EpisodeOpener<'_>) -> anyhow::Result<()> {
    match args.command {
        DatasetCommand::Compile(a) => run_compile(&a, open),
        DatasetCommand::Info(a) => {
            let text = info(&a.dir, a.json)?;
            println!("{text}");
            Ok(())
        }
        DatasetCommand::ExportLerobot(a) => super::lerobot::run_export(&a, open),
        DatasetCommand::Discard(a) => {
            set_discarded(&a.root, &a.id, &a.reason, a.restore)?;
            println!("{}: episode `{}` {}", a.root.display(), a.id, if a.restore { "restored" } else { "discarded" });
            Ok(())
        }
    }
}

/// `dataset compile`: prints a one-line summary and every episode left out.
pub fn run_compile(a: &CompileArgs, open: &EpisodeOpener<'_>) -> anyhow::Result<()> {
    let cfg = match &a.config {
        Some(p) => CompileConfig::from_yaml_file(p)?,
        None => CompileConfig::default(),
    };
    let mut eps: Vec<LazyEpisode<'static>> = Vec::new();
    for dir in &a.episodes {
        eps.extend(open(dir).with_context(|| format!("opening episodes in {}", dir.display()))?);
    }
    let sel = EpisodeSelection { outcomes: a.outcomes.clone(), tasks: a.tasks.clone() };
    eps.retain(|e| match (&e.unreadable, sel.excludes(&e.meta)) {
        (None, Some(why)) => {
            println!("episode `{}` not compiled: {why}", e.meta.id);
            false
        }
        _ => true,
    });
    let out = compile_lazily(&eps, &cfg, &a.out, a.overwrite)?;
    let r = &out.report;
    println!(
        "{}: {} episodes, {} samples ({} train, {} val) of {} sample times, {} dropped",
        a.out.display(),
        r.episodes.len(),
        r.samples,
        r.train_samples,
        r.val_samples,
        r.candidates,
        r.drops.values().sum::<u64>()
    );
    for p in &r.removed_leftovers {
        println!("removed {} (left by a compile that was killed)", p.display());
    }
    for f in &r.failed_episodes {
        eprintln!("warning: episode `{}` left out: {}", f.id, f.error);
    }
    let damaged: Vec<_> = r.episodes.iter().filter_map(|e| e.damage.as_ref().map(|d| (&e.id, d))).collect();
    for (id, d) in &damaged {
        eprintln!("warning: episode `{id}` is damaged: {}", describe_damage(d));
    }
    if (r.failed_episodes.is_empty() && damaged.is_empty()) || a.allow_losses {
        return Ok(());
    }
    Err(super::Exit {
        code: EXIT_LOSSES,
        message: format!(
            "{}: written with losses: {} episode(s) left out, {} damaged (see report.json; --allow-losses exits 0)",
            a.out.display(),
            r.failed_episodes.len(),
            damaged.len()
        ),
    }
    .into())
}

/// One line: what a damaged recording kept and lost, and why.
pub fn describe_damage(d: &Damage) -> String {
    format!(
        "{} messages from {} chunks read, {} of {} bytes lost ({} damaged records): {}",
        d.messages_read,
        d.chunks_read,
        d.bytes_lost,
        d.file_bytes,
        d.records_lost,
        d.reasons.join("; ")
    )
}

/// The `dataset info` text (or JSON with `json`).
pub fn info(dir: &Path, json_out: bool) -> anyhow::Result<String> {
    let index = DatasetIndex::load(dir)?;
    let stats: DatasetStats = read_json(&dir.join(STATS_FILE))?;
    let report: CompileReport = read_json(&dir.join(REPORT_FILE))?;
    let ds = CompiledInfo { dir, index, stats, report };
    if json_out {
        return Ok(serde_json::to_string_pretty(&ds.json())?);
    }
    let lines: Vec<String> = ds.overview().into_iter().chain(ds.streams()).chain(ds.statistics()).collect();
    Ok(lines.join("\n").trim_end().to_string())
}

/// A compiled dataset's files, as `dataset info` describes them.
struct CompiledInfo<'a> {
    dir: &'a Path,
    index: DatasetIndex,
    stats: DatasetStats,
    report: CompileReport,
}

impl CompiledInfo<'_> {
    /// Episodes of split `sp`.
    fn episodes(&self, sp: Split) -> usize {
        self.index.episodes.iter().filter(|e| e.split == sp).count()
    }

    /// Samples of split `sp`.
    fn samples(&self, sp: Split) -> usize {
        self.index.samples.iter().filter(|s| s.split == sp).count()
    }

    /// The damaged recordings compiled: id and damage.
    fn damaged(&self) -> Vec<(&String, &Damage)> {
        self.report.episodes.iter().filter_map(|e| e.damage.as_ref().map(|d| (&e.id, d))).collect()
    }

    /// The `--json` form.
    fn json(&self) -> serde_json::Value {
        let (index, report) = (&self.index, &self.report);
        json!({
            "dir": self.dir,
            "episodes": { "total": index.episodes.len(), "train": self.episodes(Split::Train), "val": self.episodes(Split::Val), "failed": report.failed_episodes,
                "damaged": self.damaged().iter().map(|(id, d)| json!({ "id": id, "damage": d })).collect::<Vec<_>>() },
            "samples": { "total": index.samples.len(), "train": self.samples(Split::Train), "val": self.samples(Split::Val), "candidates": report.candidates },
            "drops": report.drops,
            "streams": report.streams,
            "camera_spread": report.camera_spread,
            "cameras": index.cameras,
            "sensor_shape": index.sensor_shape,
            "state_names": index.state_names,
            "action_shape": index.action_shape,
            "control_hz": index.control_hz,
            "shards": index.shards.len(),
            "stats": self.stats,
        })
    }

    /// Episodes (left out, damaged), samples, shapes and drops by reason.
    fn overview(&self) -> Vec<String> {
        let (index, report) = (&self.index, &self.report);
        let mut out = vec![format!("dataset {}", self.dir.display())];
        out.push(format!(
            "episodes: {} ({} train, {} val), {} left out",
            index.episodes.len(),
            self.episodes(Split::Train),
            self.episodes(Split::Val),
            report.failed_episodes.len()
        ));
        out.extend(report.failed_episodes.iter().map(|f| format!("  left out `{}`: {}", f.id, f.error)));
        let damaged = self.damaged();
        out.push(format!("damaged recordings (compiled from what could be read): {}", damaged.len()));
        out.extend(damaged.iter().map(|(id, d)| format!("  damaged `{id}`: {}", describe_damage(d))));
        out.push(format!(
            "samples: {} ({} train, {} val) of {} sample times at {} Hz, {} shards",
            index.samples.len(),
            self.samples(Split::Train),
            self.samples(Split::Val),
            report.candidates,
            index.control_hz,
            index.shards.len()
        ));
        out.push(format!(
            "shapes: cameras {}, sensor {:?}, state {:?}, action {:?}",
            index.cameras.iter().map(|c| format!("{} {}x{}", c.name, c.width, c.height)).collect::<Vec<_>>().join(", "),
            index.sensor_shape,
            index.state_names,
            index.action_shape
        ));
        out.push("drops by reason:".into());
        if report.drops.is_empty() {
            out.push("  none".into());
        }
        out.extend(report.drops.iter().map(|(k, v)| format!("  {k}: {v}")));
        out
    }

    /// Per-stream rates, gaps and ages, and the camera spread.
    fn streams(&self) -> Vec<String> {
        let mut out = vec!["streams (rate min-max Hz, max gap, out-of-order, age of data used mean/max):".to_string()];
        for (name, st) in &self.report.streams {
            out.push(format!(
                "  {name} [{}]: {} msgs, {:.2}-{:.2} Hz, gap {:.1} ms, {} out-of-order, age {:.1}/{:.1} ms, latency max {:.1} ms",
                st.kind,
                st.messages,
                st.rate_hz_min,
                st.rate_hz_max,
                st.max_gap_s * 1e3,
                st.non_monotonic,
                st.skew.mean_s * 1e3,
                st.skew.max_s * 1e3,
                st.max_latency_s * 1e3
            ));
        }
        let cs = &self.report.camera_spread;
        out.push(format!(
            "camera spread (newest minus oldest frame used together): mean {:.1} ms, max {:.1} ms",
            cs.mean_s * 1e3,
            cs.max_s * 1e3
        ));
        out
    }

    /// The training split's statistics: the sensor summarized, state and action per dimension.
    fn statistics(&self) -> Vec<String> {
        let stats = &self.stats;
        let mut out = vec![format!("stats (training split, {} state rows):", stats.state.count)];
        out.push(format!("  sensor: {}", summarize(&stats.sensor)));
        for (name, f) in [("state", &stats.state), ("action", &stats.action)] {
            out.push(format!("  {name}:"));
            for d in 0..f.dims() {
                let label = if name == "state" {
                    self.index.state_names.get(d).cloned().unwrap_or_default()
                } else {
                    format!("a{d}")
                };
                out.push(format!(
                    "    {label:>8}: mean {:.4} std {:.4} min {:.4} max {:.4} q01 {:.4} q99 {:.4}",
                    f.mean[d], f.std[d], f.min[d], f.max[d], f.q01[d], f.q99[d]
                ));
            }
        }
        out
    }
}

fn summarize(f: &FieldStats) -> String {
    if f.dims() == 0 {
        return "no channels".into();
    }
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.4}..{hi:.4}")
    };
    format!(
        "{} channels; over channels: mean {}, std {}, min {}, max {}",
        f.dims(),
        range(&f.mean),
        range(&f.std),
        range(&f.min),
        range(&f.max)
    )
}
