//! One episode on disk: `<root>/episodes/<id>/` holding `<id>_0.mcap` (raw CDR messages with their
//! `ros2msg` schemas, chunked and compressed), a rosbag2 `metadata.yaml` so `ros2 bag info/play`
//! open the folder, `episode.json` ([`EpisodeMeta`]) and `streams.yaml` (the stream mapping).
//! While recording, a `RECORDING` marker file says the episode is unfinished.
//!
//! [`EpisodeWriter`] writes it; [`McapEpisode`] reads it back as an [`EpisodeSource`].

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mcap::records::{MessageHeader, Record};
use serde::Serialize;
use thiserror::Error;

use super::cdr::{self, MsgType, RosMessage};
use super::episode::{Damage, EpisodeMeta, EpisodeSource, ImageError, RgbImage, SensorSeries, SourceError, StateSeries, Stamp};
use super::streams::{Role, StreamConfig, StreamSpec};

/// Name of the marker file present while an episode is being recorded.
pub const RECORDING_MARKER: &str = "RECORDING";
/// Episode metadata file name.
pub const EPISODE_JSON: &str = "episode.json";
/// Stream mapping file name.
pub const STREAMS_YAML: &str = "streams.yaml";
/// rosbag2 metadata file name.
pub const ROSBAG2_METADATA: &str = "metadata.yaml";
const MCAP_MAGIC: &[u8; 8] = b"\x89MCAP0\r\n";
/// QoS profile string stored per topic (reliable, volatile), as `ros2 bag record` writes it.
pub(crate) const QOS_PROFILE: &str = "- history: 3\n  depth: 0\n  reliability: 1\n  durability: 2\n  deadline:\n    sec: 9223372036\n    nsec: 854775807\n  lifespan:\n    sec: 9223372036\n    nsec: 854775807\n  liveliness: 1\n  liveliness_lease_duration:\n    sec: 9223372036\n    nsec: 854775807\n  avoid_ros_namespace_conventions: false\n";

/// Errors writing or reading an episode.
#[derive(Debug, Error)]
pub enum EpisodeError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// File or folder.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The MCAP library failed.
    #[error("{path}: MCAP: {detail}")]
    Mcap {
        /// File.
        path: PathBuf,
        /// The cause with its own causes (e.g. the I/O error under a compression error).
        detail: String,
        /// Cause.
        source: mcap::McapError,
    },
    /// A metadata file is malformed.
    #[error("{path}: {message}")]
    Meta {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A message could not be written because its topic or type does not match the mapping.
    #[error("topic `{topic}`: {message}")]
    Topic {
        /// Topic.
        topic: String,
        /// What is wrong.
        message: String,
    },
    /// The MCAP file is not readable.
    #[error("{path}: {message}")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn mcap_error(path: &Path, source: mcap::McapError) -> EpisodeError {
    let mut detail = source.to_string();
    let mut cause = std::error::Error::source(&source);
    while let Some(c) = cause {
        detail.push_str(": ");
        detail.push_str(&c.to_string());
        cause = c.source();
    }
    EpisodeError::Mcap { path: path.to_path_buf(), detail, source }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EpisodeError + '_ {
    move |source| EpisodeError::Io { path: path.to_path_buf(), source }
}

/// Chunk compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    /// zstd (level 1).
    Zstd,
    /// lz4.
    Lz4,
    /// No compression.
    None,
}

/// How episodes are written.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Chunk compression.
    pub compression: Compression,
    /// A chunk is closed when its uncompressed size passes this many bytes.
    pub chunk_bytes: u64,
    /// A chunk is closed and flushed to the OS at least this often (receive-time ns and
    /// wall-clock), bounding what a crash can lose.
    pub flush_interval_ns: i64,
    /// Disk quota for one episode's MCAP file; passing it stops the episode like a full disk.
    pub max_bytes: Option<u64>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions { compression: Compression::Zstd, chunk_bytes: 4 << 20, flush_interval_ns: 1_000_000_000, max_bytes: None }
    }
}

/// Per-topic message counts and time bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicCount {
    /// Topic.
    pub topic: String,
    /// ROS type name.
    pub type_name: String,
    /// Messages written.
    pub count: u64,
}

/// The folder of episode `id` under a dataset root.
pub fn episode_dir(root: &Path, id: &str) -> PathBuf {
    root.join("episodes").join(id)
}

/// The MCAP file name of episode `id`.
pub fn mcap_file_name(id: &str) -> String {
    format!("{id}_0.mcap")
}

/// A file that refuses to grow past a quota (reported as `StorageFull`), and refuses every write
/// once closed off after an error.
struct QuotaFile {
    inner: BufWriter<File>,
    pos: u64,
    end: u64,
    limit: u64,
    closed: Arc<AtomicBool>,
}

impl Write for QuotaFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("episode file closed after a write error"));
        }
        if self.pos + buf.len() as u64 > self.limit {
            return Err(std::io::Error::new(std::io::ErrorKind::StorageFull, format!("episode quota of {} bytes reached", self.limit)));
        }
        let n = self.inner.write(buf)?;
        self.pos += n as u64;
        self.end = self.end.max(self.pos);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("episode file closed after a write error"));
        }
        self.inner.flush()
    }
}

impl Seek for QuotaFile {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = self.inner.seek(to)?;
        Ok(self.pos)
    }
}

/// Writes one episode.
pub struct EpisodeWriter {
    dir: PathBuf,
    mcap_path: PathBuf,
    meta: EpisodeMeta,
    streams: StreamConfig,
    opts: WriterOptions,
    mcap: Option<mcap::Writer<QuotaFile>>,
    closed: Arc<AtomicBool>,
    /// An MCAP operation failed: the writer is not used again (see [`EpisodeWriter::dispose`]).
    failed: bool,
    channels: HashMap<String, (u16, MsgType)>,
    counts: BTreeMap<String, TopicCount>,
    bounds: Option<(i64, i64)>,
    sequence: u32,
    last_flush_ns: Option<i64>,
    last_flush_wall: Instant,
}

