//! rosbag2 import: a bag folder recorded by `ros2 bag record` (MCAP or sqlite3 storage) becomes
//! one episode of the dataset, keeping the mapped topics' raw CDR messages, header stamps and
//! receive times.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use super::cdr::MsgType;
use super::episode::EpisodeMeta;
use super::mcap_episode::{scan_mcap, EpisodeError, EpisodeWriter, WriterOptions, ROSBAG2_METADATA};
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

/// Imports the bag folder `bag` into the dataset at `root` as one episode.
pub fn import_bag(
    bag: &Path,
    streams: &StreamConfig,
    root: &Path,
    opts: &ImportOptions,
) -> Result<ImportReport, ImportError> {
    let mut checked = streams.clone();
    checked.validate("import stream mapping")?;
    let info = read_bag_info(bag)?;
    // Everything is checked and read before the episode folder is created.
    let mut read =
        BagMessages { streams: &checked, msgs: Vec::new(), skipped: BTreeMap::new(), unmapped: BTreeMap::new() };
    for rel in &info.relative_file_paths {
        let name = Path::new(rel).file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from(rel));
        read.file(&bag.join(name), &info.storage_identifier)?;
    }
    read.check_topics(bag)?;
    read.write(bag, root, opts)
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

/// The messages of a bag read so far, sorted by the stream mapping.
struct BagMessages<'s> {
    streams: &'s StreamConfig,
    /// Mapped messages: topic, type, CDR, header stamp (the log time when it has none), log time.
    msgs: Vec<(String, MsgType, Vec<u8>, i64, i64)>,
    /// Mapped messages whose header does not decode, per topic.
    skipped: BTreeMap<String, u64>,
    /// Messages of topics not in the mapping, per topic.
    unmapped: BTreeMap<String, u64>,
}

impl BagMessages<'_> {
    /// Reads the bag file `path` (`storage`: mcap or sqlite3); the first mapped topic of another
    /// type or encoding fails it.
    fn file(&mut self, path: &Path, storage: &str) -> Result<(), ImportError> {
        let mut mismatch: Option<ImportError> = None;
        let mut visit = |topic: &str, type_name: &str, encoding: &str, log_time: i64, data: &[u8]| {
            if let Err(e) = self.message(path, topic, type_name, encoding, log_time, data) {
                mismatch.get_or_insert(e);
            }
        };
        match storage {
            "mcap" => read_mcap(path, &mut visit)?,
            _ => read_sqlite(path, &mut visit)?,
        }
        mismatch.map_or(Ok(()), Err)
    }

    /// Takes in one message of `path`; `Err` when its topic is mapped to another type or it is
    /// not CDR.
    fn message(
        &mut self,
        path: &Path,
        topic: &str,
        type_name: &str,
        encoding: &str,
        log_time: i64,
        data: &[u8],
    ) -> Result<(), ImportError> {
        let Some((_, spec)) = self.streams.find_topic(topic) else {
            *self.unmapped.entry(topic.to_string()).or_default() += 1;
            return Ok(());
        };
        let t = spec.kind();
        if MsgType::parse(type_name).ok() != Some(t) || encoding != "cdr" {
            let found =
                if encoding != "cdr" { format!("{type_name} ({encoding} encoding)") } else { type_name.to_string() };
            let (path, topic, expected) = (path.to_path_buf(), topic.into(), t.name().into());
            return Err(ImportError::TypeMismatch { path, topic, found, expected });
        }
        match t.header_stamp(data) {
            Ok(s) => self.msgs.push((topic.to_string(), t, data.to_vec(), s.unwrap_or(log_time), log_time)),
            Err(e) => {
                tracing::warn!("{}: topic `{topic}`: message skipped: {e}", path.display());
                *self.skipped.entry(topic.to_string()).or_default() += 1;
            }
        }
        Ok(())
    }

    /// Every mapped topic must have messages in the bag (read or skipped).
    fn check_topics(&self, bag: &Path) -> Result<(), ImportError> {
        for (_, spec) in self.streams.all() {
            if !self.msgs.iter().any(|m| m.0 == spec.topic) && !self.skipped.contains_key(&spec.topic) {
                return Err(ImportError::MissingTopic { path: bag.to_path_buf(), topic: spec.topic.clone() });
            }
        }
        Ok(())
    }

    /// Writes the messages as a new episode of the dataset at `root` (id: `opts.id`, else the
    /// bag folder's name).
    fn write(self, bag: &Path, root: &Path, opts: &ImportOptions) -> Result<ImportReport, ImportError> {
        let id = opts.id.clone().unwrap_or_else(|| {
            bag.canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
                .unwrap_or_else(|| "imported".into())
        });
        let start = self.msgs.iter().map(|m| m.4).min().unwrap_or(0);
        let stop = self.msgs.iter().map(|m| m.4).max().unwrap_or(0);
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
        let mut imported: BTreeMap<String, u64> = BTreeMap::new();
        for (topic, t, data, stamp, recv) in &self.msgs {
            w.write(topic, t.name(), data, *stamp, *recv)?;
            *imported.entry(topic.clone()).or_default() += 1;
        }
        let dir = w.dir().to_path_buf();
        let meta = w.finish(&opts.outcome, stop, BTreeMap::new())?;
        let (skipped, unmapped) = (self.skipped, self.unmapped);
        Ok(ImportReport { meta, dir, imported, skipped, unmapped, removed_leftover })
    }
}

/// A visitor of a bag's messages: (topic, type, encoding, log time, CDR).
type MessageVisitor<'v> = dyn FnMut(&str, &str, &str, i64, &[u8]) + 'v;

/// Visits every message of an MCAP bag file: (topic, type, encoding, log time, CDR).
fn read_mcap(path: &Path, visit: &mut MessageVisitor) -> Result<(), ImportError> {
    // Read, not mapped: a bag shrinking under a map would raise SIGBUS.
    let bytes = std::fs::read(path).map_err(|source| ImportError::Io { path: path.to_path_buf(), source })?;
    let mut channels = HashMap::new();
    let end = scan_mcap(&bytes, &mut channels, |chs, m| {
        if let Some(ch) = chs.get(&m.channel) {
            visit(&ch.topic, &ch.type_name, &ch.encoding, m.log_time as i64, &m.data);
        }
    });
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
        visit(name, type_name, encoding, log, data);
    }
    Ok(())
}
