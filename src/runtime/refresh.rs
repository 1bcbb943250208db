//! The background VL refresh: a thread that owns the VL encoders of the active and previous
//! checkpoints and computes features on request. Requests that pile up while it is busy collapse
//! to the newest, so a slow VL pass never queues work behind it, and the control loop never waits
//! for it. Dropping the handle waits for the thread to end (after the pass it is in), so the
//! process never exits under a running libtorch pass; a panicking encoder becomes an error.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
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
    requests: Option<Sender<Request>>,
    results: Receiver<Refreshed>,
    thread: Option<JoinHandle<()>>,
}

impl Refresher {
    /// Starts the refresh thread; it ends when this handle is dropped.
    pub fn spawn(clock: Arc<dyn Clock>) -> Result<Self, RuntimeError> {
        let (requests, rx) = mpsc::channel();
        let (tx, results) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vla-vl-refresh".into())
            .spawn(move || serve(rx, tx, clock))
            .map_err(|source| RuntimeError::Thread { name: "vla-vl-refresh".into(), source })?;
        Ok(Self { requests: Some(requests), results, thread: Some(thread) })
    }

    fn send(&self, req: Request) {
        // A send fails only when the thread is gone; the loop then runs on with the features it
        // has, and the missing refreshes show in the status counters.
        if let Some(tx) = &self.requests {
            let _ = tx.send(req);
        }
    }

    /// Hands over the encoder of a newly active checkpoint.
    pub fn install(&self, version: &str, encoder: Box<dyn VlEncoder>) {
        self.send(Request::Install { version: version.to_string(), encoder });
    }

    /// Drops every encoder but those of `versions`.
    pub fn retain(&self, versions: Vec<String>) {
        self.send(Request::Retain(versions));
    }

    /// Asks for features of `obs` from `version`'s encoder.
    pub fn request(&self, version: &str, obs: Arc<Observation>) {
        self.send(Request::Compute { version: version.to_string(), obs });
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

impl Drop for Refresher {
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs the encoder; a panic inside it becomes a model error naming the version.
fn run_encoder(encoder: &mut dyn VlEncoder, version: &str, obs: &Observation) -> Result<VlFeatures, RuntimeError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| encoder.features(obs))).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(RuntimeError::Model { version: version.to_string(), reason: format!("the VL encoder panicked: {what}") })
    })
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
        let result = run_encoder(encoder.as_mut(), &version, &obs).map(|mut f| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::clock::SystemClock;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn obs() -> Arc<Observation> {
        let sensor = crate::runtime::types::SensorWindow { channels: 1, values: vec![0.0], stamps_ns: vec![0] };
        Arc::new(Observation {
            frames: Vec::new(),
            sensor,
            state: None,
            instruction: String::new(),
            taken_at: Duration::ZERO,
        })
    }

    /// Sleeps, then records that it finished, or panics.
    struct Slow {
        done: Arc<AtomicBool>,
        panic: bool,
    }

    impl VlEncoder for Slow {
        fn features(&mut self, _obs: &Observation) -> Result<VlFeatures, RuntimeError> {
            std::thread::sleep(Duration::from_millis(200));
            if self.panic {
                panic!("tensor torn down");
            }
            self.done.store(true, Ordering::SeqCst);
            Err(RuntimeError::Model { version: "v1".into(), reason: "no features in this test".into() })
        }
    }

    #[test]
    fn dropping_the_handle_waits_for_the_running_pass() {
        let done = Arc::new(AtomicBool::new(false));
        let r = Refresher::spawn(Arc::new(SystemClock::new())).unwrap();
        r.install("v1", Box::new(Slow { done: done.clone(), panic: false }));
        r.request("v1", obs());
        std::thread::sleep(Duration::from_millis(50));
        drop(r);
        assert!(done.load(Ordering::SeqCst), "the pass ended before the handle was gone");
    }

    #[test]
    fn a_panicking_encoder_is_an_error_and_the_thread_lives_on() {
        let r = Refresher::spawn(Arc::new(SystemClock::new())).unwrap();
        r.install("v1", Box::new(Slow { done: Arc::new(AtomicBool::new(false)), panic: true }));
        for _ in 0..2 {
            r.request("v1", obs());
            let t0 = std::time::Instant::now();
            let got = loop {
                if let Some(x) = r.finished().pop() {
                    break x;
                }
                assert!(t0.elapsed() < Duration::from_secs(10), "no result");
                std::thread::sleep(Duration::from_millis(10));
            };
            let e = got.result.unwrap_err().to_string();
            assert!(e.contains("v1") && e.contains("panicked: tensor torn down"), "{e}");
        }
    }
}