impl EpisodeWriter {
    /// Creates `<root>/episodes/<meta.id>/`, its marker, `episode.json`, `streams.yaml` and the MCAP.
    pub fn create(root: &Path, meta: EpisodeMeta, streams: &StreamConfig, opts: WriterOptions) -> Result<Self, EpisodeError> {
        if meta.id.is_empty() || meta.id.contains(['/', '\\']) || meta.id.starts_with('.') {
            return Err(EpisodeError::Meta { path: root.to_path_buf(), message: format!("invalid episode id `{}`", meta.id) });
        }
        let mut streams = streams.clone();
        streams.validate("episode stream mapping").map_err(|e| EpisodeError::Meta { path: root.to_path_buf(), message: e.to_string() })?;
        let dir = episode_dir(root, &meta.id);
        if dir.exists() {
            return Err(EpisodeError::Meta { path: dir, message: "episode folder already exists".into() });
        }
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let marker = dir.join(RECORDING_MARKER);
        std::fs::write(&marker, format!("pid {}\n", std::process::id())).map_err(io_err(&marker))?;
        write_episode_json(&dir, &meta)?;
        let sp = dir.join(STREAMS_YAML);
        std::fs::write(&sp, streams.to_yaml()).map_err(io_err(&sp))?;
        let mcap_path = dir.join(mcap_file_name(&meta.id));
        let file = File::create(&mcap_path).map_err(io_err(&mcap_path))?;
        let closed = Arc::new(AtomicBool::new(false));
        let quota = QuotaFile { inner: BufWriter::with_capacity(1 << 20, file), pos: 0, end: 0, limit: opts.max_bytes.unwrap_or(u64::MAX), closed: closed.clone() };
        let mcap = new_mcap_writer(quota, &opts).map_err(|source| mcap_error(&mcap_path, source))?;
        Ok(EpisodeWriter {
            dir,
            mcap_path,
            meta,
            streams,
            opts,
            mcap: Some(mcap),
            closed,
            failed: false,
            channels: HashMap::new(),
            counts: BTreeMap::new(),
            bounds: None,
            sequence: 0,
            last_flush_ns: None,
            last_flush_wall: Instant::now(),
        })
    }

    /// The episode folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Metadata as given at creation.
    pub fn meta(&self) -> &EpisodeMeta {
        &self.meta
    }

    /// Writes one message. `type_name` must match the mapping for `topic`; `recv_ns` is the log
    /// time, `stamp_ns` the publish time.
    pub fn write(&mut self, topic: &str, type_name: &str, cdr: &[u8], stamp_ns: i64, recv_ns: i64) -> Result<(), EpisodeError> {
        let channel = match self.channels.get(topic) {
            Some(&(id, t)) => {
                if t.name() != type_name && MsgType::parse(type_name).ok() != Some(t) {
                    return Err(EpisodeError::Topic { topic: topic.into(), message: format!("type `{type_name}` but the mapping says {}", t.name()) });
                }
                id
            }
            None => self.add_channel(topic, type_name)?,
        };
        let header = MessageHeader { channel_id: channel, sequence: self.sequence, log_time: recv_ns.max(0) as u64, publish_time: stamp_ns.max(0) as u64 };
        self.sequence = self.sequence.wrapping_add(1);
        self.mcap_op(|m| m.write_to_known_channel(&header, cdr))?;
        let c = self.counts.get_mut(topic).expect("channel registered");
        c.count += 1;
        self.bounds = Some(match self.bounds {
            None => (recv_ns, recv_ns),
            Some((a, b)) => (a.min(recv_ns), b.max(recv_ns)),
        });
        let due_by_data = match self.last_flush_ns {
            None => {
                self.last_flush_ns = Some(recv_ns);
                false
            }
            Some(t) => recv_ns - t >= self.opts.flush_interval_ns,
        };
        if due_by_data || self.last_flush_wall.elapsed().as_nanos() as i64 >= self.opts.flush_interval_ns {
            self.flush()?;
            self.last_flush_ns = Some(recv_ns);
        }
        Ok(())
    }

    /// Closes the current chunk and hands everything written so far to the OS.
    pub fn flush(&mut self) -> Result<(), EpisodeError> {
        self.last_flush_wall = Instant::now();
        self.mcap_op(|m| m.flush())
    }

    /// Runs one operation on the MCAP writer; after a failure every later one is refused, as the
    /// crate's writer may be left without its file and panic when used.
    fn mcap_op<T>(&mut self, f: impl FnOnce(&mut mcap::Writer<QuotaFile>) -> Result<T, mcap::McapError>) -> Result<T, EpisodeError> {
        let path = &self.mcap_path;
        let mcap = match self.mcap.as_mut() {
            Some(m) if !self.failed => m,
            _ => return Err(EpisodeError::Corrupt { path: path.clone(), message: "an earlier write to the episode file failed; nothing more is written to it".into() }),
        };
        f(mcap).map_err(|source| {
            self.failed = true;
            mcap_error(path, source)
        })
    }

    /// Lets go of the MCAP writer. Dropping it finishes the file, which after a failed operation
    /// can panic inside the mcap crate ("self.writer should never be None"): such a writer is
    /// leaked instead (its file stays open until the process ends), the file being closed off.
    fn dispose(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
        if let Some(m) = self.mcap.take() {
            if self.failed {
                std::mem::forget(m);
            } else {
                drop(m);
            }
        }
    }

