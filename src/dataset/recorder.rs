//! The ROS-free recorder core. Callers (the ROS collector's raw subscriptions, the simulator, the
//! importer) hand it `(topic, type, CDR bytes, header stamp, receive stamp)`; a bounded queue feeds
//! one writer thread that writes the current episode ([`EpisodeWriter`]). [`Recorder::push`] never
//! blocks: when the queue is full the message is dropped and counted for its topic (in the status
//! and in the episode's `drops`). At a stop, the messages a stream with a `rate_hz` owed the
//! episode after its last one (still in flight, or the stream went silent) are counted as dropped
//! too. A write error (full disk, quota) stops the episode with an error status and keeps what was
//! flushed.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use super::cdr::MsgType;
use super::episode::EpisodeMeta;
use super::gaps::due_before_end;
use super::mcap_episode::{episode_dir, EpisodeError, EpisodeWriter, WriterOptions};
use super::recovery::{self, RecoveryError, RecoveryReport};
use super::streams::StreamConfig;

/// Errors of the recorder's control calls.
#[derive(Debug, Error)]
pub enum RecorderError {
    /// `start` while an episode is being recorded.
    #[error("episode `{0}` is already being recorded")]
    AlreadyRecording(String),
    /// `stop` with no episode.
    #[error("no episode is being recorded")]
    NotRecording,
    /// The outcome is not one of the accepted words.
    #[error("outcome `{0}` is not one of success, failure, aborted, interrupted")]
    BadOutcome(String),
    /// Writing the episode failed.
    #[error(transparent)]
    Episode(#[from] EpisodeError),
    /// The stream mapping is invalid.
    #[error(transparent)]
    Streams(#[from] crate::dataset::streams::StreamsError),
    /// The writer thread is gone (it panicked).
    #[error("the recorder's writer thread has stopped")]
    WriterGone,
}

/// Recorder settings.
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// Dataset root; episodes go to `<root>/episodes/<id>/`.
    pub root: PathBuf,
    /// Topics to record.
    pub streams: StreamConfig,
    /// Messages the queue holds before dropping.
    pub queue_capacity: usize,
    /// Payload bytes the queue holds before dropping (bounds memory with large images).
    pub queue_bytes: usize,
    /// File options.
    pub writer: WriterOptions,
}

/// What the operator says about an episode when starting it.
#[derive(Debug, Clone, Default)]
pub struct EpisodeInfo {
    /// Explicit id; generated from the wall clock when `None`.
    pub id: Option<String>,
    /// Language instruction.
    pub instruction: String,
    /// Task name.
    pub task: String,
    /// Operator.
    pub operator: String,
}

/// What happened to a pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// Queued for writing.
    Queued,
    /// Dropped and counted: queue full, writer stopped, or the type does not match the mapping.
    Dropped,
    /// Ignored: no episode is being recorded.
    NotRecording,
    /// Ignored: the topic is not in the mapping.
    UnknownTopic,
}

/// Episode outcomes a stop accepts (`interrupted`: the recorder was shut down while recording).
pub const OUTCOMES: [&str; 4] = ["success", "failure", "aborted", "interrupted"];

/// Counters of one topic since the recorder started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TopicStatus {
    /// Topic.
    pub topic: String,
    /// Messages pushed while recording.
    pub received: u64,
    /// Messages written to an episode.
    pub written: u64,
    /// Messages dropped.
    pub dropped: u64,
    /// CDR bytes written.
    pub bytes: u64,
}

/// A snapshot for the status topic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RecorderStatus {
    /// An episode is being recorded.
    pub recording: bool,
    /// The current (or last) episode id.
    pub episode: Option<String>,
    /// Episodes finished since start (cleanly or stopped by an error).
    pub episodes_finished: u64,
    /// The error that stopped the last episode, if any.
    pub error: Option<String>,
    /// Messages waiting in the queue.
    pub queued: u64,
    /// Payload bytes waiting in the queue.
    pub queued_bytes: u64,
    /// Messages written to the current (or last) episode.
    pub episode_messages: u64,
    /// Per-topic counters, in mapping order.
    pub topics: Vec<TopicStatus>,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    bytes: AtomicU64,
    warned: AtomicBool,
    /// The nominal rate of the stream, if the mapping gives one.
    rate_hz: Option<f64>,
    /// The newest stamp pushed in the current episode (`i64::MIN` from its start until its first
    /// message).
    newest_ns: AtomicI64,
}

