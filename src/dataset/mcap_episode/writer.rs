//! [`EpisodeWriter`]: records one episode's messages into its MCAP file, with a quota, a
//! writer thread and `episode.json` kept current.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use mcap::records::MessageHeader;

use crate::dataset::cdr::MsgType;
use crate::dataset::episode::EpisodeMeta;
use crate::dataset::streams::StreamConfig;

use super::*;

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
        WriterOptions {
            compression: Compression::Zstd,
            chunk_bytes: 4 << 20,
            flush_interval_ns: 1_000_000_000,
            max_bytes: None,
        }
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
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!("episode quota of {} bytes reached", self.limit),
            ));
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
    pub fn create(
        root: &Path,
        meta: EpisodeMeta,
        streams: &StreamConfig,
        opts: WriterOptions,
    ) -> Result<Self, EpisodeError> {
        if meta.id.is_empty() || meta.id.contains(['/', '\\']) || meta.id.starts_with('.') {
            return Err(EpisodeError::Meta {
                path: root.to_path_buf(),
                message: format!("invalid episode id `{}`", meta.id),
            });
        }
        let mut streams = streams.clone();
        streams
            .validate("episode stream mapping")
            .map_err(|e| EpisodeError::Meta { path: root.to_path_buf(), message: e.to_string() })?;
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
        let quota = QuotaFile {
            inner: BufWriter::with_capacity(1 << 20, file),
            pos: 0,
            end: 0,
            limit: opts.max_bytes.unwrap_or(u64::MAX),
            closed: closed.clone(),
        };
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
    pub fn write(
        &mut self,
        topic: &str,
        type_name: &str,
        cdr: &[u8],
        stamp_ns: i64,
        recv_ns: i64,
    ) -> Result<(), EpisodeError> {
        let channel = match self.channels.get(topic) {
            Some(&(id, t)) => {
                if t.name() != type_name && MsgType::parse(type_name).ok() != Some(t) {
                    return Err(EpisodeError::Topic {
                        topic: topic.into(),
                        message: format!("type `{type_name}` but the mapping says {}", t.name()),
                    });
                }
                id
            }
            None => self.add_channel(topic, type_name)?,
        };
        let header = MessageHeader {
            channel_id: channel,
            sequence: self.sequence,
            log_time: recv_ns.max(0) as u64,
            publish_time: stamp_ns.max(0) as u64,
        };
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
    fn mcap_op<T>(
        &mut self,
        f: impl FnOnce(&mut mcap::Writer<QuotaFile>) -> Result<T, mcap::McapError>,
    ) -> Result<T, EpisodeError> {
        let path = &self.mcap_path;
        let mcap = match self.mcap.as_mut() {
            Some(m) if !self.failed => m,
            _ => {
                return Err(EpisodeError::Corrupt {
                    path: path.clone(),
                    message: "an earlier write to the episode file failed; nothing more is written to it".into(),
                })
            }
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
        let t = MsgType::parse(type_name)
            .map_err(|e| EpisodeError::Topic { topic: topic.into(), message: e.to_string() })?;
        if t != spec.kind() {
            return Err(EpisodeError::Topic {
                topic: topic.into(),
                message: format!("type `{type_name}` but the mapping says {}", spec.msg_type),
            });
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
    pub fn finish(
        mut self,
        outcome: &str,
        stop_ns: i64,
        drops: BTreeMap<String, u64>,
    ) -> Result<EpisodeMeta, EpisodeError> {
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