    fn add_channel(&mut self, topic: &str, type_name: &str) -> Result<u16, EpisodeError> {
        let spec = self
            .streams
            .find_topic(topic)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| EpisodeError::Topic { topic: topic.into(), message: "not in the stream mapping".into() })?;
        let t = MsgType::parse(type_name).map_err(|e| EpisodeError::Topic { topic: topic.into(), message: e.to_string() })?;
        if t != spec.kind() {
            return Err(EpisodeError::Topic { topic: topic.into(), message: format!("type `{type_name}` but the mapping says {}", spec.msg_type) });
        }
        let schema = self.mcap_op(|m| m.add_schema(t.name(), "ros2msg", t.schema_text().as_bytes()))?;
        let md = BTreeMap::from([("offered_qos_profiles".to_string(), QOS_PROFILE.to_string())]);
        let id = self.mcap_op(|m| m.add_channel(schema, topic, "cdr", &md))?;
        self.channels.insert(topic.into(), (id, t));
        self.counts.insert(topic.into(), TopicCount { topic: topic.into(), type_name: t.name().into(), count: 0 });
        Ok(id)
    }

    /// Rewrites `episode.json` with the drops counted so far, so that a crash keeps them.
    pub fn save_progress(&mut self, drops: BTreeMap<String, u64>) -> Result<(), EpisodeError> {
        if drops == self.meta.drops {
            return Ok(());
        }
        self.meta.drops = drops;
        write_episode_json(&self.dir, &self.meta)
    }

    /// Messages written per topic so far.
    pub fn counts(&self) -> Vec<TopicCount> {
        self.counts.values().cloned().collect()
    }

    /// Finishes the MCAP (summary, footer), syncs it, writes `metadata.yaml` and the final
    /// `episode.json` (with `outcome`, `stop_ns` and `drops`) and removes the marker.
    pub fn finish(mut self, outcome: &str, stop_ns: i64, drops: BTreeMap<String, u64>) -> Result<EpisodeMeta, EpisodeError> {
        self.meta.outcome = outcome.to_string();
        self.meta.stop_ns = stop_ns;
        self.meta.drops = drops;
        let md = mcap::records::Metadata { name: "vla_finetune.episode".into(), metadata: meta_as_map(&self.meta) };
        self.mcap_op(|m| m.write_metadata(&md))?;
        self.mcap_op(|m| m.finish())?;
        let mut quota = self.mcap.take().expect("present: mcap_op succeeded").into_inner();
        quota.flush().map_err(io_err(&self.mcap_path))?;
        quota.inner.get_ref().sync_all().map_err(io_err(&self.mcap_path))?;
        let counts: Vec<TopicCount> = self.counts.values().cloned().collect();
        let (start, end) = self.bounds.unwrap_or((self.meta.start_ns, self.meta.start_ns));
        write_rosbag2_metadata(&self.dir, &mcap_file_name(&self.meta.id), &counts, start, end)?;
        write_episode_json(&self.dir, &self.meta)?;
        let marker = self.dir.join(RECORDING_MARKER);
        std::fs::remove_file(&marker).map_err(io_err(&marker))?;
        Ok(std::mem::take(&mut self.meta))
    }

    /// Gives up on the MCAP after a write error without writing anything more to it: the file
    /// keeps every chunk flushed before the error, and the marker stays so recovery rebuilds it.
    /// `episode.json` is updated with `outcome` when possible.
    pub fn abandon(mut self, outcome: &str, stop_ns: i64, drops: BTreeMap<String, u64>) -> EpisodeMeta {
        // Dropping an mcap::Writer tries to finish the file: `dispose` closes the file off first
        // so nothing more is written to a failing disk.
        self.dispose();
        self.meta.outcome = outcome.to_string();
        self.meta.stop_ns = stop_ns;
        self.meta.drops = drops;
        if let Err(e) = write_episode_json(&self.dir, &self.meta) {
            tracing::error!("episode {}: cannot update episode.json after a write error: {e}", self.meta.id);
        }
        self.meta.clone()
    }
}

impl Drop for EpisodeWriter {
    fn drop(&mut self) {
        // An episode dropped without finish/abandon (a panic elsewhere) is left exactly as a crash
        // would leave it; recovery handles it.
        self.dispose();
    }
}

pub(crate) fn new_mcap_writer<W: Write + Seek>(w: W, opts: &WriterOptions) -> Result<mcap::Writer<W>, mcap::McapError> {
    let compression = match opts.compression {
        Compression::Zstd => Some(mcap::Compression::Zstd),
        Compression::Lz4 => Some(mcap::Compression::Lz4),
        Compression::None => None,
    };
    mcap::WriteOptions::new()
        .profile("ros2")
        .library(concat!("vla_finetune-", env!("CARGO_PKG_VERSION")))
        .compression(compression)
        .compression_level(1)
        .compression_threads(0)
        .chunk_size(Some(opts.chunk_bytes))
        .create(w)
}

fn meta_as_map(meta: &EpisodeMeta) -> BTreeMap<String, String> {
    let v = serde_json::to_value(meta).expect("metadata serializes");
    v.as_object()
        .expect("struct")
        .iter()
        .map(|(k, v)| (k.clone(), if let Some(s) = v.as_str() { s.to_string() } else { v.to_string() }))
        .collect()
}

