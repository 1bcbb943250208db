//! `vla_finetune train --config FILE [--set key=value ...]`: the Stage 2 job (LoRA on the VL
//! model + sensor encoder + action expert, from a stage-1 checkpoint) with a progress bar, a
//! JSON-lines progress log (`progress.log_file`), the curves plot (`progress.plot_file`, after
//! each epoch) and the result printed as JSON. Ctrl-C cancels at the next optimizer step and
//! leaves a resumable state (`--resume` continues it).

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::train::config::TrainConfig;
use crate::train::controller::JobContext;
use crate::train::guard;
use crate::train::progress::{spawn_sink, BarRenderer, JsonlLog, Phase, ProgressHub, Throttle};
use crate::train::stage2::{self, Stage2Job};

/// Arguments of `train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Configuration file (config/train.yaml format).
    #[arg(long)]
    pub config: PathBuf,
    /// Override one value, `section.key=value` (YAML value), e.g. `cache.mode=off`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from the training state in `checkpoint.state_dir` when there is one.
    #[arg(long, conflicts_with = "fresh")]
    pub resume: bool,
    /// Start over, replacing the training state in `checkpoint.state_dir` (without this or
    /// --resume, an existing state is refused).
    #[arg(long)]
    pub fresh: bool,
    /// No progress bar (the log is still written).
    #[arg(long)]
    pub quiet: bool,
}

/// Runs the job and prints its result.
pub fn run(a: TrainArgs) -> Result<()> {
    let config = TrainConfig::load(&a.config, &a.set)?;
    crate::device::parse_available(&config.run.device).map_err(|e| anyhow::anyhow!("run.device: {e}"))?;
    let state_dir = &config.checkpoint.state_dir;
    guard::check_start(state_dir, a.resume, a.fresh)?;
    let lock = guard::StateLock::acquire(state_dir)?;
    for p in &lock.removed {
        eprintln!("removed {} (left by an interrupted run)", p.display());
    }
    if let Some(parent) = config.progress.log_file.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let log = JsonlLog::open(&config.progress.log_file)?;
    let hub = ProgressHub::new(256);
    let job_id = "train".to_string();
    let bar = (!a.quiet).then(|| (BarRenderer::stderr(), Throttle::new(config.progress.max_hz)));
    let sink = spawn_sink(hub.subscribe(), job_id.clone(), Some(log), bar);
    let ctx = JobContext { job_id: job_id.clone(), cancel: Default::default(), progress: hub.clone() };
    let cancel = ctx.cancel.clone();
    let _ = super::ctrlc_cancel(move || cancel.cancel());
    let job = Stage2Job { config, resume: a.resume };
    let result = stage2::run(&job, &ctx, &mut |p| eprintln!("published {} ({})", p.version, p.dir.display()));
    let phase = match &result {
        Ok(r) if r.run.cancelled => Phase::Cancelled,
        Ok(_) => Phase::Done,
        Err(_) => Phase::Failed,
    };
    let mut ev = super::terminal_event(&hub, &job_id, phase);
    if let Err(e) = &result {
        ev.message = format!("{e:#}");
    }
    hub.publish(ev);
    let logged = sink.join().map_err(|_| anyhow::anyhow!("progress sink panicked"))??;
    let r = result?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    eprintln!(
        "validation action error (mean abs, physical units): stage-1 {:.4} -> stage-2 {}; {logged} progress events in {}",
        r.val_action_error_before,
        r.val_action_error.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into()),
        job.config.progress.log_file.display()
    );
    Ok(())
}
