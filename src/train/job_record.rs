//! What the fine-tuning service keeps of each job in `<runs_root>/<job_id>/job.json`: the
//! request, the compiled dataset, the stage reached, the versions published and how the job
//! ended. A job's state is answered from it after the job (or the trainer) is gone, and a
//! cancelled or failed job is resumed from it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The record's file name in the job's folder.
pub const JOB_FILE: &str = "job.json";

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Running (or the trainer stopped while it ran: see [`JobRecord::state_now`]).
    Running,
    /// Asked to stop; stops at its next step.
    Cancelling,
    /// Ran to the end.
    Done,
    /// Stopped on request with its state saved.
    Cancelled,
    /// Stopped by an error.
    Failed,
}

impl JobState {
    /// The snake_case name used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Cancelling => "cancelling",
            JobState::Done => "done",
            JobState::Cancelled => "cancelled",
            JobState::Failed => "failed",
        }
    }
}

/// One job's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job's id (its folder name).
    pub job_id: String,
    /// The request as given (`dataset` as the user named it).
    pub request: super::service::StartRequest,
    /// The stages it runs.
    pub stages: super::service::Stages,
    /// The compiled dataset it trains on (empty until compiled).
    pub dataset: String,
    /// The stage it runs or ran last (0 while compiling).
    pub stage: u8,
    /// Stage 1's published checkpoint, once stage 1 has finished (Stage 2 starts from it).
    pub stage1_checkpoint: String,
    /// Versions announced (published and made `latest`), oldest first.
    pub versions: Vec<String>,
    /// How far it got.
    pub state: JobState,
    /// Final numbers (JSON text) or the error.
    pub summary: String,
    /// The process that ran it last.
    pub pid: u32,
}

impl JobRecord {
    /// The record of job folder `run_dir`.
    pub fn read(run_dir: &Path) -> Result<Self, String> {
        let path = run_dir.join(JOB_FILE);
        let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_slice(&text).map_err(|e| format!("{}: not a job record: {e}", path.display()))
    }

    /// Writes it to `run_dir` (atomically: a reader sees the old or the new record).
    pub fn write(&self, run_dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
        crate::atomic_file::write(
            &run_dir.join(JOB_FILE),
            &serde_json::to_vec_pretty(self).expect("job records serialize"),
        )
        .map_err(|e| e.to_string())
    }

    /// The state, reading a `running` record whose process is gone as failed.
    pub fn state_now(&self) -> (JobState, String) {
        let alive = self.pid == std::process::id() || crate::dataset::recovery::process_alive(self.pid as i32);
        match self.state {
            JobState::Running | JobState::Cancelling if !alive => (
                JobState::Failed,
                format!("the trainer (pid {}) stopped while the job ran; its last saved state is kept", self.pid),
            ),
            s => (s, self.summary.clone()),
        }
    }
}

/// The folder of job `job_id` under `runs_root`, or `None` for an id that is not a plain name.
pub fn run_dir(runs_root: &Path, job_id: &str) -> Option<PathBuf> {
    let plain = !job_id.is_empty() && job_id != "." && job_id != ".." && !job_id.contains(['/', '\\']);
    plain.then(|| runs_root.join(job_id))
}