/// Writes `episode.json` atomically.
pub fn write_episode_json(dir: &Path, meta: &EpisodeMeta) -> Result<(), EpisodeError> {
    write_atomic(&dir.join(EPISODE_JSON), &serde_json::to_vec_pretty(meta).expect("metadata serializes"))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EpisodeError> {
    crate::atomic_file::write(path, bytes).map_err(|e| {
        let (path, source) = e.into_parts();
        EpisodeError::Io { path, source }
    })
}

/// Reads `episode.json`.
pub fn read_episode_json(dir: &Path) -> Result<EpisodeMeta, EpisodeError> {
    let path = dir.join(EPISODE_JSON);
    let text = std::fs::read(&path).map_err(io_err(&path))?;
    serde_json::from_slice(&text).map_err(|e| EpisodeError::Meta { path, message: format!("not a valid episode metadata JSON: {e}") })
}

#[derive(Serialize)]
struct Nanos {
    nanoseconds: i64,
}
#[derive(Serialize)]
struct SinceEpoch {
    nanoseconds_since_epoch: i64,
}
#[derive(Serialize)]
struct TopicMetadata {
    name: String,
    #[serde(rename = "type")]
    type_name: String,
    serialization_format: String,
    offered_qos_profiles: String,
}
#[derive(Serialize)]
struct TopicWithCount {
    topic_metadata: TopicMetadata,
    message_count: u64,
}
#[derive(Serialize)]
struct FileInfo {
    path: String,
    starting_time: SinceEpoch,
    duration: Nanos,
    message_count: u64,
}
#[derive(Serialize)]
struct BagInfo {
    version: u32,
    storage_identifier: String,
    duration: Nanos,
    starting_time: SinceEpoch,
    message_count: u64,
    topics_with_message_count: Vec<TopicWithCount>,
    compression_format: String,
    compression_mode: String,
    relative_file_paths: Vec<String>,
    files: Vec<FileInfo>,
}
#[derive(Serialize)]
struct MetadataFile {
    rosbag2_bagfile_information: BagInfo,
}

/// Writes a rosbag2 (version 5) `metadata.yaml` describing one MCAP file in `dir`.
pub fn write_rosbag2_metadata(dir: &Path, file_name: &str, counts: &[TopicCount], start_ns: i64, end_ns: i64) -> Result<(), EpisodeError> {
    let total: u64 = counts.iter().map(|c| c.count).sum();
    let duration = (end_ns - start_ns).max(0);
    let info = MetadataFile {
        rosbag2_bagfile_information: BagInfo {
            version: 5,
            storage_identifier: "mcap".into(),
            duration: Nanos { nanoseconds: duration },
            starting_time: SinceEpoch { nanoseconds_since_epoch: start_ns },
            message_count: total,
            topics_with_message_count: counts
                .iter()
                .map(|c| TopicWithCount {
                    topic_metadata: TopicMetadata {
                        name: c.topic.clone(),
                        type_name: c.type_name.clone(),
                        serialization_format: "cdr".into(),
                        offered_qos_profiles: QOS_PROFILE.into(),
                    },
                    message_count: c.count,
                })
                .collect(),
            compression_format: String::new(),
            compression_mode: String::new(),
            relative_file_paths: vec![file_name.into()],
            files: vec![FileInfo {
                path: file_name.into(),
                starting_time: SinceEpoch { nanoseconds_since_epoch: start_ns },
                duration: Nanos { nanoseconds: duration },
                message_count: total,
            }],
        },
    };
    write_atomic(&dir.join(ROSBAG2_METADATA), serde_yaml::to_string(&info).expect("metadata serializes").as_bytes())
}

/// One message found while scanning an MCAP file.
#[derive(Debug)]
pub struct ScannedMessage<'a> {
    /// Channel id.
    pub channel: u16,
    /// Log (receive) time, ns.
    pub log_time: u64,
    /// Publish time, ns.
    pub publish_time: u64,
    /// CDR bytes.
    pub data: std::borrow::Cow<'a, [u8]>,
    /// Index of the chunk holding it, `None` for a message outside chunks.
    pub chunk: Option<usize>,
    /// Position among the messages of its chunk.
    pub ordinal: usize,
}

/// A channel and its schema name, found while scanning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedChannel {
    /// Topic.
    pub topic: String,
    /// Schema (type) name.
    pub type_name: String,
    /// Message encoding.
    pub encoding: String,
}

/// How a scan ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanEnd {
    /// True when the data section ended properly (a DataEnd or Footer record was reached).
    pub complete: bool,
    /// Why the scan stopped early (truncation, bad CRC...), when it did.
    pub stopped: Option<String>,
    /// Chunks read successfully.
    pub chunks: usize,
    /// Byte offset (in the file) of each good chunk record.
    pub chunk_offsets: Vec<usize>,
    /// Records skipped as damaged (bad CRC, bad compression, unparsable) while their framing
    /// held, so the scan went on past them: why, per record.
    pub lost: Vec<String>,
    /// Bytes of those skipped records.
    pub lost_bytes: usize,
    /// Byte offset where the scan ended (the data-end record, or where the file stopped making sense).
    pub end_offset: usize,
}

/// Reads an MCAP data section record by record, handing every message of every valid chunk to
/// `on_message` in file order. A record that fails to parse or decompress (bad CRC) while its
/// length still fits the file is skipped and listed in [`ScanEnd::lost`]; the scan stops at the
/// first truncated record (what a crash leaves) instead of failing: everything before it is
/// delivered.
pub fn scan_mcap<'a>(
    buf: &'a [u8],
    channels: &mut HashMap<u16, ScannedChannel>,
    mut on_message: impl FnMut(&HashMap<u16, ScannedChannel>, ScannedMessage<'a>),
) -> ScanEnd {
    let mut end = ScanEnd { complete: false, stopped: None, chunks: 0, chunk_offsets: Vec::new(), lost: Vec::new(), lost_bytes: 0, end_offset: 0 };
    if buf.len() < 8 || &buf[..8] != MCAP_MAGIC {
        end.stopped = Some("not an MCAP file (bad magic)".into());
        return end;
    }
    let mut schemas: HashMap<u16, String> = HashMap::new();
    top_level_channels(buf, &mut schemas, channels);
    let mut pos = 8usize;
    let mut loose = 0usize;
    loop {
        end.end_offset = pos;
        if pos == buf.len() {
            end.stopped = Some(format!("file ends at byte {pos} without a data-end record"));
            return end;
        }
        if buf.len() - pos < 9 {
            end.stopped = Some(format!("truncated record header at byte {pos}"));
            return end;
        }
        let op = buf[pos];
        let len = u64::from_le_bytes(buf[pos + 1..pos + 9].try_into().expect("8 bytes"));
        if len > (buf.len() - pos - 9) as u64 {
            end.stopped = Some(format!("record at byte {pos} (op 0x{op:02x}) is truncated: {len} bytes announced, {} present", buf.len() - pos - 9));
            return end;
        }
        let body = &buf[pos + 9..pos + 9 + len as usize];
        let record = match mcap::read::parse_record(op, body) {
            Ok(r) => r,
            Err(e) => {
                end.lost.push(format!("record at byte {pos} (op 0x{op:02x}) does not parse: {e}"));
                end.lost_bytes += 9 + body.len();
                pos += 9 + body.len();
                continue;
            }
        };
        match record {
            Record::Chunk { header, data } => {
                // Decode the whole chunk first so a damaged chunk contributes nothing.
                let inner = match decode_chunk(&header, &data) {
                    Ok(records) => records,
                    Err(e) => {
                        end.lost.push(format!("chunk at byte {pos} is damaged: {e}"));
                        end.lost_bytes += 9 + body.len();
                        pos += 9 + body.len();
                        continue;
                    }
                };
                let chunk = end.chunks;
                let mut ordinal = 0;
                for r in inner {
                    match r {
                        Record::Schema { header, .. } => {
                            schemas.insert(header.id, header.name);
                        }
                        Record::Channel(c) => {
                            let type_name = schemas.get(&c.schema_id).cloned().unwrap_or_default();
                            channels.insert(c.id, ScannedChannel { topic: c.topic, type_name, encoding: c.message_encoding });
                        }
                        Record::Message { header, data } => {
                            let data = std::borrow::Cow::Owned(data.into_owned());
                            on_message(channels, ScannedMessage { channel: header.channel_id, log_time: header.log_time, publish_time: header.publish_time, data, chunk: Some(chunk), ordinal });
                            ordinal += 1;
                        }
                        _ => {}
                    }
                }
                end.chunks += 1;
                end.chunk_offsets.push(pos);
            }
            Record::Schema { header, .. } => {
                schemas.insert(header.id, header.name);
            }
            Record::Channel(c) => {
                let type_name = schemas.get(&c.schema_id).cloned().unwrap_or_default();
                channels.insert(c.id, ScannedChannel { topic: c.topic, type_name, encoding: c.message_encoding });
            }
            Record::Message { header, data } => {
                on_message(channels, ScannedMessage { channel: header.channel_id, log_time: header.log_time, publish_time: header.publish_time, data, chunk: None, ordinal: loose });
                loose += 1;
            }
            Record::DataEnd(_) | Record::Footer(_) => {
                end.complete = true;
                return end;
            }
            _ => {}
        }
        pos += 9 + len as usize;
    }
}

