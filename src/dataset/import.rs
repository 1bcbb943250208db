//! rosbag2 import: a bag folder recorded by `ros2 bag record` (MCAP or sqlite3 storage) becomes
//! one episode of the dataset, keeping the mapped topics' raw CDR messages, header stamps and
//! receive times.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use super::cdr::MsgType;
use super::episode::EpisodeMeta;
use super::mcap_episode::{scan_mcap_file, EpisodeError, EpisodeWriter, WriterOptions, ROSBAG2_METADATA};
use super::streams::StreamConfig;

/// Errors importing a bag.
#[derive(Debug, Error)]
pub enum ImportError {
    /// A file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// `metadata.yaml` is missing fields or malformed.
    #[error("{path}: not a rosbag2 metadata file: {message}")]
    Metadata {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The storage plugin is neither MCAP nor sqlite3.
    #[error("{path}: storage `{storage}` is not supported (mcap or sqlite3; convert with `ros2 bag convert`)")]
    Storage {
        /// Bag folder.
        path: PathBuf,
        /// The storage identifier found.
        storage: String,
    },
    /// A bag file is truncated or damaged.
    #[error("{path}: damaged MCAP: {message}")]
    Damaged {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A mapped topic has another type in the bag.
    #[error("{path}: topic `{topic}` has type `{found}` in the bag but the stream mapping says `{expected}`")]
    TypeMismatch {
        /// Bag file.
        path: PathBuf,
        /// Topic.
        topic: String,
        /// Type in the bag.
        found: String,
        /// Type in the mapping.
        expected: String,
    },
    /// A mapped topic is absent from the bag.
    #[error("{path}: mapped topic `{topic}` is not in the bag")]
    MissingTopic {
        /// Bag folder.
        path: PathBuf,
        /// Topic.
        topic: String,
    },
    /// Writing the episode failed.
    #[error(transparent)]
    Episode(#[from] EpisodeError),
    /// The stream mapping is invalid.
    #[error(transparent)]
    Streams(#[from] crate::dataset::streams::StreamsError),
}

/// Episode metadata to attach to the imported bag.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Episode id; the bag folder's name when `None`.
    pub id: Option<String>,
    /// Language instruction.
    pub instruction: String,
    /// Task.
    pub task: String,
    /// Operator.
    pub operator: String,
    /// Outcome (`success`, `failure`, `aborted`).
    pub outcome: String,
    /// File options.
    pub writer: WriterOptions,
}

/// What an import did.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportReport {
    /// The new episode.
    pub meta: EpisodeMeta,
    /// Episode folder.
    pub dir: PathBuf,
    /// Messages imported per topic.
    pub imported: BTreeMap<String, u64>,
    /// Messages of mapped topics skipped (header not decodable), per topic.
    pub skipped: BTreeMap<String, u64>,
    /// Messages of topics not in the mapping, per topic (left out).
    pub unmapped: BTreeMap<String, u64>,
    /// An earlier import of this episode was interrupted before writing any message; its
    /// folder was removed.
    pub removed_leftover: bool,
}

#[derive(Deserialize)]
struct BagMeta {
    rosbag2_bagfile_information: BagInfo,
}
#[derive(Deserialize)]
struct BagInfo {
    storage_identifier: String,
    relative_file_paths: Vec<String>,
}

/// Imports the bag folder `bag` into the dataset at `root` as one episode. The bag is read
/// twice, a record at a time: first to check it (storage, types, encodings, damage, every mapped
/// topic present) before the episode folder is created, then to copy its messages, so memory does
/// not grow with the bag.
pub fn import_bag(
    bag: &Path,
    streams: &StreamConfig,
    root: &Path,
    opts: &ImportOptions,
) -> Result<ImportReport, ImportError> {
    let mut checked = streams.clone();
    checked.validate("import stream mapping")?;
    let info = read_bag_info(bag)?;
    let files: Vec<PathBuf> = info
        .relative_file_paths
        .iter()
        .map(|rel| bag.join(Path::new(rel).file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from(rel))))
        .collect();
    let mut survey = Survey {
        streams: &checked,
        mismatch: None,
        mapped: BTreeMap::new(),
        skipped: BTreeMap::new(),
        unmapped: BTreeMap::new(),
        span: None,
    };
    for f in &files {
        read_file(f, &info.storage_identifier, &mut |m| survey.message(f, m))?;
        if let Some(e) = survey.mismatch.take() {
            return Err(e);
        }
    }
    survey.check_topics(bag)?;
    survey.copy(bag, &files, &info.storage_identifier, root, opts)
}

/// The bag's `metadata.yaml`: a supported storage and at least one file.
fn read_bag_info(bag: &Path) -> Result<BagInfo, ImportError> {
    let mpath = bag.join(ROSBAG2_METADATA);
    let text = std::fs::read_to_string(&mpath).map_err(|source| ImportError::Io { path: mpath.clone(), source })?;
    let info = serde_yaml::from_str::<BagMeta>(&text)
        .map_err(|e| ImportError::Metadata { path: mpath.clone(), message: e.to_string() })?
        .rosbag2_bagfile_information;
    if info.storage_identifier != "mcap" && info.storage_identifier != "sqlite3" {
        return Err(ImportError::Storage { path: bag.to_path_buf(), storage: info.storage_identifier });
    }
    if info.relative_file_paths.is_empty() {
        return Err(ImportError::Metadata { path: mpath, message: "relative_file_paths is empty".into() });
    }
    Ok(info)
}

/// One message of a bag file.
struct BagMessage<'m> {
    topic: &'m str,
    type_name: &'m str,
    encoding: &'m str,
    /// Log (receive) time, ns.
    log_time: i64,
    /// CDR bytes.
    data: &'m [u8],
}

