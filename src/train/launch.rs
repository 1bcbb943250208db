//! A Stage 2 job as `nproc` data-parallel ranks on this machine: `torchrun --nproc_per_node=N
//! --no-python vla_finetune train --config <the job's YAML>` on loopback. Rank 0's progress log
//! is relayed into the job's context (but its terminal event: the caller reports the end), each version its run makes `latest` is announced, a cancel
//! is sent to torchrun as SIGINT (which it forwards to the ranks: they save a resumable state at
//! the next optimizer step) and rank 0's printed result is read back.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::controller::JobContext;
use super::error::TrainError;
use super::progress::ProgressEvent;
use super::stage2::{Stage2Job, Stage2Result};
use crate::checkpoint::publish::{Published, Publisher};

/// How to start the ranks.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Ranks on this machine (>= 2).
    pub nproc: usize,
    /// The `torchrun` executable.
    pub torchrun: PathBuf,
    /// The `vla_finetune` executable every rank runs.
    pub binary: PathBuf,
}

impl Launch {
    /// `nproc` ranks with the `torchrun` on PATH and the `vla_finetune` beside this executable
    /// (the CLI itself, or a node installed next to it).
    pub fn local(nproc: usize) -> Result<Self, TrainError> {
        let exe =
            std::env::current_exe().map_err(TrainError::io("find this executable", Path::new("/proc/self/exe")))?;
        let binary = exe.with_file_name("vla_finetune");
        if !binary.is_file() {
            return Err(TrainError::invalid(
                "nproc_per_node",
                format!(
                    "needs the vla_finetune executable beside {} (not found at {})",
                    exe.display(),
                    binary.display()
                ),
            ));
        }
        let torchrun = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join("torchrun"))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                TrainError::invalid(
                    "nproc_per_node",
                    "needs `torchrun` on PATH (it comes with torch: the project venv's bin/)",
                )
            })?;
        if nproc < 2 {
            return Err(TrainError::invalid("nproc_per_node", format!("is {nproc}; a launch has at least 2 ranks")));
        }
        Ok(Self { nproc, torchrun, binary })
    }
}

/// Runs `job` as [`Launch::nproc`] ranks (see the module doc); `job.group` is ignored.
pub fn run_stage2(
    job: &Stage2Job,
    launch: &Launch,
    ctx: &JobContext,
    on_publish: &mut dyn FnMut(&Published),
) -> Result<Stage2Result, TrainError> {
    let cfg = &job.config;
    let dir = cfg.run.output_dir.join("launch");
    std::fs::create_dir_all(&dir).map_err(TrainError::io("create folder", &dir))?;
    let yaml = dir.join("train.yaml");
    let text = serde_yaml::to_string(cfg).map_err(|e| TrainError::invalid("training config", e.to_string()))?;
    std::fs::write(&yaml, text).map_err(TrainError::io("write", &yaml))?;
    let log = &cfg.progress.log_file;
    let start_offset = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
    let publisher = Publisher::new(&cfg.checkpoint.publish_dir)?;
    let mut announced = publisher.latest()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(TrainError::io("find a free port on", Path::new("127.0.0.1")))?
        .port();
    let mut child = Command::new(&launch.torchrun)
        .arg(format!("--nproc_per_node={}", launch.nproc))
        .args(["--nnodes=1", "--master_addr=127.0.0.1", &format!("--master_port={port}"), "--no-python"])
        .arg(&launch.binary)
        .args(["train", "--quiet", "--config"])
        .arg(&yaml)
        .arg(if job.resume { "--resume" } else { "--fresh" })
        .env_remove("WORLD_SIZE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(TrainError::io("start", &launch.torchrun))?;
    let mut stdout = child.stdout.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let stderr = child.stderr.take().expect("piped");
    let err = std::thread::spawn(move || {
        // Echoed (the ranks' log lines), the last ones kept for the error.
        let mut last: std::collections::VecDeque<String> = Default::default();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            last.push_back(line);
            if last.len() > 20 {
                last.pop_front();
            }
        }
        last.into_iter().collect::<Vec<_>>().join("\n")
    });
    let mut relay = LogRelay { path: log.clone(), offset: start_offset, partial: String::new() };
    let mut interrupted = false;
    let status = loop {
        relay.forward(ctx)?;
        announce_new_latest(&publisher, &mut announced, on_publish)?;
        if ctx.cancel.is_cancelled() && !interrupted {
            // SAFETY: signals a child process we started and have not waited for.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            interrupted = true;
        }
        if let Some(status) = child.try_wait().map_err(TrainError::io("wait for", &launch.torchrun))? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    relay.forward(ctx)?;
    announce_new_latest(&publisher, &mut announced, on_publish)?;
    let (printed, last_err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    if !status.success() {
        return Err(TrainError::invalid(
            format!("{} ranks under torchrun", launch.nproc),
            format!("ended with {status}; last lines:\n{last_err}"),
        ));
    }
    let json = printed.find('{').map(|i| &printed[i..]).unwrap_or_default();
    serde_json::from_str(json).map_err(|e| TrainError::invalid("rank 0's result", format!("{e} (printed: {printed})")))
}

/// Announces the version `latest` names when it changed since `announced`.
fn announce_new_latest(
    publisher: &Publisher,
    announced: &mut Option<String>,
    on_publish: &mut dyn FnMut(&Published),
) -> Result<(), TrainError> {
    let now = publisher.latest()?;
    if now != *announced {
        if let Some(v) = &now {
            on_publish(&publisher.published(v)?);
        }
        *announced = now;
    }
    Ok(())
}

/// Forwards the complete lines appended to rank 0's progress log as events of the job.
struct LogRelay {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl LogRelay {
    fn forward(&mut self, ctx: &JobContext) -> Result<(), TrainError> {
        let Ok(mut f) = std::fs::File::open(&self.path) else { return Ok(()) };
        f.seek(SeekFrom::Start(self.offset)).map_err(TrainError::io("read", &self.path))?;
        let mut text = String::new();
        let n = f.read_to_string(&mut text).map_err(TrainError::io("read", &self.path))?;
        self.offset += n as u64;
        self.partial.push_str(&text);
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            match serde_json::from_str::<ProgressEvent>(line.trim()) {
                // The caller reports the end of the job.
                Ok(ev) if ev.phase.is_terminal() => {}
                Ok(mut ev) => {
                    ev.job_id = ctx.job_id.clone();
                    ctx.progress.publish(ev);
                }
                Err(e) => tracing::warn!(file = %self.path.display(), "progress line skipped: {e}"),
            }
        }
        Ok(())
    }
}