/// Largest uncompressed chunk accepted (the recorder closes chunks at a few MiB).
const MAX_CHUNK_BYTES: u64 = 1 << 30;

/// Decompresses a chunk, checks its size and CRC, then parses its records, every length checked
/// against what is there. Done here rather than by the mcap crate's chunk reader, which trusts
/// lengths read from not yet CRC-checked data and panics ("capacity overflow") on a damaged one.
fn decode_chunk(header: &mcap::records::ChunkHeader, data: &[u8]) -> Result<Vec<Record<'static>>, String> {
    let size = header.uncompressed_size;
    if size > MAX_CHUNK_BYTES {
        return Err(format!("announces {size} uncompressed bytes; expected at most {MAX_CHUNK_BYTES}"));
    }
    let raw = match header.compression.as_str() {
        "" => data.to_vec(),
        "zstd" => zstd::bulk::decompress(data, size as usize).map_err(|e| format!("zstd: {e}"))?,
        "lz4" => {
            let mut out = Vec::new();
            let dec = lz4::Decoder::new(data).map_err(|e| format!("lz4: {e}"))?;
            std::io::Read::read_to_end(&mut std::io::Read::take(dec, size + 1), &mut out).map_err(|e| format!("lz4: {e}"))?;
            out
        }
        other => return Err(format!("compression `{other}`; expected zstd, lz4 or none")),
    };
    if raw.len() as u64 != size {
        return Err(format!("decompresses to {} bytes; the header says {size}", raw.len()));
    }
    let crc = crc32fast::hash(&raw);
    if header.uncompressed_crc != 0 && crc != header.uncompressed_crc {
        return Err(format!("CRC {crc:08x} of the content; the header says {:08x}", header.uncompressed_crc));
    }
    let mut records = Vec::new();
    let mut pos = 0usize;
    while pos < raw.len() {
        if raw.len() - pos < 9 {
            return Err(format!("truncated record header at byte {pos} of the content"));
        }
        let len = u64::from_le_bytes(raw[pos + 1..pos + 9].try_into().expect("8 bytes"));
        if len > (raw.len() - pos - 9) as u64 {
            return Err(format!("record at byte {pos} of the content announces {len} bytes, {} present", raw.len() - pos - 9));
        }
        let body = &raw[pos + 9..pos + 9 + len as usize];
        records.push(mcap::read::parse_record(raw[pos], body).map_err(|e| format!("record at byte {pos} of the content: {e}"))?.into_owned());
        pos += 9 + len as usize;
    }
    Ok(records)
}

/// Reads the schema and channel records outside chunks (a finished file repeats them in its
/// summary), so the messages of later chunks stay readable when the chunk that first declared
/// their channel is damaged. Walks the record framing only; stops where it breaks.
fn top_level_channels(buf: &[u8], schemas: &mut HashMap<u16, String>, channels: &mut HashMap<u16, ScannedChannel>) {
    let mut pos = 8usize;
    let mut found = Vec::new();
    while buf.len().saturating_sub(pos) >= 9 {
        let len = u64::from_le_bytes(buf[pos + 1..pos + 9].try_into().expect("8 bytes"));
        if len > (buf.len() - pos - 9) as u64 {
            break;
        }
        let (op, body) = (buf[pos], &buf[pos + 9..pos + 9 + len as usize]);
        if op == 0x03 || op == 0x04 {
            if let Ok(r) = mcap::read::parse_record(op, body) {
                found.push(r);
            }
        }
        pos += 9 + len as usize;
    }
    for r in &found {
        if let Record::Schema { header, .. } = r {
            schemas.insert(header.id, header.name.clone());
        }
    }
    for r in found {
        if let Record::Channel(c) = r {
            let type_name = schemas.get(&c.schema_id).cloned().unwrap_or_default();
            channels.insert(c.id, ScannedChannel { topic: c.topic, type_name, encoding: c.message_encoding });
        }
    }
}

/// Where a camera frame lives in the file.
#[derive(Debug, Clone, Copy)]
struct FrameRef {
    stamp: Stamp,
    chunk: Option<usize>,
    ordinal: usize,
}

/// A message met while indexing: topic, type, header stamp, chunk (if any), ordinal, CDR bytes.
type IndexedMessage = (String, MsgType, Stamp, Option<usize>, usize, Vec<u8>);

/// A recorded episode read back from disk.
pub struct McapEpisode {
    dir: PathBuf,
    mcap_path: PathBuf,
    meta: EpisodeMeta,
    streams: StreamConfig,
    /// The whole MCAP file, read into memory: a map would turn a file truncated under the reader
    /// into SIGBUS.
    map: Vec<u8>,
    chunk_offsets: Vec<usize>,
    frames: Vec<(StreamSpec, Vec<FrameRef>)>,
    sensors: Vec<(String, SensorSeries)>,
    state: StateSeries,
    commands: Option<StateSeries>,
    skipped: BTreeMap<String, BTreeMap<String, u64>>,
    counts: BTreeMap<String, u64>,
    scan: ScanEnd,
    /// The last decompressed chunk: (chunk index, message payloads in order).
    cache: Mutex<Option<(usize, Vec<Vec<u8>>)>>,
}

