//! Crash recovery: an episode folder still holding the `RECORDING` marker was not stopped cleanly
//! (kill -9, power loss, full disk). Its MCAP is read chunk by chunk up to the last valid chunk and
//! rewritten as a complete MCAP (summary, footer) with a fresh `metadata.yaml`; the episode is
//! marked `recovered: true`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use mcap::records::MessageHeader;
use thiserror::Error;

use super::cdr::MsgType;
use super::episode::EpisodeMeta;
use super::mcap_episode::{
    list_episodes, mcap_file_name, read_episode_json, scan_mcap, write_episode_json, write_rosbag2_metadata,
    Compression, ScannedChannel, ScannedMessage, TopicCount, WriterOptions, QOS_PROFILE, RECORDING_MARKER,
};

/// Errors recovering an episode.
#[derive(Debug, Error)]
pub enum RecoveryError {
    /// A file operation failed.
    #[error("recovering {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The partial file holds nothing usable or the rewrite failed.
    #[error("recovering {path}: {message}")]
    Unusable {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// What recovery did for one episode.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveryReport {
    /// Episode folder.
    pub dir: PathBuf,
    /// Episode id.
    pub id: String,
    /// Messages kept.
    pub messages: u64,
    /// Chunks read.
    pub chunks: usize,
    /// Why reading stopped (the damaged tail), if it did before the data end.
    pub stopped: Option<String>,
}

/// The pid a `RECORDING` marker (`pid N`) names, when that process still runs.
pub fn live_recorder(marker: &str) -> Option<i32> {
    let pid: i32 = marker.trim().strip_prefix("pid ")?.trim().parse().ok()?;
    (pid > 0 && process_alive(pid)).then_some(pid)
}

/// Whether process `pid` exists (signal 0 delivers nothing; EPERM means it exists).
pub fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for the process.
    unsafe { libc::kill(pid, 0) == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) }
}

/// Removes the folder of an episode whose writer died before any message reached the disk (a
/// `RECORDING` marker from a process that is gone and no readable chunk): nothing is lost, and
/// the folder would block writing the episode again. Returns whether it was removed.
pub fn remove_empty_leftover(dir: &Path) -> std::io::Result<bool> {
    let Ok(marker) = std::fs::read_to_string(dir.join(RECORDING_MARKER)) else { return Ok(false) };
    if live_recorder(&marker).is_some() {
        return Ok(false);
    }
    let id = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let bytes = std::fs::read(dir.join(mcap_file_name(&id))).unwrap_or_default();
    if scan_mcap(&bytes, &mut HashMap::new(), |_, _| {}).chunks > 0 {
        return Ok(false);
    }
    std::fs::remove_dir_all(dir)?;
    tracing::warn!("{}: removed the empty leftover of an interrupted write", dir.display());
    Ok(true)
}

/// Episode folders under `root` that still carry the recording marker.
pub fn find_unfinished(root: &Path) -> Result<Vec<PathBuf>, RecoveryError> {
    let eps = list_episodes(root)
        .map_err(|e| RecoveryError::Unusable { path: root.to_path_buf(), message: e.to_string() })?;
    Ok(eps.into_iter().filter(|d| d.join(RECORDING_MARKER).exists()).collect())
}

/// Recovers every unfinished episode under `root`; one failing does not stop the others.
pub fn recover_all(root: &Path) -> Vec<Result<RecoveryReport, RecoveryError>> {
    match find_unfinished(root) {
        Ok(dirs) => dirs.iter().map(|d| recover_episode(d)).collect(),
        Err(e) => vec![Err(e)],
    }
}

/// Rebuilds one unfinished episode in place (write a new file, fsync, rename over the old one).
pub fn recover_episode(dir: &Path) -> Result<RecoveryReport, RecoveryError> {
    let id = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let mut meta = read_meta(dir, &id)?;
    let path = dir.join(mcap_file_name(&id));
    let bytes = read_partial(&path)?;
    let tmp = dir.join(format!("{}.recovering", mcap_file_name(&id)));
    let mut copy = Rewrite::create(&tmp)?;
    let end = scan_mcap(&bytes, &mut HashMap::new(), |chs, m| copy.message(chs, m));
    if let Some(e) = copy.error.take() {
        let _ = std::fs::remove_file(&tmp);
        return Err(unusable(&tmp, e));
    }
    if let Some(why) = end.stopped.as_ref().filter(|_| end.chunks == 0 && !end.complete) {
        tracing::warn!("{}: nothing recoverable ({why}); keeping an empty episode", path.display());
    }
    let bounds = copy.bounds;
    close_meta(&mut meta, bounds);
    let counts = copy.finish(&tmp)?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    let (start, stop) = bounds.unwrap_or((meta.start_ns, meta.start_ns));
    write_rosbag2_metadata(dir, &mcap_file_name(&id), &counts, start, stop).map_err(|e| unusable(dir, e))?;
    write_episode_json(dir, &meta).map_err(|e| unusable(dir, e))?;
    let marker = dir.join(RECORDING_MARKER);
    std::fs::remove_file(&marker).map_err(io(&marker))?;
    let messages = counts.iter().map(|c| c.count).sum();
    tracing::info!("recovered episode {id}: {messages} messages from {} chunks", end.chunks);
    Ok(RecoveryReport {
        dir: dir.to_path_buf(),
        id,
        messages,
        chunks: end.chunks,
        stopped: if end.complete { None } else { end.stopped },
    })
}

/// An I/O error on `path`, as a [`RecoveryError`].
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RecoveryError {
    let path = path.to_path_buf();
    move |source| RecoveryError::Io { path, source }
}

