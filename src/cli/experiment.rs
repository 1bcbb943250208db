//! `vla_finetune experiment cache-modes`: does caching VL features lose quality, and what does
//! the refresh interval cost? For each seed, the demo's data are recorded (validation episodes
//! from a simulator seed the training never saw), stage 1 and the oracle floor are trained once,
//! then Stage 2 runs from that same stage-1 checkpoint in each cache mode: `off`, `vision`,
//! `features` with a refresh every 1 and every 5 cached epochs, and `features` adaptive (every 5,
//! or sooner when the drift measured at the last refresh reaches `--drift-threshold`), and the
//! control `heads-only` (the VL model not adapted: what training the heads longer gives). Written to
//! `--out`: `results.json` (every run and the per-mode summary), `table.md` (the summary as a
//! Markdown table) and `cache_modes.png` (held-out error and wall time per seed and mode).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;

use super::demo::{prepare, stage2_config, DataPlan, SimDataArgs, Stage2Plan};
use crate::train::plot::{write_panels, Curve, PanelSpec};
use crate::train::stage2::{self, Stage2Job};
use crate::vlm::Pooling;

/// Arguments of `experiment`.
#[derive(clap::Args, Debug)]
pub struct ExperimentArgs {
    #[command(subcommand)]
    pub command: ExperimentCommand,
}

/// The experiments.
#[derive(clap::Subcommand, Debug)]
pub enum ExperimentCommand {
    /// Stage 2 in every cache mode from the same stage-1 checkpoint, over several seeds.
    CacheModes(CacheModesArgs),
}

