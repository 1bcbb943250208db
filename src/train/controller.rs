//! The job controller behind the trainer node and the CLI: validates and starts one training job
//! at a time on its own thread, cancels it cooperatively, and reports its status.
//!
//! The job is a closure `Fn(JobContext, R) -> JobOutcome` run on a dedicated OS thread (libtorch
//! work blocks; the async executor and the ROS node stay responsive). It must check
//! [`JobContext::cancel`] at least once per optimizer step and, when cancelled, write its
//! checkpoint and return [`JobOutcome::Cancelled`]. The controller publishes the terminal progress
//! event (done / cancelled / failed) itself, after the job returns, so subscribers always see one.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::progress::{Phase, ProgressEvent, ProgressHub};

/// Why a start request was refused (nothing was started).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// A job is running.
    #[error("job {job_id} is already running")]
    AlreadyRunning {
        /// The running job.
        job_id: String,
    },
    /// The dataset does not exist or is unusable.
    #[error("dataset missing: {0}")]
    DatasetMissing(String),
    /// The base model or stage-1 checkpoint folder is not valid.
    #[error("model dir invalid: {0}")]
    ModelDirInvalid(String),
    /// The configuration or overrides are invalid.
    #[error("config invalid: {0}")]
    ConfigInvalid(String),
    /// A resume names a job that is not recorded.
    #[error("unknown job: {0}")]
    UnknownJob(String),
    /// A resume names a job that cannot be resumed (it is done, or the request is mixed).
    #[error("not resumable: {0}")]
    NotResumable(String),
    /// The job thread could not be started.
    #[error("could not start the job thread: {0}")]
    Spawn(String),
}

impl RejectReason {
    /// A stable machine-readable code (`already_running`, `dataset_missing`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            RejectReason::AlreadyRunning { .. } => "already_running",
            RejectReason::DatasetMissing(_) => "dataset_missing",
            RejectReason::ModelDirInvalid(_) => "model_dir_invalid",
            RejectReason::ConfigInvalid(_) => "config_invalid",
            RejectReason::UnknownJob(_) => "unknown_job",
            RejectReason::NotResumable(_) => "not_resumable",
            RejectReason::Spawn(_) => "spawn_failed",
        }
    }
}

/// The answer to a start request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartResponse {
    /// The job runs under this id.
    Accepted {
        /// Its id.
        job_id: String,
    },
    /// Nothing was started.
    Rejected(RejectReason),
}

/// The answer to a cancel request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelResponse {
    /// The job was asked to stop; it stops within one step.
    Cancelling,
    /// No job with that id is running.
    NotRunning,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// Ran to the end.
    Completed {
        /// Final numbers (metrics, published version, ...).
        summary: serde_json::Value,
    },
    /// Stopped on request after writing a consistent checkpoint.
    Cancelled {
        /// Where it stopped (step, checkpoint path, ...).
        summary: serde_json::Value,
    },
    /// Stopped by an error (or a panic, reported here).
    Failed {
        /// What went wrong.
        error: String,
    },
}

/// The controller's state.
#[derive(Debug, Clone, PartialEq)]
pub enum JobStatus {
    /// No job has run yet.
    Idle,
    /// A job is running.
    Running {
        /// Its id.
        job_id: String,
        /// Whether a cancel was requested.
        cancelling: bool,
    },
    /// The last job ended.
    Finished {
        /// Its id.
        job_id: String,
        /// How.
        outcome: JobOutcome,
    },
}

/// A cooperative cancellation flag shared by the controller and the job.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A fresh, not cancelled token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests cancellation.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a running job gets besides its request.
#[derive(Clone)]
pub struct JobContext {
    /// The job's id.
    pub job_id: String,
    /// Check at least once per optimizer step.
    pub cancel: CancelToken,
    /// Where to publish progress events.
    pub progress: ProgressHub,
}

/// A start-request check, e.g. "the dataset folder exists".
pub trait Validator<R>: Send + Sync {
    /// `Err` refuses the request with that reason.
    fn check(&self, request: &R) -> Result<(), RejectReason>;
}

impl<R, F> Validator<R> for F
where
    F: Fn(&R) -> Result<(), RejectReason> + Send + Sync,
{
    fn check(&self, request: &R) -> Result<(), RejectReason> {
        self(request)
    }
}

type JobFn<R> = dyn Fn(JobContext, R) -> JobOutcome + Send + Sync;

struct Slot {
    status: JobStatus,
    cancel: Option<CancelToken>,
    thread: Option<JoinHandle<()>>,
}

struct Inner<R> {
    job: Arc<JobFn<R>>,
    validators: Vec<Box<dyn Validator<R>>>,
    slot: Mutex<Slot>,
    status_tx: watch::Sender<JobStatus>,
    progress: ProgressHub,
    counter: AtomicU64,
}

/// Runs at most one job at a time. Cheap to clone (shared state).
pub struct JobController<R> {
    inner: Arc<Inner<R>>,
}