/// `path` holds nothing usable, or rewriting it failed with `e`.
fn unusable(path: &Path, e: impl std::fmt::Display) -> RecoveryError {
    RecoveryError::Unusable { path: path.to_path_buf(), message: e.to_string() }
}

/// The episode's `episode.json` (an empty one when unreadable), which must name episode `id`.
fn read_meta(dir: &Path, id: &str) -> Result<EpisodeMeta, RecoveryError> {
    let meta = match read_episode_json(dir) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("{}: episode.json unreadable ({e}); recovering with an empty one", dir.display());
            EpisodeMeta { id: id.to_string(), ..Default::default() }
        }
    };
    if meta.id != id {
        return Err(RecoveryError::Unusable {
            path: dir.to_path_buf(),
            message: format!("episode.json names episode `{}` but the folder is `{id}`", meta.id),
        });
    }
    Ok(meta)
}

/// The partial MCAP's bytes. A crash right after the folder was made can leave no (or an empty)
/// MCAP: it is recovered empty. Read, not mapped: a file shrinking under a map would raise SIGBUS.
fn read_partial(path: &Path) -> Result<Vec<u8>, RecoveryError> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io(path)(e)),
    }
}

/// Marks `meta` recovered; an episode without outcome or stop time is `aborted` at its last
/// message (`bounds`: first and last log time copied).
fn close_meta(meta: &mut EpisodeMeta, bounds: Option<(i64, i64)>) {
    meta.recovered = true;
    if meta.outcome.is_empty() {
        meta.outcome = "aborted".into();
    }
    if meta.stop_ns == 0 {
        meta.stop_ns = bounds.map_or(meta.start_ns, |(_, b)| b);
    }
}

/// The new MCAP being written from the messages a scan of the partial one delivers.
struct Rewrite {
    w: mcap::Writer<BufWriter<File>>,
    /// Channel id in the partial file -> channel id in the new one.
    channels: HashMap<u16, u16>,
    counts: BTreeMap<String, TopicCount>,
    /// First and last log time copied.
    bounds: Option<(i64, i64)>,
    /// The first write error; the copy stops there.
    error: Option<mcap::McapError>,
    seq: u32,
}

impl Rewrite {
    /// Starts the new file at `tmp`.
    fn create(tmp: &Path) -> Result<Self, RecoveryError> {
        let out = File::create(tmp).map_err(io(tmp))?;
        let opts = WriterOptions { compression: Compression::Zstd, ..Default::default() };
        let w =
            crate::dataset::mcap_episode::new_mcap_writer(BufWriter::new(out), &opts).map_err(|e| unusable(tmp, e))?;
        let (channels, counts) = (HashMap::new(), BTreeMap::new());
        Ok(Self { w, channels, counts, bounds: None, error: None, seq: 0 })
    }

    /// Copies one scanned message (nothing more after the first error).
    fn message(&mut self, chs: &HashMap<u16, ScannedChannel>, m: ScannedMessage<'_>) {
        if self.error.is_some() {
            return;
        }
        let Some(ch) = chs.get(&m.channel) else { return };
        if let Err(e) = self.copy(ch, &m) {
            self.error = Some(e);
        }
    }

    fn copy(&mut self, ch: &ScannedChannel, m: &ScannedMessage<'_>) -> Result<(), mcap::McapError> {
        let channel_id = match self.channels.get(&m.channel) {
            Some(&c) => c,
            None => self.add_channel(m.channel, ch)?,
        };
        let h = MessageHeader { channel_id, sequence: self.seq, log_time: m.log_time, publish_time: m.publish_time };
        self.seq = self.seq.wrapping_add(1);
        self.w.write_to_known_channel(&h, &m.data)?;
        self.counts.get_mut(&ch.topic).expect("added with channel").count += 1;
        let t = m.log_time as i64;
        self.bounds = Some(self.bounds.map_or((t, t), |(a, b)| (a.min(t), b.max(t))));
        Ok(())
    }

    /// Declares the partial file's channel `input` (and its schema) in the new file.
    fn add_channel(&mut self, input: u16, ch: &ScannedChannel) -> Result<u16, mcap::McapError> {
        let schema_text = MsgType::parse(&ch.type_name).map(|t| t.schema_text()).unwrap_or_default();
        let schema = self.w.add_schema(&ch.type_name, "ros2msg", schema_text.as_bytes())?;
        let qos = BTreeMap::from([("offered_qos_profiles".to_string(), QOS_PROFILE.to_string())]);
        let c = self.w.add_channel(schema, &ch.topic, &ch.encoding, &qos)?;
        self.channels.insert(input, c);
        let count = TopicCount { topic: ch.topic.clone(), type_name: ch.type_name.clone(), count: 0 };
        self.counts.insert(ch.topic.clone(), count);
        Ok(c)
    }

    /// Ends the file at `tmp` (a `recovered` metadata record, summary, footer) and syncs it;
    /// returns the messages copied per topic.
    fn finish(mut self, tmp: &Path) -> Result<Vec<TopicCount>, RecoveryError> {
        self.w
            .write_metadata(&mcap::records::Metadata {
                name: "vla_finetune.episode".into(),
                metadata: BTreeMap::from([("recovered".into(), "true".into())]),
            })
            .map_err(|e| unusable(tmp, e))?;
        self.w.finish().map_err(|e| unusable(tmp, e))?;
        let mut inner = self.w.into_inner();
        inner.flush().map_err(io(tmp))?;
        inner.get_ref().sync_all().map_err(io(tmp))?;
        Ok(self.counts.into_values().collect())
    }
}