#[derive(Default)]
struct State {
    episode: Option<String>,
    finished: u64,
    error: Option<String>,
}

struct Shared {
    topics: Vec<String>,
    counters: Vec<Counters>,
    recording: AtomicBool,
    queued: AtomicU64,
    queued_bytes: AtomicU64,
    queue_bytes: u64,
    episode_written: AtomicU64,
    /// The current episode's start time.
    episode_start_ns: AtomicI64,
    state: Mutex<State>,
}

impl Shared {
    fn dropped_snapshot(&self) -> Vec<u64> {
        self.counters.iter().map(|c| c.dropped.load(Ordering::Relaxed)).collect()
    }
}

enum Msg {
    Data { topic: usize, cdr: Vec<u8>, stamp_ns: i64, recv_ns: i64 },
    Start { meta: EpisodeMeta, reply: mpsc::Sender<Result<String, RecorderError>> },
    Stop { outcome: String, stop_ns: i64, reply: mpsc::Sender<Result<EpisodeMeta, RecorderError>> },
}

/// The recorder: a bounded queue and its writer thread.
pub struct Recorder {
    tx: Option<SyncSender<Msg>>,
    shared: Arc<Shared>,
    index: HashMap<String, (usize, MsgType)>,
    worker: Option<JoinHandle<()>>,
    root: PathBuf,
}

impl Recorder {
    /// Recovers unfinished episodes under the root (see [`recovery`]), then starts the writer thread.
    pub fn open(
        mut config: RecorderConfig,
    ) -> Result<(Recorder, Vec<Result<RecoveryReport, RecoveryError>>), RecorderError> {
        config.streams.validate("recorder configuration")?;
        std::fs::create_dir_all(config.root.join("episodes"))
            .map_err(|source| EpisodeError::Io { path: config.root.join("episodes"), source })?;
        let recovered = recovery::recover_all(&config.root);
        let specs = config.streams.all();
        let topics: Vec<String> = specs.iter().map(|(_, s)| s.topic.clone()).collect();
        let index = specs.iter().enumerate().map(|(i, (_, s))| (s.topic.clone(), (i, s.kind()))).collect();
        let shared = Arc::new(Shared {
            counters: specs.iter().map(|(_, s)| Counters { rate_hz: s.rate_hz, ..Default::default() }).collect(),
            topics,
            recording: AtomicBool::new(false),
            queued: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            queue_bytes: config.queue_bytes.max(1) as u64,
            episode_written: AtomicU64::new(0),
            episode_start_ns: AtomicI64::new(0),
            state: Mutex::new(State::default()),
        });
        let (tx, rx) = mpsc::sync_channel(config.queue_capacity.max(1));
        let root = config.root.clone();
        let worker_shared = shared.clone();
        let worker = std::thread::Builder::new()
            .name("recorder-writer".into())
            .spawn(move || {
                let types = config.streams.all().iter().map(|(_, s)| s.kind()).collect();
                Worker {
                    shared: worker_shared,
                    config,
                    types,
                    current: None,
                    base_drops: Vec::new(),
                    last_progress: Instant::now(),
                }
                .run(rx)
            })
            .map_err(|source| EpisodeError::Io { path: PathBuf::from("recorder-writer thread"), source })?;
        Ok((Recorder { tx: Some(tx), shared, index, worker: Some(worker), root }, recovered))
    }

