//! Hot-swap preparation: checkpoint announcements (from the trainer's topic or a folder watcher)
//! are verified, checked for compatibility, loaded and validated on a background thread; the
//! control loop then activates the prepared model between two ticks.
//!
//! Validation: when fresh inputs are available the new checkpoint computes VL features and one
//! action chunk on the current observation before it is handed over; a load error, an encoder or
//! head error, a wrong chunk size or a non-finite value rejects it and the running model is not
//! touched. When no fresh observation exists (inputs stale) it is handed over unvalidated, and the
//! control loop's guard rolls it back on its first non-finite action.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::clock::Clock;
use super::error::RuntimeError;
use super::inputs::{InputBuffers, Snapshot};
use super::model::{ActionModel, ModelLoader, VlEncoder};
use super::types::{CheckpointMeta, IoSpec, VlFeatures};

/// A new checkpoint to switch to.
#[derive(Debug, Clone, PartialEq)]
pub struct Announcement {
    /// Version name.
    pub version: String,
    /// Checkpoint folder.
    pub dir: PathBuf,
    /// Runtime clock time of the announcement (hot-swap latency is measured from here).
    pub announced_at: Duration,
}

/// Sends checkpoint announcements to the runtime; cheap to clone (one per source: ROS topic,
/// folder watcher, CLI).
#[derive(Clone)]
pub struct Announcer {
    tx: Sender<Announcement>,
    clock: Arc<dyn Clock>,
}

impl Announcer {
    /// Announces checkpoint `version` in folder `dir`, stamped now.
    pub fn announce(&self, version: impl Into<String>, dir: impl Into<PathBuf>) -> Result<(), RuntimeError> {
        let a = Announcement { version: version.into(), dir: dir.into(), announced_at: self.clock.now() };
        self.tx.send(a).map_err(|e| RuntimeError::Config {
            field: "announcement".into(),
            reason: format!("the runtime has stopped; checkpoint {} was not taken", e.0.version),
        })
    }
}

/// A checkpoint ready to act.
pub(crate) struct Prepared {
    pub meta: CheckpointMeta,
    pub encoder: Box<dyn VlEncoder>,
    pub model: Box<dyn ActionModel>,
    /// Features of the validation observation, so the model acts on its first tick.
    pub features: Option<VlFeatures>,
    pub announced_at: Duration,
}

/// What the swap thread tells the control loop.
pub(crate) enum SwapOutcome {
    Ready(Box<Prepared>),
    Rejected { version: String, reason: String },
}

/// What a checkpoint must match to be accepted.
#[derive(Debug, Clone)]
pub(crate) struct Acceptance {
    pub io: IoSpec,
    pub base_model_id: Option<String>,
}

fn prepare(
    loader: &dyn ModelLoader,
    accept: &Acceptance,
    inputs: &InputBuffers,
    ann: &Announcement,
) -> Result<Prepared, RuntimeError> {
    let meta = loader.verify(&ann.dir)?;
    if meta.version != ann.version {
        return Err(RuntimeError::Checkpoint {
            dir: ann.dir.clone(),
            reason: format!("announced as {}, but its manifest says {}", ann.version, meta.version),
        });
    }
    if let Some(base) = &accept.base_model_id {
        if *base != meta.base_model_id {
            return Err(RuntimeError::Incompatible {
                version: meta.version.clone(),
                field: "base_model_id".into(),
                expected: base.clone(),
                actual: meta.base_model_id.clone(),
            });
        }
    }
    accept.io.check_compatible(&meta.version, &meta.io)?;
    let loaded = loader.load(&ann.dir, &meta)?;
    let (mut encoder, mut model) = (loaded.encoder, loaded.model);
    if model.version() != meta.version {
        return Err(RuntimeError::Model {
            version: meta.version.clone(),
            reason: format!("loaded model reports version {}", model.version()),
        });
    }
    let features = match inputs.snapshot() {
        Snapshot::Fresh(obs) => {
            let mut f = encoder.features(&obs)?;
            f.version = meta.version.clone();
            f.obs_taken_at = obs.taken_at;
            let chunk = model.act_with(&f, &obs)?;
            chunk.validate(&meta.version, &accept.io)?;
            Some(f)
        }
        Snapshot::Stale(_) => None,
    };
    Ok(Prepared { meta, encoder, model, features, announced_at: ann.announced_at })
}

