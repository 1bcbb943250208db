//! The dataset a fine-tuning request trains on: a compiled dataset folder as given, or the
//! episodes root the collector records into, whose selected episodes
//! ([`EpisodeSelection`]) are compiled under `<datasets_root>/<fingerprint>/`. The fingerprint
//! covers the selected episodes' files and metadata and the compile settings, so a compiled set
//! is reused while its episodes are unchanged and a new or changed episode makes a new one. That
//! one is compiled incrementally ([`compile_incremental`]): only the new or changed episodes are
//! compiled, into `<datasets_root>/parts/`, the others' parts are reused.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::dataset::compile::{CompileConfig, CompileError, CompileReport};
use crate::dataset::incremental::{compile_incremental, FingerprintedEpisode};
use crate::dataset::selection::{self, EpisodeSelection, LeftOut, Selected, SelectionError};

/// What a request's `dataset` names.
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetSource {
    /// A compiled dataset (holds `index.json`).
    Compiled(PathBuf),
    /// An episodes root, with the episodes the selection keeps.
    Episodes {
        /// The root.
        root: PathBuf,
        /// The selected episodes.
        selected: Selected,
    },
}

/// Why a request's `dataset` cannot train.
#[derive(Debug, thiserror::Error)]
pub enum TrainingSetError {
    /// Neither a compiled dataset nor an episodes root.
    #[error("{0}: neither a compiled dataset (index.json) nor an episodes root (episodes/)")]
    Missing(PathBuf),
    /// An episodes root whose selection failed (no usable episode, unreadable folder).
    #[error(transparent)]
    Selection(#[from] SelectionError),
    /// The datasets folder could not be made.
    #[error("{path}: {source}")]
    Io {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Compiling the selected episodes failed.
    #[error("compiling the episodes of {root}: {source}")]
    Compile {
        /// The root.
        root: PathBuf,
        /// Why (boxed: a compile error is large, this enum is returned often).
        source: Box<CompileError>,
    },
}

impl DatasetSource {
    /// Classifies `path`, selecting the episodes of an episodes root (reads only metadata).
    pub fn resolve(path: &Path, sel: &EpisodeSelection) -> Result<Self, TrainingSetError> {
        if path.join("index.json").is_file() {
            return Ok(Self::Compiled(path.to_path_buf()));
        }
        if !selection::is_episodes_root(path) {
            return Err(TrainingSetError::Missing(path.to_path_buf()));
        }
        Ok(Self::Episodes { root: path.to_path_buf(), selected: selection::select(path, sel)? })
    }
}

/// The compiled dataset a job trains on.
#[derive(Debug, Clone)]
pub struct TrainingSet {
    /// Its folder.
    pub dir: PathBuf,
    /// Whether an earlier compile of the same episodes was reused.
    pub reused: bool,
    /// Episodes left out by the selection.
    pub left_out: Vec<LeftOut>,
    /// The compile report when it was compiled now.
    pub report: Option<CompileReport>,
    /// Episodes compiled now (the others' parts were reused).
    pub episodes_compiled: usize,
}

/// The folder `source` trains from, compiling an episodes root's selection under
/// `datasets_root` unless a compile of the same episodes and settings is there already (and
/// then only the episodes not compiled before).
pub fn prepare(
    source: &DatasetSource,
    cfg: &CompileConfig,
    datasets_root: &Path,
) -> Result<TrainingSet, TrainingSetError> {
    let (root, selected) = match source {
        DatasetSource::Compiled(dir) => {
            return Ok(TrainingSet {
                dir: dir.clone(),
                reused: true,
                left_out: Vec::new(),
                report: None,
                episodes_compiled: 0,
            })
        }
        DatasetSource::Episodes { root, selected } => (root, selected),
    };
    let dir = datasets_root.join(identity(selected, cfg));
    let mut set = TrainingSet {
        dir: dir.clone(),
        reused: true,
        left_out: selected.left_out.clone(),
        report: None,
        episodes_compiled: 0,
    };
    if dir.join("index.json").is_file() {
        return Ok(set);
    }
    std::fs::create_dir_all(datasets_root)
        .map_err(|source| TrainingSetError::Io { path: datasets_root.to_path_buf(), source })?;
    let inputs: Vec<FingerprintedEpisode<'_>> = selected
        .dirs
        .iter()
        .zip(&selected.fingerprints)
        .map(|(d, f)| FingerprintedEpisode {
            id: selection::folder_id(d),
            fingerprint: f.clone(),
            open: Box::new(move || selection::open_one(d)),
        })
        .collect();
    let out = compile_incremental(&inputs, cfg, &datasets_root.join("parts"), &dir)
        .map_err(|source| TrainingSetError::Compile { root: root.clone(), source: Box::new(source) })?;
    set.reused = false;
    set.report = Some(out.output.report);
    set.episodes_compiled = out.compiled;
    Ok(set)
}

/// 16 hex digits over the selection's fingerprint and the compile settings.
fn identity(selected: &Selected, cfg: &CompileConfig) -> String {
    let mut h = Sha256::new();
    h.update(selected.fingerprint.as_bytes());
    h.update(serde_json::to_vec(cfg).expect("compile settings serialize"));
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// One line on what a prepared set holds: samples, drops by reason, episodes left out.
pub fn describe(set: &TrainingSet) -> String {
    let mut parts = Vec::new();
    match &set.report {
        Some(r) => {
            let drops: Vec<String> = r.drops.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{k} {n}")).collect();
            parts.push(format!(
                "compiled {} episodes into {} ({} read now, earlier compiles of the others reused): {} samples ({} train, {} val), dropped: {}",
                r.episodes.len(),
                set.dir.display(),
                set.episodes_compiled,
                r.samples,
                r.train_samples,
                r.val_samples,
                if drops.is_empty() { "none".to_string() } else { drops.join(", ") }
            ));
            for f in &r.failed_episodes {
                parts.push(format!("episode `{}` unusable: {}", f.id, f.error));
            }
        }
        None => parts.push(format!("reusing {} (its episodes are unchanged)", set.dir.display())),
    }
    for l in &set.left_out {
        parts.push(format!("episode `{}` left out: {}", l.id, l.reason));
    }
    parts.join("; ")
}