    /// Hands one message to the recorder without ever blocking.
    pub fn push(&self, topic: &str, type_name: &str, cdr: Vec<u8>, stamp_ns: i64, recv_ns: i64) -> PushOutcome {
        let i = match self.admit(topic, type_name) {
            Ok(i) => i,
            Err(o) => return o,
        };
        let c = &self.shared.counters[i];
        c.newest_ns.fetch_max(stamp_ns, Ordering::Relaxed);
        let len = cdr.len() as u64;
        if self.shared.queued_bytes.load(Ordering::Relaxed) + len > self.shared.queue_bytes {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            return PushOutcome::Dropped;
        }
        let tx = self.tx.as_ref().expect("sender lives until drop");
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        self.shared.queued_bytes.fetch_add(len, Ordering::Relaxed);
        match tx.try_send(Msg::Data { topic: i, cdr, stamp_ns, recv_ns }) {
            Ok(()) => PushOutcome::Queued,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                self.shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                c.dropped.fetch_add(1, Ordering::Relaxed);
                PushOutcome::Dropped
            }
        }
    }

    /// [`Recorder::push`] for a raw subscription: the stamp is read from the message header
    /// (`recv_ns` for types without one); a message whose header does not decode is dropped
    /// and counted.
    pub fn push_received(&self, topic: &str, type_name: &str, cdr: Vec<u8>, recv_ns: i64) -> PushOutcome {
        let Some(&(i, t)) = self.index.get(topic) else { return PushOutcome::UnknownTopic };
        match t.header_stamp(&cdr) {
            Ok(stamp) => self.push(topic, type_name, cdr, stamp.unwrap_or(recv_ns), recv_ns),
            Err(e) => match self.admit(topic, type_name) {
                Ok(_) => {
                    let c = &self.shared.counters[i];
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                    if !c.warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!("topic `{topic}`: {e}; dropping undecodable messages");
                    }
                    PushOutcome::Dropped
                }
                Err(o) => o,
            },
        }
    }

    /// Like [`Recorder::push`] but waits for queue space instead of dropping: for offline
    /// producers (the simulator running faster than real time, imports) that must lose nothing.
    pub fn push_wait(&self, topic: &str, type_name: &str, cdr: Vec<u8>, stamp_ns: i64, recv_ns: i64) -> PushOutcome {
        let i = match self.admit(topic, type_name) {
            Ok(i) => i,
            Err(o) => return o,
        };
        let c = &self.shared.counters[i];
        c.newest_ns.fetch_max(stamp_ns, Ordering::Relaxed);
        let len = cdr.len() as u64;
        while self.shared.queued_bytes.load(Ordering::Relaxed) + len > self.shared.queue_bytes
            && self.shared.queued.load(Ordering::Relaxed) > 0
            && !self.worker.as_ref().is_none_or(|w| w.is_finished())
        {
            std::thread::sleep(Duration::from_micros(500));
        }
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        self.shared.queued_bytes.fetch_add(len, Ordering::Relaxed);
        match self.send(Msg::Data { topic: i, cdr, stamp_ns, recv_ns }) {
            Ok(()) => PushOutcome::Queued,
            Err(_) => {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                self.shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                c.dropped.fetch_add(1, Ordering::Relaxed);
                PushOutcome::Dropped
            }
        }
    }

    /// Counts `n` messages of `topic` as lost before they reached the recorder (seen missing by
    /// the transport, e.g. from stamp gaps); they show in the status and the episode's drops.
    pub fn count_lost(&self, topic: &str, n: u64) {
        if let Some(&(i, _)) = self.index.get(topic) {
            if self.shared.recording.load(Ordering::Acquire) {
                self.shared.counters[i].dropped.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Checks topic, recording state and type; counts the message as received (and dropped when
    /// its type does not match the mapping). Returns the topic's index.
    fn admit(&self, topic: &str, type_name: &str) -> Result<usize, PushOutcome> {
        let Some(&(i, t)) = self.index.get(topic) else { return Err(PushOutcome::UnknownTopic) };
        if !self.shared.recording.load(Ordering::Acquire) {
            return Err(PushOutcome::NotRecording);
        }
        let c = &self.shared.counters[i];
        c.received.fetch_add(1, Ordering::Relaxed);
        if t.name() != type_name && MsgType::parse(type_name).ok() != Some(t) {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            if !c.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "topic `{topic}`: got type `{type_name}`, the mapping says {}; dropping such messages",
                    t.name()
                );
            }
            return Err(PushOutcome::Dropped);
        }
        Ok(i)
    }

    /// Starts an episode; returns its id.
    pub fn start(&self, info: EpisodeInfo, now_ns: i64) -> Result<String, RecorderError> {
        let id = match info.id {
            Some(id) => id,
            None => self.fresh_id(now_ns),
        };
        let meta = EpisodeMeta {
            id,
            instruction: info.instruction,
            task: info.task,
            operator: info.operator,
            start_ns: now_ns,
            ..Default::default()
        };
        let (reply, rx) = mpsc::channel();
        self.send(Msg::Start { meta, reply })?;
        let id = rx.recv().map_err(|_| RecorderError::WriterGone)??;
        for c in &self.shared.counters {
            c.newest_ns.store(i64::MIN, Ordering::Relaxed);
        }
        self.shared.episode_start_ns.store(now_ns, Ordering::Relaxed);
        self.shared.recording.store(true, Ordering::Release);
        Ok(id)
    }

    /// Stops the current episode once everything queued before this call is written, counting the
    /// messages the rated streams owed it as dropped (module doc); the stop time is the wall clock
    /// now.
    pub fn stop(&self, outcome: &str) -> Result<EpisodeMeta, RecorderError> {
        self.stop_at(outcome, now_ns())
    }

    /// Like [`Recorder::stop`] with an explicit stop time (a simulated clock).
    pub fn stop_at(&self, outcome: &str, stop_ns: i64) -> Result<EpisodeMeta, RecorderError> {
        if !OUTCOMES.contains(&outcome) {
            return Err(RecorderError::BadOutcome(outcome.into()));
        }
        if self.shared.recording.swap(false, Ordering::AcqRel) {
            self.count_unarrived(stop_ns);
        }
        let (reply, rx) = mpsc::channel();
        self.send(Msg::Stop { outcome: outcome.into(), stop_ns, reply })?;
        rx.recv().map_err(|_| RecorderError::WriterGone)?
    }

    /// Counts as dropped, for each stream with a rate that delivered in this episode, the messages
    /// due after its newest one and before `stop_ns`. A stream whose newest stamp precedes the
    /// episode's start is stamped by another clock (a device's): nothing is counted for it.
    fn count_unarrived(&self, stop_ns: i64) {
        let start_ns = self.shared.episode_start_ns.load(Ordering::Relaxed);
        for c in &self.shared.counters {
            let newest = c.newest_ns.load(Ordering::Relaxed);
            if let (Some(rate), true) = (c.rate_hz, newest >= start_ns) {
                c.dropped.fetch_add(due_before_end(rate, newest, stop_ns), Ordering::Relaxed);
            }
        }
    }

    /// A snapshot of the counters for the status topic.
    pub fn status(&self) -> RecorderStatus {
        let st = self.shared.state.lock().expect("state lock");
        RecorderStatus {
            recording: self.shared.recording.load(Ordering::Acquire),
            episode: st.episode.clone(),
            episodes_finished: st.finished,
            error: st.error.clone(),
            queued: self.shared.queued.load(Ordering::Relaxed),
            queued_bytes: self.shared.queued_bytes.load(Ordering::Relaxed),
            episode_messages: self.shared.episode_written.load(Ordering::Relaxed),
            topics: self
                .shared
                .topics
                .iter()
                .zip(&self.shared.counters)
                .map(|(t, c)| TopicStatus {
                    topic: t.clone(),
                    received: c.received.load(Ordering::Relaxed),
                    written: c.written.load(Ordering::Relaxed),
                    dropped: c.dropped.load(Ordering::Relaxed),
                    bytes: c.bytes.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    fn send(&self, m: Msg) -> Result<(), RecorderError> {
        self.tx.as_ref().expect("sender lives until drop").send(m).map_err(|_| RecorderError::WriterGone)
    }

    fn fresh_id(&self, now_ns: i64) -> String {
        let base = format!("ep_{}", utc_compact(now_ns));
        let mut id = base.clone();
        let mut n = 1;
        while episode_dir(&self.root, &id).exists() {
            id = format!("{base}_{n}");
            n += 1;
        }
        id
    }
}

impl Drop for Recorder {
    /// Closes the queue; the writer thread writes what is queued and stops a running episode
    /// with outcome `aborted`.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

struct Worker {
    shared: Arc<Shared>,
    config: RecorderConfig,
    /// Message type of each topic, in mapping order.
    types: Vec<MsgType>,
    current: Option<EpisodeWriter>,
    base_drops: Vec<u64>,
    last_progress: Instant,
}

impl Worker {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            if self.current.is_some() && self.last_progress.elapsed() >= Duration::from_secs(1) {
                self.save_progress();
            }
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Msg::Data { topic, cdr, stamp_ns, recv_ns }) => {
                    self.write(topic, &cdr, stamp_ns, recv_ns);
                    self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                    self.shared.queued_bytes.fetch_sub(cdr.len() as u64, Ordering::Relaxed);
                }
                Ok(Msg::Start { meta, reply }) => {
                    let _ = reply.send(self.start(meta));
                }
                Ok(Msg::Stop { outcome, stop_ns, reply }) => {
                    let _ = reply.send(self.stop(&outcome, stop_ns));
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(ep) = self.current.as_mut() {
                        if let Err(e) = ep.flush() {
                            self.fail(e);
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    if self.current.is_some() {
                        if let Err(e) = self.stop("aborted", now_ns()) {
                            tracing::error!("stopping the episode at shutdown: {e}");
                        }
                    }
                    return;
                }
            }
        }
    }

    fn start(&mut self, meta: EpisodeMeta) -> Result<String, RecorderError> {
        if let Some(ep) = &self.current {
            return Err(RecorderError::AlreadyRecording(ep.meta().id.clone()));
        }
        let ep = EpisodeWriter::create(&self.config.root, meta, &self.config.streams, self.config.writer.clone())?;
        let id = ep.meta().id.clone();
        self.base_drops = self.shared.dropped_snapshot();
        self.shared.episode_written.store(0, Ordering::Relaxed);
        self.current = Some(ep);
        let mut st = self.shared.state.lock().expect("state lock");
        st.episode = Some(id.clone());
        st.error = None;
        tracing::info!("recording episode {id}");
        Ok(id)
    }

    /// Persists the episode's drop counters about once a second (kept by crash recovery).
    fn save_progress(&mut self) {
        self.last_progress = Instant::now();
        let drops = self.episode_drops();
        if let Some(ep) = self.current.as_mut() {
            if let Err(e) = ep.save_progress(drops) {
                tracing::warn!("episode {}: cannot save drop counters: {e}", ep.meta().id);
            }
        }
    }

    fn episode_drops(&self) -> BTreeMap<String, u64> {
        self.shared
            .dropped_snapshot()
            .iter()
            .zip(&self.base_drops)
            .zip(&self.shared.topics)
            .filter(|((now, base), _)| *now > *base)
            .map(|((now, base), t)| (t.clone(), now - base))
            .collect()
    }

    fn stop(&mut self, outcome: &str, stop_ns: i64) -> Result<EpisodeMeta, RecorderError> {
        let ep = self.current.take().ok_or(RecorderError::NotRecording)?;
        let drops = self.episode_drops();
        let meta = ep.finish(outcome, stop_ns, drops)?;
        self.shared.state.lock().expect("state lock").finished += 1;
        tracing::info!("episode {} stopped ({outcome})", meta.id);
        Ok(meta)
    }

    fn write(&mut self, topic: usize, cdr: &[u8], stamp_ns: i64, recv_ns: i64) {
        let c = &self.shared.counters[topic];
        let Some(ep) = self.current.as_mut() else {
            // The episode was stopped by a write error after this message was queued.
            c.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let name = &self.shared.topics[topic];
        match ep.write(name, self.types[topic].name(), cdr, stamp_ns, recv_ns) {
            Ok(()) => {
                c.written.fetch_add(1, Ordering::Relaxed);
                self.shared.episode_written.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(cdr.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                c.dropped.fetch_add(1, Ordering::Relaxed);
                self.fail(e);
            }
        }
    }

    /// Stops the episode after a write error: keeps what was flushed, rebuilds the file from it
    /// when the disk allows (otherwise the marker stays for the next start).
    fn fail(&mut self, e: EpisodeError) {
        self.shared.recording.store(false, Ordering::Release);
        let Some(ep) = self.current.take() else { return };
        let drops = self.episode_drops();
        let dir = ep.dir().to_path_buf();
        let id = ep.meta().id.clone();
        tracing::error!("episode {id}: write failed, stopping it: {e}");
        ep.abandon("aborted", now_ns(), drops);
        if let Err(re) = recovery::recover_episode(&dir) {
            tracing::error!("episode {id}: cannot rebuild it now ({re}); it will be recovered at the next start");
        }
        let mut st = self.shared.state.lock().expect("state lock");
        st.error = Some(format!("episode {id} stopped: {e}"));
        st.finished += 1;
    }
}

/// Wall-clock now, ns since the Unix epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// `YYYYMMDDTHHMMSS_mmm` (UTC) for nanoseconds since the epoch.
pub fn utc_compact(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let ms = ns.rem_euclid(1_000_000_000) / 1_000_000;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = crate::civil_date::civil_from_days(days);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}_{ms:03}", sod / 3600, sod % 3600 / 60, sod % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn recorder_can_be_shared_between_subscription_tasks() {
        fn shareable<T: Send + Sync>() {}
        shareable::<super::Recorder>();
        shareable::<crate::dataset::mcap_episode::McapEpisode>();
    }

    #[test]
    fn utc_compact_matches_known_dates() {
        assert_eq!(super::utc_compact(0), "19700101T000000_000");
        // 2024-02-29 12:34:56.789 UTC = 1709210096 s.
        assert_eq!(super::utc_compact(1_709_210_096_789_000_000), "20240229T123456_789");
    }
}