/// The swap thread and the announcement channel.
pub(crate) struct SwapWorker {
    pub announcer: Announcer,
    pub outcomes: Receiver<SwapOutcome>,
    pub thread: JoinHandle<()>,
}

impl SwapWorker {
    /// Starts the thread; it ends when `stop` is set.
    pub fn spawn(
        loader: Arc<dyn ModelLoader>,
        accept: Acceptance,
        inputs: Arc<InputBuffers>,
        clock: Arc<dyn Clock>,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, RuntimeError> {
        let (tx, rx) = mpsc::channel::<Announcement>();
        let (out_tx, outcomes) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vla-hotswap".into())
            .spawn(move || {
                // Versions are unique per checkpoints root; the same version arriving twice (the
                // topic's transient-local replay and the folder watcher) is prepared once.
                let mut last_ready: Option<String> = None;
                while !stop.load(Ordering::Relaxed) {
                    let ann = match rx.recv_timeout(Duration::from_millis(50)) {
                        Ok(a) => a,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => return,
                    };
                    if last_ready.as_deref() == Some(ann.version.as_str()) {
                        continue;
                    }
                    let outcome = match prepare(loader.as_ref(), &accept, &inputs, &ann) {
                        Ok(p) => {
                            last_ready = Some(ann.version.clone());
                            SwapOutcome::Ready(Box::new(p))
                        }
                        Err(e) => SwapOutcome::Rejected { version: ann.version.clone(), reason: e.to_string() },
                    };
                    if out_tx.send(outcome).is_err() {
                        return;
                    }
                }
            })
            .map_err(|source| RuntimeError::Thread { name: "vla-hotswap".into(), source })?;
        Ok(Self { announcer: Announcer { tx, clock }, outcomes, thread })
    }
}

/// [`crate::checkpoint::publish::read_latest`] as a runtime error.
fn read_latest(root: &Path) -> Result<Option<String>, RuntimeError> {
    crate::checkpoint::publish::read_latest(root)
        .map_err(|e| RuntimeError::Checkpoint { dir: root.to_path_buf(), reason: e.to_string() })
}

/// Polls `<root>/latest` every `poll` and announces each new version (`<root>/<version>`).
pub(crate) fn spawn_watcher(
    root: PathBuf,
    poll: Duration,
    announcer: Announcer,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, RuntimeError> {
    std::thread::Builder::new()
        .name("vla-ckpt-watch".into())
        .spawn(move || {
            let mut seen: Option<String> = None;
            let mut last_error: Option<String> = None;
            while !stop.load(Ordering::Relaxed) {
                match read_latest(&root) {
                    Ok(Some(v)) if seen.as_deref() != Some(v.as_str()) => {
                        last_error = None;
                        if announcer.announce(v.clone(), root.join(&v)).is_err() {
                            return;
                        }
                        seen = Some(v);
                    }
                    Ok(_) => last_error = None,
                    Err(e) => {
                        let msg = e.to_string();
                        if last_error.as_deref() != Some(msg.as_str()) {
                            tracing::warn!("{msg}");
                            last_error = Some(msg);
                        }
                    }
                }
                std::thread::sleep(poll);
            }
        })
        .map_err(|source| RuntimeError::Thread { name: "vla-ckpt-watch".into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_pointer_must_name_a_published_version() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(read_latest(root.path()).unwrap(), None);
        std::fs::create_dir(root.path().join("v0012")).unwrap();
        std::fs::write(root.path().join("latest"), "v0012\n").unwrap();
        assert_eq!(read_latest(root.path()).unwrap().as_deref(), Some("v0012"));
        for bad in ["\n", "../etc\n", "..", "v0013\n"] {
            std::fs::write(root.path().join("latest"), bad).unwrap();
            let e = read_latest(root.path()).unwrap_err().to_string();
            assert!(e.contains("which is not a published version"), "{bad:?}: {e}");
        }
    }
}