/// Arguments of `experiment cache-modes`.
#[derive(clap::Args, Debug)]
pub struct CacheModesArgs {
    /// Output folder (cleared first).
    #[arg(long, default_value = "out/experiment-cache-modes")]
    pub out: PathBuf,
    /// Seeds: each records its own episodes and trains its own stage 1.
    #[arg(long, value_delimiter = ',', default_values_t = [7u64, 8, 9])]
    pub seeds: Vec<u64>,
    /// The simulated data recorded per seed.
    #[command(flatten)]
    pub data: SimDataArgs,
    /// Stage-1 (and oracle) epochs.
    #[arg(long, default_value_t = 30)]
    pub stage1_epochs: u64,
    /// Stage 2 epochs per mode.
    #[arg(long, default_value_t = 10)]
    pub stage2_epochs: u64,
    /// Which tokens the VL feature averages: all, image, text or last.
    #[arg(long, default_value = "all", value_parser = super::parse_pooling)]
    pub vl_pooling: Pooling,
    /// Base VL model (Hugging Face Qwen2.5-VL folder). Default: the embedded one.
    #[arg(long)]
    pub base_model: Option<PathBuf>,
    /// Drift (rel_l2_mean) at which the adaptive mode refreshes early.
    #[arg(long, default_value_t = 0.05)]
    pub drift_threshold: f64,
    /// Only these modes (names as in the table: off, vision, features/1, features/5,
    /// features/adaptive, heads-only).
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Where Stage 2 runs (cpu, cuda, cuda:N).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// One cache mode of the experiment.
#[derive(Debug, Clone)]
struct Mode {
    name: &'static str,
    cache_mode: &'static str,
    refresh_every: u64,
    drift: bool,
    /// Whether the LoRA trains (false: the control, heads only).
    lora: bool,
}

const MODES: [Mode; 6] = [
    Mode { name: "off", cache_mode: "off", refresh_every: 5, drift: false, lora: true },
    Mode { name: "vision", cache_mode: "vision", refresh_every: 5, drift: false, lora: true },
    Mode { name: "features/1", cache_mode: "features", refresh_every: 1, drift: false, lora: true },
    Mode { name: "features/5", cache_mode: "features", refresh_every: 5, drift: false, lora: true },
    Mode { name: "features/adaptive", cache_mode: "features", refresh_every: 5, drift: true, lora: true },
    // The control: Stage 2 with the VL model left as it is (LoRA learning rate 0), so the table
    // shows what adapting the VL model adds over training the heads longer.
    Mode { name: "heads-only", cache_mode: "vision", refresh_every: 5, drift: false, lora: false },
];

/// One Stage 2 run.
#[derive(Debug, Clone, Serialize)]
struct RunRow {
    seed: u64,
    mode: String,
    stage1_val_action_error: f64,
    oracle_val_action_error: f64,
    /// Stage 1 and the oracle with each validation sample's conditioning taken from another
    /// sample (`HeadsResult::val_action_error_conditioning_swapped`).
    stage1_swapped_val_action_error: Option<f64>,
    oracle_swapped_val_action_error: Option<f64>,
    val_action_error: f64,
    best_val_action_error: Option<f64>,
    wall_s: f64,
    samples_per_s: f64,
    refreshes: u64,
    drift: Option<f64>,
}

/// A mode over the seeds.
#[derive(Debug, Clone, Serialize)]
struct ModeSummary {
    mode: String,
    seeds: usize,
    val_action_error_mean: f64,
    val_action_error_std: f64,
    val_action_error_min: f64,
    val_action_error_max: f64,
    gain_over_stage1_mean: f64,
    wall_s_mean: f64,
    samples_per_s_mean: f64,
    refreshes_mean: f64,
    drift_mean: Option<f64>,
}

/// Runs `experiment`.
pub fn run(a: ExperimentArgs) -> Result<()> {
    match a.command {
        ExperimentCommand::CacheModes(a) => cache_modes(a),
    }
}

fn cache_modes(a: CacheModesArgs) -> Result<()> {
    let modes: Vec<Mode> = if a.modes.is_empty() {
        MODES.to_vec()
    } else {
        a.modes
            .iter()
            .map(|m| MODES.iter().find(|x| x.name == m).cloned().with_context(|| format!("--modes: unknown mode `{m}` (known: off, vision, features/1, features/5, features/adaptive, heads-only)")))
            .collect::<Result<_>>()?
    };
    anyhow::ensure!(!a.seeds.is_empty(), "--seeds: at least one seed");
    crate::device::parse_available(&a.device).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    tch::set_num_threads(1);
    if a.out.exists() {
        std::fs::remove_dir_all(&a.out).with_context(|| format!("clearing {}", a.out.display()))?;
    }
    std::fs::create_dir_all(&a.out)?;
    let out = std::fs::canonicalize(&a.out)?;
    let t0 = Instant::now();
    let mut rows = Vec::new();
    for &seed in &a.seeds {
        let dir = out.join(format!("seed{seed}"));
        let data = DataPlan {
            seed,
            sim: a.data,
            stage1_epochs: a.stage1_epochs,
            vl_pooling: a.vl_pooling,
            base_model: a.base_model.clone(),
        };
        let p = prepare(&dir, &data, &dir.join("checkpoints"))?;
        let oracle = p.oracle.val_action_error_after.context("the oracle validated no epoch")?;
        for m in &modes {
            eprintln!("seed {seed}: Stage 2, cache mode {}", m.name);
            let work = dir.join(m.name.replace('/', "-"));
            let plan = Stage2Plan {
                epochs: a.stage2_epochs,
                seed,
                device: a.device.clone(),
                cache_mode: m.cache_mode.into(),
                refresh_every: m.refresh_every,
                drift_threshold: m.drift.then_some(a.drift_threshold),
                lr_vl_lora: if m.lora { super::demo::LR_VL_LORA } else { 0.0 },
            };
            let config = stage2_config(
                &plan,
                &work,
                &p.dataset,
                &p.base_model,
                &p.stage1_published.dir,
                &work.join("checkpoints"),
            )?;
            let t = Instant::now();
            let r = super::with_progress_bar("experiment", false, |ctx| {
                Ok(stage2::run(&Stage2Job { config, resume: false, group: None }, ctx, &mut |_| {})?)
            })?;
            let wall_s = t.elapsed().as_secs_f64();
            rows.push(RunRow {
                seed,
                mode: m.name.into(),
                stage1_val_action_error: r.val_action_error_before,
                oracle_val_action_error: oracle,
                stage1_swapped_val_action_error: p.stage1.val_action_error_conditioning_swapped,
                oracle_swapped_val_action_error: p.oracle.val_action_error_conditioning_swapped,
                val_action_error: r.val_action_error.context("Stage 2 validated no epoch")?,
                best_val_action_error: r.run.best,
                wall_s,
                samples_per_s: r.run.counters.samples_seen as f64 / wall_s,
                refreshes: r.cache_refreshes,
                drift: r.last_drift,
            });
        }
    }
    let summary: Vec<ModeSummary> = modes.iter().map(|m| summarize(m.name, &rows)).collect();
    let results = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "settings": { "seeds": a.seeds, "episodes": a.data.episodes, "val_episodes": a.data.val_episodes, "seconds": a.data.seconds,
                      "stage1_epochs": a.stage1_epochs, "stage2_epochs": a.stage2_epochs, "drift_threshold": a.drift_threshold, "device": a.device },
        "error_unit": "mean absolute DDIM action error on the unseen-seed validation episodes, in training-set stds",
        "runs": rows,
        "summary": summary,
        "wall_s": t0.elapsed().as_secs_f64(),
    });
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&results)?)?;
    let table = markdown(&summary, &rows);
    std::fs::write(out.join("table.md"), &table)?;
    plot(&out.join("cache_modes.png"), &modes, &rows)?;
    println!("{table}\nresults {}; plot {}", out.join("results.json").display(), out.join("cache_modes.png").display());
    Ok(())
}

