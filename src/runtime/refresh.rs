//! The background VL refresh: a thread that owns the VL encoders of the active and previous
//! checkpoints and computes features on request. Requests that pile up while it is busy collapse
//! to the newest, so a slow VL pass never queues work behind it, and the control loop never waits
//! for it.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use super::clock::Clock;
use super::error::RuntimeError;
use super::model::VlEncoder;
use super::types::{Observation, VlFeatures};

enum Request {
    Install { version: String, encoder: Box<dyn VlEncoder> },
    Retain(Vec<String>),
    Compute { version: String, obs: Arc<Observation> },
}

/// A finished refresh.
pub(crate) struct Refreshed {
    /// Version whose encoder ran.
    pub version: String,
    /// Features (version and observation time set) or the encoder's error.
    pub result: Result<VlFeatures, RuntimeError>,
    /// Time the encoder took.
    pub took: Duration,
}

/// The control loop's side of the refresh thread.
pub(crate) struct Refresher {
    requests: Sender<Request>,
    results: Receiver<Refreshed>,
}

impl Refresher {
    /// Starts the refresh thread; it ends when this handle is dropped.
    pub fn spawn(clock: Arc<dyn Clock>) -> Result<Self, RuntimeError> {
        let (requests, rx) = mpsc::channel();
        let (tx, results) = mpsc::channel();
        std::thread::Builder::new()
            .name("vla-vl-refresh".into())
            .spawn(move || serve(rx, tx, clock))
            .map_err(|source| RuntimeError::Thread { name: "vla-vl-refresh".into(), source })?;
        Ok(Self { requests, results })
    }

    /// Hands over the encoder of a newly active checkpoint.
    pub fn install(&self, version: &str, encoder: Box<dyn VlEncoder>) {
        // A send fails only when the thread is gone (it panicked); the loop then runs on with the
        // features it has, and the missing refreshes show in the status counters.
        let _ = self.requests.send(Request::Install { version: version.to_string(), encoder });
    }

    /// Drops every encoder but those of `versions`.
    pub fn retain(&self, versions: Vec<String>) {
        let _ = self.requests.send(Request::Retain(versions));
    }

    /// Asks for features of `obs` from `version`'s encoder.
    pub fn request(&self, version: &str, obs: Arc<Observation>) {
        let _ = self.requests.send(Request::Compute { version: version.to_string(), obs });
    }

    /// Finished refreshes, without waiting.
    pub fn finished(&self) -> Vec<Refreshed> {
        let mut out = Vec::new();
        while let Ok(r) = self.results.try_recv() {
            out.push(r);
        }
        out
    }
}

fn serve(rx: Receiver<Request>, tx: Sender<Refreshed>, clock: Arc<dyn Clock>) {
    let mut encoders: HashMap<String, Box<dyn VlEncoder>> = HashMap::new();
    while let Ok(first) = rx.recv() {
        let mut job = None;
        let mut next = Some(first);
        while let Some(req) = next {
            match req {
                Request::Install { version, encoder } => {
                    encoders.insert(version, encoder);
                }
                Request::Retain(keep) => encoders.retain(|v, _| keep.contains(v)),
                Request::Compute { version, obs } => job = Some((version, obs)),
            }
            next = match rx.try_recv() {
                Ok(r) => Some(r),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => return,
            };
        }
        let Some((version, obs)) = job else { continue };
        let Some(encoder) = encoders.get_mut(&version) else { continue };
        let start = clock.now();
        let result = encoder.features(&obs).map(|mut f| {
            f.version = version.clone();
            f.obs_taken_at = obs.taken_at;
            f
        });
        let took = clock.now().saturating_sub(start);
        if tx.send(Refreshed { version, result, took }).is_err() {
            return;
        }
    }
}
