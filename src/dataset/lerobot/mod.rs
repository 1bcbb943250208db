//! LeRobot v3.0 datasets both ways: [`export`] writes a compiled dataset as a LeRobot dataset
//! (parquet data with the frames' pictures embedded, or videos through ffmpeg, [`video`]), [`import`]
//! reads a local LeRobot v3.0 dataset into a compiled dataset, mapping its features by a YAML
//! file ([`import::ImportMapping`], `config/lerobot_import.yaml`). [`format`] holds the on-disk
//! layout both share.

pub mod export;
pub mod format;
pub mod import;
pub mod video;

use std::path::PathBuf;

use crate::dataset::compile::CompileError;
use crate::dataset::reader::ReaderError;
use crate::dataset::store::StoreError;

/// Errors of the export and the import; each names the file or feature and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum LeRobotError {
    /// File system error on a path.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file the format requires is absent.
    #[error("{path}: missing; expected {what}")]
    Missing {
        /// The file.
        path: PathBuf,
        /// What it should be.
        what: String,
    },
    /// A dataset of another LeRobot codebase version.
    #[error("{path}: codebase_version `{found}`; expected `v3.0` (convert a v2.1 dataset with lerobot's `lerobot.datasets.v30.convert_dataset_v21_to_v30` first)")]
    Version {
        /// info.json.
        path: PathBuf,
        /// The version found.
        found: String,
    },
    /// A file's content is not what was expected.
    #[error("{path}: {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what was expected.
        what: String,
    },
    /// A feature is unknown, missing or of the wrong type or shape.
    #[error("feature `{feature}`: {what}")]
    Feature {
        /// The LeRobot feature key.
        feature: String,
        /// What is wrong and what was expected.
        what: String,
    },
    /// An episode's frames do not match its metadata.
    #[error("episode {episode}: {what}")]
    Frames {
        /// LeRobot episode_index.
        episode: i64,
        /// What is wrong and what was expected.
        what: String,
    },
    /// A video cannot be written or read.
    #[error("video: {0}")]
    Video(String),
    /// The import mapping is unusable.
    #[error("import mapping: {0}")]
    Mapping(String),
    /// An export setting is unusable.
    #[error("export settings: {0}")]
    Settings(String),
    /// Reading the compiled dataset failed.
    #[error(transparent)]
    Reader(#[from] ReaderError),
    /// Writing the compiled dataset failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the compiled dataset's outputs failed.
    #[error(transparent)]
    Compile(#[from] CompileError),
}