impl McapEpisode {
    /// Opens `<dir>` (an episode folder) and indexes every stream of its mapping. Messages that
    /// cannot be used (undecodable, wrong channel count, non-finite sensor values, step/size
    /// mismatch, stamps not increasing) are skipped and counted per topic and reason in
    /// [`McapEpisode::skipped`]. A file truncated by a crash is read up to its last good chunk
    /// ([`McapEpisode::complete`] is then false); a damaged chunk is skipped; both are reported by
    /// [`EpisodeSource::damage`]. The file is read into memory, not mapped.
    pub fn open(dir: &Path) -> Result<McapEpisode, EpisodeError> {
        let meta = read_episode_json(dir)?;
        let sp = dir.join(STREAMS_YAML);
        let streams = StreamConfig::load(&sp).map_err(|e| EpisodeError::Meta { path: sp.clone(), message: e.to_string() })?;
        let mcap_path = dir.join(mcap_file_name(&meta.id));
        let map = std::fs::read(&mcap_path).map_err(io_err(&mcap_path))?;
        let mut ep = McapEpisode {
            dir: dir.to_path_buf(),
            mcap_path,
            meta,
            streams: streams.clone(),
            map,
            chunk_offsets: Vec::new(),
            frames: streams.cameras.iter().map(|c| (c.clone(), Vec::new())).collect(),
            sensors: streams.sensors.iter().map(|s| (s.name.clone(), SensorSeries { channels: s.channels.unwrap_or(0), ..Default::default() })).collect(),
            state: StateSeries::default(),
            commands: streams.command.as_ref().map(|_| StateSeries::default()),
            skipped: BTreeMap::new(),
            counts: BTreeMap::new(),
            scan: ScanEnd { complete: false, stopped: None, chunks: 0, chunk_offsets: Vec::new(), lost: Vec::new(), lost_bytes: 0, end_offset: 0 },
            cache: Mutex::new(None),
        };
        ep.index()?;
        Ok(ep)
    }

    fn index(&mut self) -> Result<(), EpisodeError> {
        let map: &[u8] = &self.map;
        let mut channels = HashMap::new();
        let mut msgs: Vec<IndexedMessage> = Vec::new();
        let mut skipped: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let mut skip = |topic: &str, reason: &str| *skipped.entry(topic.to_string()).or_default().entry(reason.to_string()).or_default() += 1;
        let roles: HashMap<String, (Role, MsgType)> = self.streams.all().into_iter().map(|(r, s)| (s.topic.clone(), (r, s.kind()))).collect();
        let scan = scan_mcap(map, &mut channels, |chs, m| {
            let Some(ch) = chs.get(&m.channel) else { return };
            let Some(&(role, t)) = roles.get(&ch.topic) else { return };
            if MsgType::parse(&ch.type_name).ok() != Some(t) {
                skip(&ch.topic, "type_mismatch");
                return;
            }
            let stamp_ns = match t.header_stamp(&m.data) {
                Ok(Some(s)) => s,
                Ok(None) => m.log_time as i64,
                Err(_) => {
                    skip(&ch.topic, "decode_error");
                    return;
                }
            };
            let stamp = Stamp { stamp_ns, recv_ns: m.log_time as i64 };
            // Camera payloads stay in the file; the rest is decoded now.
            if role == Role::Camera {
                if let Err(reason) = check_camera_message(t, &m.data) {
                    skip(&ch.topic, reason);
                    return;
                }
            }
            let data = if role == Role::Camera { Vec::new() } else { m.data.into_owned() };
            msgs.push((ch.topic.clone(), t, stamp, m.chunk, m.ordinal, data));
        });
        if scan.chunks == 0 && (!scan.complete || !scan.lost.is_empty()) {
            let why = scan.lost.iter().chain(&scan.stopped).cloned().collect::<Vec<_>>().join("; ");
            return Err(EpisodeError::Corrupt { path: self.mcap_path.clone(), message: format!("no readable chunk: {}", if why.is_empty() { "no data" } else { &why }) });
        }
        let mut last_stamp: HashMap<String, i64> = HashMap::new();
        for (topic, t, stamp, chunk, ordinal, data) in msgs {
            if let Some(prev) = last_stamp.get(&topic) {
                if stamp.stamp_ns <= *prev {
                    skip(&topic, "non_monotonic_stamp");
                    continue;
                }
            }
            let (role, spec) = self.streams.find_topic(&topic).expect("filtered above");
            let ok = match role {
                Role::Camera => {
                    let f = self.frames.iter_mut().find(|(s, _)| s.topic == topic).expect("camera in mapping");
                    f.1.push(FrameRef { stamp, chunk, ordinal });
                    Ok(())
                }
                Role::Sensor => {
                    let s = self.sensors.iter_mut().find(|(n, _)| *n == spec.name).expect("sensor in mapping");
                    push_sensor(&mut s.1, t, spec.channels, stamp, &data)
                }
                Role::State => push_state(&mut self.state, t, stamp, &data),
                Role::Command => push_state(self.commands.as_mut().expect("command configured"), t, stamp, &data),
            };
            match ok {
                Ok(()) => {
                    last_stamp.insert(topic.clone(), stamp.stamp_ns);
                    *self.counts.entry(topic).or_default() += 1;
                }
                Err(reason) => skip(&topic, reason),
            }
        }
        self.skipped = skipped;
        self.chunk_offsets = scan.chunk_offsets.clone();
        self.scan = scan;
        Ok(())
    }

    /// The episode folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The stream mapping the episode was recorded with.
    pub fn streams(&self) -> &StreamConfig {
        &self.streams
    }

    /// Messages skipped while indexing, by topic then reason.
    pub fn skipped(&self) -> &BTreeMap<String, BTreeMap<String, u64>> {
        &self.skipped
    }

    /// Usable messages per topic.
    pub fn counts(&self) -> &BTreeMap<String, u64> {
        &self.counts
    }