impl<R> Clone for JobController<R> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<R: Send + 'static> JobController<R> {
    /// A controller running `job`, publishing to `progress`, checking `validators` (in order)
    /// before each start.
    pub fn new(
        job: impl Fn(JobContext, R) -> JobOutcome + Send + Sync + 'static,
        validators: Vec<Box<dyn Validator<R>>>,
        progress: ProgressHub,
    ) -> Self {
        let (status_tx, _) = watch::channel(JobStatus::Idle);
        Self {
            inner: Arc::new(Inner {
                job: Arc::new(job),
                validators,
                slot: Mutex::new(Slot { status: JobStatus::Idle, cancel: None, thread: None }),
                status_tx,
                progress,
                counter: AtomicU64::new(0),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.inner.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Validates `request` and starts it on a new thread, or says why not. Returns at once.
    pub fn start(&self, request: R) -> StartResponse {
        self.start_as(request, None)
    }

    /// [`start`](Self::start) under `job_id` (a resumed job keeps its id); `None`: a new id.
    pub fn start_as(&self, request: R, job_id: Option<String>) -> StartResponse {
        let mut slot = self.lock();
        if let JobStatus::Running { job_id, .. } = &slot.status {
            return StartResponse::Rejected(RejectReason::AlreadyRunning { job_id: job_id.clone() });
        }
        for v in &self.inner.validators {
            if let Err(reason) = v.check(&request) {
                return StartResponse::Rejected(reason);
            }
        }
        if let Some(old) = slot.thread.take() {
            let _ = old.join(); // already finished: its status is Finished
        }
        let n = self.inner.counter.fetch_add(1, Ordering::SeqCst) + 1;
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let job_id = job_id.unwrap_or_else(|| format!("ft-{secs}-{n}"));
        let cancel = CancelToken::new();
        let ctx = JobContext { job_id: job_id.clone(), cancel: cancel.clone(), progress: self.inner.progress.clone() };
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new().name(format!("train-{job_id}")).spawn(move || {
            let job = inner.job.clone();
            let id = ctx.job_id.clone();
            let outcome = match catch_unwind(AssertUnwindSafe(|| job(ctx, request))) {
                Ok(o) => o,
                Err(p) => {
                    let msg =
                        p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                    JobOutcome::Failed { error: format!("job panicked: {}", msg.unwrap_or_default()) }
                }
            };
            let (phase, message) = match &outcome {
                JobOutcome::Completed { summary } => (Phase::Done, summary.to_string()),
                JobOutcome::Cancelled { summary } => (Phase::Cancelled, summary.to_string()),
                JobOutcome::Failed { error } => (Phase::Failed, error.clone()),
            };
            let mut ev =
                inner.progress.latest().filter(|e| e.job_id == id).unwrap_or_else(|| ProgressEvent::new(&id, phase));
            let fresh = ProgressEvent::new(&id, phase);
            ev.phase = phase;
            ev.message = message;
            ev.time_unix_ms = fresh.time_unix_ms;
            ev.eta_s = None;
            // Under the slot lock, the terminal event first and then the status: whoever sees
            // the job finished has its terminal event in `progress().latest()`, and whoever reacts
            // to that event with a new start finds the slot free (start takes this lock).
            let mut slot = inner.slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.status = JobStatus::Finished { job_id: id, outcome };
            slot.cancel = None;
            inner.progress.publish(ev);
            inner.status_tx.send_replace(slot.status.clone());
            drop(slot);
        });
        match spawned {
            Ok(handle) => {
                slot.status = JobStatus::Running { job_id: job_id.clone(), cancelling: false };
                slot.cancel = Some(cancel);
                slot.thread = Some(handle);
                // The thread cannot finish before this: it needs the lock to record its end.
                self.inner.status_tx.send_replace(slot.status.clone());
                StartResponse::Accepted { job_id }
            }
            Err(e) => StartResponse::Rejected(RejectReason::Spawn(e.to_string())),
        }
    }

    /// Asks job `job_id` to stop (it stops within one step).
    pub fn cancel(&self, job_id: &str) -> CancelResponse {
        let mut slot = self.lock();
        match (&slot.status, &slot.cancel) {
            (JobStatus::Running { job_id: running, .. }, Some(token)) if running == job_id => {
                token.cancel();
                slot.status = JobStatus::Running { job_id: job_id.to_string(), cancelling: true };
                self.inner.status_tx.send_replace(slot.status.clone());
                CancelResponse::Cancelling
            }
            _ => CancelResponse::NotRunning,
        }
    }

    /// The current status.
    pub fn status(&self) -> JobStatus {
        self.lock().status.clone()
    }

    /// A receiver of status changes.
    pub fn watch_status(&self) -> watch::Receiver<JobStatus> {
        self.inner.status_tx.subscribe()
    }

    /// The progress hub jobs publish to.
    pub fn progress(&self) -> &ProgressHub {
        &self.inner.progress
    }

    /// Waits (async) until job `job_id` has finished and returns its outcome; None if that job is
    /// neither running nor the last finished one.
    pub async fn wait(&self, job_id: &str) -> Option<JobOutcome> {
        let mut rx = self.watch_status();
        loop {
            match &*rx.borrow_and_update() {
                JobStatus::Finished { job_id: id, outcome } if id == job_id => return Some(outcome.clone()),
                JobStatus::Running { job_id: id, .. } if id == job_id => {}
                _ => return None,
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Blocks the calling (non-async) thread until the running job, if any, has ended; returns
    /// the final status.
    pub fn join(&self) -> JobStatus {
        let handle = self.lock().thread.take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        self.status()
    }
}