/// What a bag's messages are to the stream mapping.
enum Mapped {
    /// A mapped message of this type with this time: its header stamp, else its log time.
    Message(MsgType, i64),
    /// A mapped message whose header does not decode (left out, counted): why.
    Skipped(String),
    /// A topic not in the mapping (left out, counted).
    Unmapped,
}

/// Maps message `m` of bag file `path`; `Err` when its topic is mapped to another type or it is
/// not CDR.
fn map_message(streams: &StreamConfig, path: &Path, m: &BagMessage<'_>) -> Result<Mapped, ImportError> {
    let Some((_, spec)) = streams.find_topic(m.topic) else { return Ok(Mapped::Unmapped) };
    let t = spec.kind();
    if MsgType::parse(m.type_name).ok() != Some(t) || m.encoding != "cdr" {
        let found =
            if m.encoding != "cdr" { format!("{} ({} encoding)", m.type_name, m.encoding) } else { m.type_name.into() };
        let (path, topic, expected) = (path.to_path_buf(), m.topic.into(), t.name().into());
        return Err(ImportError::TypeMismatch { path, topic, found, expected });
    }
    Ok(match t.header_stamp(m.data) {
        Ok(s) => Mapped::Message(t, s.unwrap_or(m.log_time)),
        Err(e) => Mapped::Skipped(e.to_string()),
    })
}

/// The first reading of a bag: counts and times, no message kept.
struct Survey<'s> {
    streams: &'s StreamConfig,
    /// The first mapped topic of another type or encoding.
    mismatch: Option<ImportError>,
    /// Mapped messages that will be imported, per topic.
    mapped: BTreeMap<String, u64>,
    /// Mapped messages whose header does not decode, per topic.
    skipped: BTreeMap<String, u64>,
    /// Messages of topics not in the mapping, per topic.
    unmapped: BTreeMap<String, u64>,
    /// First and last log time of the mapped messages.
    span: Option<(i64, i64)>,
}

impl Survey<'_> {
    fn message(&mut self, path: &Path, m: BagMessage<'_>) {
        if self.mismatch.is_some() {
            return;
        }
        let count = |map: &mut BTreeMap<String, u64>| *map.entry(m.topic.to_string()).or_default() += 1;
        match map_message(self.streams, path, &m) {
            Ok(Mapped::Message(..)) => {
                count(&mut self.mapped);
                let (lo, hi) = self.span.unwrap_or((m.log_time, m.log_time));
                self.span = Some((lo.min(m.log_time), hi.max(m.log_time)));
            }
            Ok(Mapped::Skipped(why)) => {
                tracing::warn!("{}: topic `{}`: message skipped: {why}", path.display(), m.topic);
                count(&mut self.skipped)
            }
            Ok(Mapped::Unmapped) => count(&mut self.unmapped),
            Err(e) => self.mismatch = Some(e),
        }
    }

    /// Every mapped topic must have messages in the bag (read or skipped).
    fn check_topics(&self, bag: &Path) -> Result<(), ImportError> {
        for (_, spec) in self.streams.all() {
            if !self.mapped.contains_key(&spec.topic) && !self.skipped.contains_key(&spec.topic) {
                return Err(ImportError::MissingTopic { path: bag.to_path_buf(), topic: spec.topic.clone() });
            }
        }
        Ok(())
    }

    /// Reads the bag's `files` again and writes their mapped messages as a new episode of the
    /// dataset at `root` (id: `opts.id`, else the bag folder's name). If this reading fails (the
    /// bag changed since the first), the new episode folder is removed.
    fn copy(
        self,
        bag: &Path,
        files: &[PathBuf],
        storage: &str,
        root: &Path,
        opts: &ImportOptions,
    ) -> Result<ImportReport, ImportError> {
        let id = opts.id.clone().unwrap_or_else(|| {
            bag.canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
                .unwrap_or_else(|| "imported".into())
        });
        let (start, stop) = self.span.unwrap_or((0, 0));
        let meta = EpisodeMeta {
            id,
            instruction: opts.instruction.clone(),
            task: opts.task.clone(),
            operator: opts.operator.clone(),
            start_ns: start,
            ..Default::default()
        };
        let leftover = super::mcap_episode::episode_dir(root, &meta.id);
        let removed_leftover = super::recovery::remove_empty_leftover(&leftover)
            .map_err(|source| ImportError::Io { path: leftover.clone(), source })?;
        let mut w = EpisodeWriter::create(root, meta, self.streams, opts.writer.clone())?;
        let dir = w.dir().to_path_buf();
        let mut imported: BTreeMap<String, u64> = BTreeMap::new();
        let mut copied = || -> Result<(), ImportError> {
            for f in files {
                let mut failed = None;
                read_file(f, storage, &mut |m| {
                    if failed.is_some() {
                        return;
                    }
                    let written = match map_message(self.streams, f, &m) {
                        Ok(Mapped::Message(t, stamp)) => {
                            *imported.entry(m.topic.to_string()).or_default() += 1;
                            w.write(m.topic, t.name(), m.data, stamp, m.log_time).map_err(ImportError::from)
                        }
                        Ok(_) => Ok(()),
                        Err(e) => Err(e),
                    };
                    failed = written.err();
                })?;
                failed.map_or(Ok(()), Err)?;
            }
            if imported != self.mapped {
                return Err(ImportError::Damaged {
                    path: bag.to_path_buf(),
                    message: format!("changed while it was imported: {:?} messages, then {imported:?}", self.mapped),
                });
            }
            Ok(())
        };
        if let Err(e) = copied() {
            drop(w);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let meta = w.finish(&opts.outcome, stop, BTreeMap::new())?;
        let (skipped, unmapped) = (self.skipped, self.unmapped);
        Ok(ImportReport { meta, dir, imported, skipped, unmapped, removed_leftover })
    }
}