    /// True when the MCAP data section is complete (not a truncated file).
    pub fn complete(&self) -> bool {
        self.scan.complete
    }

    fn chunk_messages(&self, chunk: usize) -> Result<Vec<Vec<u8>>, EpisodeError> {
        let off = self.chunk_offsets[chunk];
        let buf: &[u8] = &self.map;
        let len = u64::from_le_bytes(buf[off + 1..off + 9].try_into().expect("8 bytes")) as usize;
        let corrupt = |message: String| EpisodeError::Corrupt { path: self.mcap_path.clone(), message };
        let Record::Chunk { header, data } = mcap::read::parse_record(buf[off], &buf[off + 9..off + 9 + len]).map_err(|e| corrupt(e.to_string()))? else {
            return Err(corrupt(format!("no chunk at byte {off}")));
        };
        let records = decode_chunk(&header, &data).map_err(corrupt)?;
        Ok(records.into_iter().filter_map(|r| if let Record::Message { data, .. } = r { Some(data.into_owned()) } else { None }).collect())
    }

    fn raw_message(&self, f: &FrameRef) -> Result<Vec<u8>, EpisodeError> {
        match f.chunk {
            Some(c) => {
                let mut cache = self.cache.lock().expect("cache lock");
                if cache.as_ref().map(|(i, _)| *i) != Some(c) {
                    *cache = Some((c, self.chunk_messages(c)?));
                }
                let msgs = &cache.as_ref().expect("filled").1;
                msgs.get(f.ordinal).cloned().ok_or_else(|| EpisodeError::Corrupt { path: self.mcap_path.clone(), message: format!("chunk {c} has no message {}", f.ordinal) })
            }
            None => {
                let mut found = None;
                let mut chs = HashMap::new();
                scan_mcap(&self.map, &mut chs, |_, m| {
                    if m.chunk.is_none() && m.ordinal == f.ordinal {
                        found = Some(m.data.into_owned());
                    }
                });
                found.ok_or_else(|| EpisodeError::Corrupt { path: self.mcap_path.clone(), message: format!("unchunked message {} vanished", f.ordinal) })
            }
        }
    }
}

/// Validates an image message without decoding its pixels.
fn check_camera_message(t: MsgType, data: &[u8]) -> Result<(), &'static str> {
    match t {
        MsgType::Image => {
            let v = cdr::ImageView::parse(data).map_err(|_| "decode_error")?;
            let bpp = bytes_per_pixel(&v.encoding).ok_or("unsupported_encoding")?;
            if v.width == 0 || v.height == 0 || (v.step as u64) < v.width as u64 * bpp as u64 || v.data.len() as u64 != v.step as u64 * v.height as u64 {
                return Err("image_size_mismatch");
            }
            Ok(())
        }
        MsgType::CompressedImage => {
            let c = cdr::CompressedImage::decode(data).map_err(|_| "decode_error")?;
            let f = c.format.to_ascii_lowercase();
            if f.contains("jpeg") || f.contains("jpg") || f.contains("png") {
                Ok(())
            } else {
                Err("unsupported_encoding")
            }
        }
        _ => Err("type_mismatch"),
    }
}

fn bytes_per_pixel(encoding: &str) -> Option<usize> {
    match encoding {
        "rgb8" | "bgr8" => Some(3),
        "mono8" => Some(1),
        "rgba8" | "bgra8" => Some(4),
        _ => None,
    }
}

/// Decodes an Image or CompressedImage message to RGB8.
pub fn decode_image(t: MsgType, data: &[u8]) -> Result<RgbImage, ImageError> {
    match t {
        MsgType::Image => {
            let v = cdr::ImageView::parse(data)?;
            let bpp = bytes_per_pixel(&v.encoding).ok_or_else(|| ImageError::Encoding(v.encoding.clone()))?;
            let (w, h, step) = (v.width as usize, v.height as usize, v.step as usize);
            if step < w * bpp || v.data.len() != step * h {
                return Err(ImageError::RawSize { width: v.width, height: v.height, encoding: v.encoding.clone(), step: v.step, need: step * h, have: v.data.len() });
            }
            let mut out = Vec::with_capacity(w * h * 3);
            for row in v.data.chunks_exact(step) {
                let row = &row[..w * bpp];
                match v.encoding.as_str() {
                    "rgb8" => out.extend_from_slice(row),
                    "bgr8" => row.chunks_exact(3).for_each(|p| out.extend_from_slice(&[p[2], p[1], p[0]])),
                    "mono8" => row.iter().for_each(|&g| out.extend_from_slice(&[g, g, g])),
                    "rgba8" => row.chunks_exact(4).for_each(|p| out.extend_from_slice(&p[..3])),
                    _ => row.chunks_exact(4).for_each(|p| out.extend_from_slice(&[p[2], p[1], p[0]])),
                }
            }
            Ok(RgbImage { width: v.width, height: v.height, data: out })
        }
        MsgType::CompressedImage => {
            let c = cdr::CompressedImage::decode(data)?;
            let img = image::load_from_memory(&c.data).map_err(|source| ImageError::Compressed { format: c.format.clone(), source })?.to_rgb8();
            Ok(RgbImage { width: img.width(), height: img.height(), data: img.into_raw() })
        }
        other => Err(ImageError::NotImage(other.name())),
    }
}

fn push_sensor(s: &mut SensorSeries, t: MsgType, expected: Option<usize>, stamp: Stamp, data: &[u8]) -> Result<(), &'static str> {
    let values: Vec<f32> = match t {
        MsgType::SensorFrame => {
            let f = cdr::SensorFrame::decode(data).map_err(|_| "decode_error")?;
            if f.values.len() != f.channels as usize {
                return Err("channel_mismatch");
            }
            f.values
        }
        MsgType::Float32MultiArray => cdr::Float32MultiArray::decode(data).map_err(|_| "decode_error")?.data,
        MsgType::WrenchStamped => {
            let w = cdr::WrenchStamped::decode(data).map_err(|_| "decode_error")?;
            w.force.iter().chain(w.torque.iter()).map(|&v| v as f32).collect()
        }
        _ => return Err("type_mismatch"),
    };
    let want = expected.unwrap_or(if s.stamps.is_empty() { values.len() } else { s.channels });
    if values.len() != want || values.is_empty() {
        return Err("channel_mismatch");
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err("non_finite");
    }
    s.channels = want;
    s.stamps.push(stamp);
    s.values.extend_from_slice(&values);
    Ok(())
}

