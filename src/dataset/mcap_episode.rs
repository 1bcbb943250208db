//! One episode on disk: `<root>/episodes/<id>/` holding `<id>_0.mcap` (raw CDR messages with their
//! `ros2msg` schemas, chunked and compressed), a rosbag2 `metadata.yaml` so `ros2 bag info/play`
//! open the folder, `episode.json` ([`EpisodeMeta`]) and `streams.yaml` (the stream mapping).
//! While recording, a `RECORDING` marker file says the episode is unfinished.
//!
//! [`EpisodeWriter`] (`writer`) writes it with its rosbag2 metadata (`rosbag2`); [`McapEpisode`]
//! (`reader`) reads it back as an [`EpisodeSource`](super::episode::EpisodeSource), through a
//! damage-tolerant [`scan_mcap`] (`scan`); `camera` checks and decodes image messages. This file
//! holds what they share: file names, the error type, `episode.json` and the episode listing.

mod camera;
mod reader;
mod rosbag2;
mod scan;
mod writer;

pub use camera::decode_image;
pub use reader::{quaternion_to_rpy_deg, McapEpisode, POSE_STATE_NAMES, POSE_STATE_UNITS};
pub use rosbag2::write_rosbag2_metadata;
pub use scan::{scan_mcap, scan_mcap_file, ScanEnd, ScannedChannel, ScannedMessage};
pub(crate) use writer::new_mcap_writer;
pub use writer::{Compression, EpisodeWriter, TopicCount, WriterOptions};

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::episode::EpisodeMeta;

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

/// The folder of episode `id` under a dataset root.
pub fn episode_dir(root: &Path, id: &str) -> PathBuf {
    root.join("episodes").join(id)
}

/// The MCAP file name of episode `id`.
pub fn mcap_file_name(id: &str) -> String {
    format!("{id}_0.mcap")
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
    serde_json::from_slice(&text)
        .map_err(|e| EpisodeError::Meta { path, message: format!("not a valid episode metadata JSON: {e}") })
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