fn summarize(mode: &str, rows: &[RunRow]) -> ModeSummary {
    let r: Vec<&RunRow> = rows.iter().filter(|r| r.mode == mode).collect();
    let n = r.len().max(1) as f64;
    let mean = |f: &dyn Fn(&RunRow) -> f64| r.iter().map(|x| f(x)).sum::<f64>() / n;
    let err = mean(&|x| x.val_action_error);
    let var = r.iter().map(|x| (x.val_action_error - err).powi(2)).sum::<f64>() / (r.len().max(2) - 1) as f64;
    let drifts: Vec<f64> = r.iter().filter_map(|x| x.drift).collect();
    ModeSummary {
        mode: mode.into(),
        seeds: r.len(),
        val_action_error_mean: err,
        val_action_error_std: var.sqrt(),
        val_action_error_min: r.iter().map(|x| x.val_action_error).fold(f64::INFINITY, f64::min),
        val_action_error_max: r.iter().map(|x| x.val_action_error).fold(f64::NEG_INFINITY, f64::max),
        gain_over_stage1_mean: mean(&|x| 1.0 - x.val_action_error / x.stage1_val_action_error),
        wall_s_mean: mean(&|x| x.wall_s),
        samples_per_s_mean: mean(&|x| x.samples_per_s),
        refreshes_mean: mean(&|x| x.refreshes as f64),
        drift_mean: (!drifts.is_empty()).then(|| drifts.iter().sum::<f64>() / drifts.len() as f64),
    }
}

/// The summary as a Markdown table, with stage 1 and the oracle (per seed, they do not depend on
/// the mode) below it.
fn markdown(summary: &[ModeSummary], rows: &[RunRow]) -> String {
    let mut t = String::from(
        "| cache mode | held-out error (stds), mean ± std over seeds [min, max] | gain over stage 1 | wall s | samples/s | refreshes | drift (rel L2) |\n|---|---|---|---|---|---|---|\n",
    );
    for s in summary {
        t += &format!(
            "| {} | {:.3} ± {:.3} [{:.3}, {:.3}] | {:+.1} % | {:.1} | {:.1} | {:.1} | {} |\n",
            s.mode,
            s.val_action_error_mean,
            s.val_action_error_std,
            s.val_action_error_min,
            s.val_action_error_max,
            100.0 * s.gain_over_stage1_mean,
            s.wall_s_mean,
            s.samples_per_s_mean,
            s.refreshes_mean,
            s.drift_mean.map_or("-".into(), |d| format!("{d:.4}"))
        );
    }
    let mut seeds: Vec<u64> = rows.iter().map(|r| r.seed).collect();
    seeds.dedup();
    t += "\n| seed | stage 1 (stds) | stage 1, VL features of another sample | oracle floor (stds) | oracle, truth of another sample |\n|---|---|---|---|---|\n";
    let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
    for s in seeds {
        if let Some(r) = rows.iter().find(|r| r.seed == s) {
            t += &format!(
                "| {s} | {:.3} | {} | {:.3} | {} |\n",
                r.stage1_val_action_error,
                opt(r.stage1_swapped_val_action_error),
                r.oracle_val_action_error,
                opt(r.oracle_swapped_val_action_error)
            );
        }
    }
    t
}

/// Held-out error (left) and Stage 2 wall time (right) per seed, one curve per mode; stage 1 and
/// the oracle floor on the left as references.
fn plot(path: &Path, modes: &[Mode], rows: &[RunRow]) -> Result<()> {
    let mut seeds: Vec<u64> = rows.iter().map(|r| r.seed).collect();
    seeds.dedup();
    let per_seed = |f: &dyn Fn(&RunRow) -> f64, mode: Option<&str>| -> Vec<(f64, f64)> {
        seeds
            .iter()
            .filter_map(|&s| {
                rows.iter().find(|r| r.seed == s && mode.is_none_or(|m| r.mode == m)).map(|r| (s as f64, f(r)))
            })
            .collect()
    };
    let mut errors: Vec<Curve> = modes
        .iter()
        .map(|m| Curve { name: m.name.into(), points: per_seed(&|r| r.val_action_error, Some(m.name)) })
        .collect();
    errors.push(Curve { name: "stage 1".into(), points: per_seed(&|r| r.stage1_val_action_error, None) });
    errors.push(Curve { name: "oracle floor".into(), points: per_seed(&|r| r.oracle_val_action_error, None) });
    let walls: Vec<Curve> =
        modes.iter().map(|m| Curve { name: m.name.into(), points: per_seed(&|r| r.wall_s, Some(m.name)) }).collect();
    let panels = [
        PanelSpec {
            title: "Held-out action error",
            x_name: "seed",
            y_name: "error (training-set stds)",
            curves: &errors,
        },
        PanelSpec { title: "Stage 2 wall time", x_name: "seed", y_name: "seconds", curves: &walls },
    ];
    write_panels(path, &panels, 1280, 480).with_context(|| format!("plotting {}", path.display()))
}