/// Visits every message of bag file `path` (`storage`: mcap or sqlite3).
fn read_file(path: &Path, storage: &str, visit: &mut MessageVisitor) -> Result<(), ImportError> {
    match storage {
        "mcap" => read_mcap(path, visit),
        _ => read_sqlite(path, visit),
    }
}

/// A visitor of a bag's messages.
type MessageVisitor<'v> = dyn FnMut(BagMessage<'_>) + 'v;

/// Visits every message of an MCAP bag file, a chunk at a time.
fn read_mcap(path: &Path, visit: &mut MessageVisitor) -> Result<(), ImportError> {
    // Read, not mapped: a bag shrinking under a map would raise SIGBUS.
    let io = |source| ImportError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut channels = HashMap::new();
    let end = scan_mcap_file(&file, &mut channels, |chs, m| {
        if let Some(ch) = chs.get(&m.channel) {
            let (topic, type_name, encoding) = (&ch.topic, &ch.type_name, &ch.encoding);
            visit(BagMessage { topic, type_name, encoding, log_time: m.log_time as i64, data: &m.data });
        }
    })
    .map_err(io)?;
    if !end.complete || !end.lost.is_empty() {
        let why = end.lost.into_iter().chain(end.stopped).collect::<Vec<_>>().join("; ");
        return Err(ImportError::Damaged {
            path: path.to_path_buf(),
            message: if why.is_empty() { "data section incomplete".into() } else { why },
        });
    }
    Ok(())
}

/// Visits every message of a sqlite3 bag file (`topics` and `messages` tables), in time order.
fn read_sqlite(path: &Path, visit: &mut MessageVisitor) -> Result<(), ImportError> {
    let damaged =
        |e: rusqlite::Error| ImportError::Damaged { path: path.to_path_buf(), message: format!("sqlite3: {e}") };
    if !path.exists() {
        return Err(ImportError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    let db =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(damaged)?;
    let mut topics: HashMap<i64, (String, String, String)> = HashMap::new();
    let mut st = db.prepare("SELECT id, name, type, serialization_format FROM topics").map_err(damaged)?;
    let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, (r.get(1)?, r.get(2)?, r.get(3)?)))).map_err(damaged)?;
    for row in rows {
        let (id, t) = row.map_err(damaged)?;
        topics.insert(id, t);
    }
    let mut st =
        db.prepare("SELECT topic_id, timestamp, data FROM messages ORDER BY timestamp, id").map_err(damaged)?;
    let mut rows = st.query([]).map_err(damaged)?;
    while let Some(r) = rows.next().map_err(damaged)? {
        let topic_id: i64 = r.get(0).map_err(damaged)?;
        let log: i64 = r.get(1).map_err(damaged)?;
        let data = r.get_ref(2).map_err(damaged)?.as_blob().map_err(|e| damaged(e.into()))?;
        let (name, type_name, encoding) = topics.get(&topic_id).ok_or_else(|| ImportError::Damaged {
            path: path.to_path_buf(),
            message: format!("message refers to unknown topic id {topic_id}"),
        })?;
        visit(BagMessage { topic: name, type_name, encoding, log_time: log, data });
    }
    Ok(())
}
