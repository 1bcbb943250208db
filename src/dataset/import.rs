//! rosbag2 import: a bag folder recorded by `ros2 bag record` (MCAP storage) becomes one episode
//! of the dataset, keeping the mapped topics' raw CDR messages, header stamps and receive times.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
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
    /// The storage plugin is not MCAP.
    #[error("{path}: storage `{storage}` is not supported (only mcap; convert with `ros2 bag convert`)")]
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
pub fn import_bag(bag: &Path, streams: &StreamConfig, root: &Path, opts: &ImportOptions) -> Result<ImportReport, ImportError> {
    let mpath = bag.join(ROSBAG2_METADATA);
    let text = std::fs::read_to_string(&mpath).map_err(|source| ImportError::Io { path: mpath.clone(), source })?;
    let info = serde_yaml::from_str::<BagMeta>(&text).map_err(|e| ImportError::Metadata { path: mpath.clone(), message: e.to_string() })?.rosbag2_bagfile_information;
    if info.storage_identifier != "mcap" {
        return Err(ImportError::Storage { path: bag.to_path_buf(), storage: info.storage_identifier });
    }
    if info.relative_file_paths.is_empty() {
        return Err(ImportError::Metadata { path: mpath, message: "relative_file_paths is empty".into() });
    }
    // Everything is checked and read before the episode folder is created.
    let mut msgs: Vec<(String, MsgType, Vec<u8>, i64, i64)> = Vec::new();
    let mut skipped: BTreeMap<String, u64> = BTreeMap::new();
    let mut unmapped: BTreeMap<String, u64> = BTreeMap::new();
    for rel in &info.relative_file_paths {
        let name = Path::new(rel).file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from(rel));
        let path = bag.join(name);
        let file = File::open(&path).map_err(|source| ImportError::Io { path: path.clone(), source })?;
        // SAFETY: read-only map of a bag file; bags are not modified while imported.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ImportError::Io { path: path.clone(), source })?;
        let mut channels = HashMap::new();
        let mut mismatch: Option<ImportError> = None;
        let end = scan_mcap(&map, &mut channels, |chs, m| {
            let Some(ch) = chs.get(&m.channel) else { return };
            let Some((_, spec)) = streams.find_topic(&ch.topic) else {
                *unmapped.entry(ch.topic.clone()).or_default() += 1;
                return;
            };
            let t = spec.kind();
            if MsgType::parse(&ch.type_name).ok() != Some(t) || ch.encoding != "cdr" {
                if mismatch.is_none() {
                    let found = if ch.encoding != "cdr" { format!("{} ({} encoding)", ch.type_name, ch.encoding) } else { ch.type_name.clone() };
                    mismatch = Some(ImportError::TypeMismatch { path: path.clone(), topic: ch.topic.clone(), found, expected: t.name().into() });
                }
                return;
            }
            let stamp = match t.header_stamp(&m.data) {
                Ok(s) => s.unwrap_or(m.log_time as i64),
                Err(e) => {
                    tracing::warn!("{}: topic `{}`: message skipped: {e}", path.display(), ch.topic);
                    *skipped.entry(ch.topic.clone()).or_default() += 1;
                    return;
                }
            };
            msgs.push((ch.topic.clone(), t, m.data.into_owned(), stamp, m.log_time as i64));
        });
        if let Some(e) = mismatch {
            return Err(e);
        }
        if !end.complete {
            return Err(ImportError::Damaged { path, message: end.stopped.unwrap_or_else(|| "data section incomplete".into()) });
        }
    }
    for (_, spec) in streams.all() {
        if !msgs.iter().any(|m| m.0 == spec.topic) && !skipped.contains_key(&spec.topic) {
            return Err(ImportError::MissingTopic { path: bag.to_path_buf(), topic: spec.topic.clone() });
        }
    }
    let id = opts.id.clone().unwrap_or_else(|| {
        bag.canonicalize().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string())).unwrap_or_else(|| "imported".into())
    });
    let start = msgs.iter().map(|m| m.4).min().unwrap_or(0);
    let stop = msgs.iter().map(|m| m.4).max().unwrap_or(0);
    let meta = EpisodeMeta { id, instruction: opts.instruction.clone(), task: opts.task.clone(), operator: opts.operator.clone(), start_ns: start, ..Default::default() };
    let mut w = EpisodeWriter::create(root, meta, streams, opts.writer.clone())?;
    let mut imported: BTreeMap<String, u64> = BTreeMap::new();
    for (topic, t, data, stamp, recv) in &msgs {
        w.write(topic, t.name(), data, *stamp, *recv)?;
        *imported.entry(topic.clone()).or_default() += 1;
    }
    let dir = w.dir().to_path_buf();
    let meta = w.finish(&opts.outcome, stop, BTreeMap::new())?;
    Ok(ImportReport { meta, dir, imported, skipped, unmapped })
}
