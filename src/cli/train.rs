//! `vla_finetune train --config FILE [--set key=value ...]`: the Stage 2 job (LoRA on the VL
//! model + sensor encoder + action expert, from a stage-1 checkpoint) with a progress bar, a
//! JSON-lines progress log (`progress.log_file`), the curves plot (`progress.plot_file`, after
//! each epoch) and the result printed as JSON. Ctrl-C cancels at the next optimizer step and
//! leaves a resumable state (`--resume` continues it).
//!
//! Started by torchrun (`torchrun --nproc_per_node=N --no-python vla_finetune train ...`), each
//! process is one data-parallel rank ([`crate::dist`]): on CUDA it uses device `cuda:LOCAL_RANK`;
//! rank 0 alone takes the state folder's lock, draws the bar, writes the log and prints the result.
//! `--nproc-per-node N` starts that launch itself on this machine ([`crate::train::launch`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::dist::{Group, LaunchEnv};
use crate::train::config::{Override, TrainConfig};
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
    pub set: Vec<Override>,
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
    /// Train as this many data-parallel ranks on this machine (torchrun on loopback; one per
    /// GPU on CUDA); 1: this process alone.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nproc_per_node: usize,
}

/// Runs the job and prints its result.
pub fn run(a: TrainArgs) -> Result<()> {
    let mut config = TrainConfig::load(&a.config, &a.set)?;
    if a.nproc_per_node > 1 {
        return run_launch(a, config);
    }
    let group = join_launch(&mut config)?;
    let main = group.as_ref().is_none_or(|g| g.is_main());
    crate::device::parse_available(&config.run.device).map_err(|e| anyhow::anyhow!("run.device: {e}"))?;
    let state_dir = &config.checkpoint.state_dir;
    let mut lock = None;
    if main {
        guard::check_start(state_dir, a.resume, a.fresh)?;
        let l = guard::StateLock::acquire(state_dir)?;
        for p in &l.removed {
            eprintln!("removed {} (left by an interrupted run)", p.display());
        }
        lock = Some(l);
    }
    // The other ranks start once rank 0 has checked and locked the state folder.
    if let Some(g) = &group {
        g.barrier()?;
    }
    let _lock = lock;
    let hub = ProgressHub::new(256);
    let job_id = "train".to_string();
    let sink = if main {
        if let Some(parent) = config.progress.log_file.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let log = JsonlLog::open(&config.progress.log_file)?;
        let bar = (!a.quiet).then(|| (BarRenderer::stderr(), Throttle::new(config.progress.max_hz)));
        Some(spawn_sink(hub.subscribe(), job_id.clone(), Some(log), bar))
    } else {
        None
    };
    let ctx = JobContext { job_id: job_id.clone(), cancel: Default::default(), progress: hub.clone() };
    let cancel = ctx.cancel.clone();
    let _ = super::ctrlc_cancel(move || cancel.cancel());
    let job = Stage2Job { config, resume: a.resume, group: group.clone() };
    let result = stage2::run(&job, &ctx, &mut |p| eprintln!("published {} ({})", p.version, p.dir.display()));
    let Some(sink) = sink else {
        let r = result?;
        eprintln!(
            "rank {}: done after {} optimizer steps",
            group.as_ref().map_or(0, |g| g.rank()),
            r.run.counters.global_step
        );
        return Ok(());
    };
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
        "validation action error (mean abs, in training-set stds): stage-1 {:.4} -> stage-2 {}; {logged} progress events in {}",
        r.val_action_error_before,
        r.val_action_error.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into()),
        job.config.progress.log_file.display()
    );
    Ok(())
}

/// This process's rank of a torchrun launch (None without one); on CUDA its device becomes
/// `cuda:LOCAL_RANK`.
fn join_launch(config: &mut TrainConfig) -> Result<Option<Arc<Group>>> {
    let d = &config.distributed;
    let Some((env, group)) = crate::dist::join_launch(&d.backend, Duration::from_secs(d.timeout_s))? else {
        return Ok(None);
    };
    if config.run.device.starts_with("cuda") || (config.run.device == "auto" && tch::Cuda::is_available()) {
        config.run.device = format!("cuda:{}", env.local_rank);
    }
    Ok(Some(group))
}

/// `--nproc-per-node N`: the ranks under torchrun, their progress drawn here from rank 0's log
/// (which rank 0 writes; the lock is rank 0's too).
fn run_launch(a: TrainArgs, config: TrainConfig) -> Result<()> {
    if LaunchEnv::from_env()?.is_some() {
        anyhow::bail!(
            "--nproc-per-node is for starting a launch, and this process already is a rank of one (WORLD_SIZE is set)"
        );
    }
    if !a.resume {
        guard::check_start(&config.checkpoint.state_dir, false, a.fresh)?;
    }
    let launch = crate::train::launch::Launch::local(a.nproc_per_node)?;
    let hub = ProgressHub::new(256);
    let job_id = "train".to_string();
    let bar = (!a.quiet).then(|| (BarRenderer::stderr(), Throttle::new(config.progress.max_hz)));
    let sink = spawn_sink(hub.subscribe(), job_id.clone(), None, bar);
    let ctx = JobContext { job_id: job_id.clone(), cancel: Default::default(), progress: hub.clone() };
    let cancel = ctx.cancel.clone();
    let _ = super::ctrlc_cancel(move || cancel.cancel());
    let job = Stage2Job { config, resume: a.resume, group: None };
    let result = crate::train::launch::run_stage2(&job, &launch, &ctx, &mut |p| {
        eprintln!("published {} ({})", p.version, p.dir.display())
    });
    let phase = match &result {
        Ok(r) if r.run.cancelled => Phase::Cancelled,
        Ok(_) => Phase::Done,
        Err(_) => Phase::Failed,
    };
    hub.publish(super::terminal_event(&hub, &job_id, phase));
    let _ = sink.join();
    let r = result?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}