/// State value names of a `geometry_msgs/PoseStamped` stream (position in mm, angles in degrees).
pub const POSE_STATE_NAMES: [&str; 6] = ["x", "y", "z", "roll", "pitch", "yaw"];
/// Units of [`POSE_STATE_NAMES`].
pub const POSE_STATE_UNITS: [&str; 6] = ["mm", "mm", "mm", "deg", "deg", "deg"];

/// Converts a quaternion `[x, y, z, w]` to roll, pitch, yaw in degrees (ZYX convention).
pub fn quaternion_to_rpy_deg(q: [f64; 4]) -> [f64; 3] {
    let uq = nalgebra::UnitQuaternion::from_quaternion(nalgebra::Quaternion::new(q[3], q[0], q[1], q[2]));
    let (r, p, y) = uq.euler_angles();
    [r.to_degrees(), p.to_degrees(), y.to_degrees()]
}

fn push_state(s: &mut StateSeries, t: MsgType, stamp: Stamp, data: &[u8]) -> Result<(), &'static str> {
    let (names, angles, values): (Vec<String>, Vec<bool>, Vec<f64>) = match t {
        MsgType::PoseStamped => {
            let p = cdr::PoseStamped::decode(data).map_err(|_| "decode_error")?;
            let n = p.orientation.iter().map(|v| v * v).sum::<f64>().sqrt();
            if !(n > 0.5 && n < 1.5) {
                return Err("invalid_quaternion");
            }
            let rpy = quaternion_to_rpy_deg(p.orientation);
            (
                POSE_STATE_NAMES.iter().map(|s| s.to_string()).collect(),
                vec![false, false, false, true, true, true],
                vec![p.position[0] * 1000.0, p.position[1] * 1000.0, p.position[2] * 1000.0, rpy[0], rpy[1], rpy[2]],
            )
        }
        MsgType::JointState => {
            let j = cdr::JointState::decode(data).map_err(|_| "decode_error")?;
            if j.position.len() != j.name.len() {
                return Err("channel_mismatch");
            }
            let n = j.name.len();
            (j.name, vec![false; n], j.position)
        }
        _ => return Err("type_mismatch"),
    };
    if values.iter().any(|v| !v.is_finite()) {
        return Err("non_finite");
    }
    if s.stamps.is_empty() {
        s.names = names;
        s.is_angle_deg = angles;
    } else if s.names != names {
        return Err("channel_mismatch");
    }
    s.stamps.push(stamp);
    s.values.push(values);
    Ok(())
}

impl McapEpisode {
    /// The camera stream named `camera` with its frame references.
    fn camera_stream(&self, camera: &str) -> Result<&(StreamSpec, Vec<FrameRef>), SourceError> {
        self.frames
            .iter()
            .find(|(s, _)| s.name == camera)
            .ok_or_else(|| SourceError::NoStream { episode: self.meta.id.clone(), kind: "camera", name: camera.into() })
    }

    /// What the file lost: damaged records skipped, a truncated tail, a missing footer.
    fn file_damage(&self) -> Option<Damage> {
        let s = &self.scan;
        let footer = self.map.len() >= 16 && self.map.ends_with(MCAP_MAGIC);
        if s.complete && s.lost.is_empty() && footer {
            return None;
        }
        let tail = if s.complete { 0 } else { self.map.len() - s.end_offset };
        let mut reasons = s.lost.clone();
        reasons.extend(s.stopped.iter().map(|w| format!("{w}; the rest of the file is unreadable")));
        if s.complete && !footer {
            reasons.push("the file has no footer (cut after its data section); no message lost".into());
        }
        Some(Damage {
            file_bytes: self.map.len() as u64,
            bytes_lost: (s.lost_bytes + tail) as u64,
            chunks_read: s.chunks as u64,
            records_lost: s.lost.len() as u64,
            messages_read: self.counts.values().sum(),
            reasons,
        })
    }
}

impl EpisodeSource for McapEpisode {
    fn meta(&self) -> &EpisodeMeta {
        &self.meta
    }
    fn damage(&self) -> Option<Damage> {
        self.file_damage()
    }
    fn cameras(&self) -> Vec<String> {
        self.frames.iter().map(|(s, _)| s.name.clone()).collect()
    }
    fn camera_stamps(&self, camera: &str) -> Result<Vec<Stamp>, SourceError> {
        let (_, f) = self.camera_stream(camera)?;
        Ok(f.iter().map(|r| r.stamp).collect())
    }
    fn camera_frame(&self, camera: &str, index: usize) -> Result<RgbImage, SourceError> {
        let (spec, f) = self.camera_stream(camera)?;
        let episode = || self.meta.id.clone();
        let r = f.get(index).ok_or_else(|| SourceError::NoFrame { episode: episode(), camera: camera.into(), frames: f.len(), index })?;
        let what = || format!("camera `{camera}` ({}) frame {index}", spec.topic);
        let raw = self.raw_message(r).map_err(|e| SourceError::Read { episode: episode(), what: what(), source: Box::new(e) })?;
        decode_image(spec.kind(), &raw).map_err(|e| SourceError::Read { episode: episode(), what: what(), source: Box::new(e) })
    }
    fn sensor(&self, name: &str) -> Result<SensorSeries, SourceError> {
        self.sensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| SourceError::NoStream { episode: self.meta.id.clone(), kind: "sensor", name: name.into() })
    }
    fn state(&self) -> Result<StateSeries, SourceError> {
        Ok(self.state.clone())
    }
    fn commands(&self) -> Result<Option<StateSeries>, SourceError> {
        Ok(self.commands.clone())
    }
}

/// Lists the episode folders under `<root>/episodes`, sorted by name.
pub fn list_episodes(root: &Path) -> Result<Vec<PathBuf>, EpisodeError> {
    let dir = root.join("episodes");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(io_err(&dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    Ok(out)
}
