//! Which recorded episodes train: a selection by outcome and task over an episodes root (the
//! folder whose `episodes/` the collector records into), and discarding an episode after the fact
//! (a flag in its `episode.json`; no file is deleted).
//!
//! Selecting reads only the `episode.json` files. An episode being recorded (a `RECORDING`
//! marker of a live process) is left out with that reason; one left unfinished by a recorder
//! that is gone is opened by [`open_one`], which recovers it first.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::episode::{Discard, EpisodeMeta, EpisodeSource, LazyEpisode, UnreadableEpisode};
use super::mcap_episode::{
    list_episodes, read_episode_json, write_episode_json, McapEpisode, EPISODE_JSON, RECORDING_MARKER,
};
use super::recovery::{live_recorder, recover_episode};

/// The outcome selected when none is given.
pub const DEFAULT_OUTCOME: &str = "success";
/// An outcome value that selects every outcome.
pub const ANY_OUTCOME: &str = "any";

/// Errors selecting or discarding episodes.
#[derive(Debug, thiserror::Error)]
pub enum SelectionError {
    /// The path holds no `episodes/` folder.
    #[error(
        "{0}: not an episodes root (expected an `episodes/` folder of recorded episodes, as the collector writes)"
    )]
    NotARoot(PathBuf),
    /// A folder or file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The folder or file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// No episode of that id under the root.
    #[error("no episode `{id}` under {root} (expected a folder {root}/episodes/{id})")]
    UnknownEpisode {
        /// The root.
        root: PathBuf,
        /// The id asked for.
        id: String,
    },
    /// The episode is being recorded.
    #[error("episode `{id}` is being recorded (pid {pid}); discard it after it stops")]
    Recording {
        /// The episode.
        id: String,
        /// The recorder.
        pid: i32,
    },
    /// Every episode was left out.
    #[error("{root}: no usable episode: {detail}")]
    Empty {
        /// The root.
        root: PathBuf,
        /// How many were found and why each group was left out.
        detail: String,
    },
}

/// Which episodes train: outcome in `outcomes` (empty: [`DEFAULT_OUTCOME`]; [`ANY_OUTCOME`]:
/// every outcome) and, when `tasks` is not empty, task in `tasks`; discarded episodes never.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EpisodeSelection {
    /// Outcomes that train (`success`, `failure`, `aborted`, or the empty outcome of an import).
    pub outcomes: Vec<String>,
    /// Tasks that train; empty = any.
    pub tasks: Vec<String>,
}

impl EpisodeSelection {
    /// Why `meta` is left out, or `None` when it trains.
    pub fn excludes(&self, meta: &EpisodeMeta) -> Option<String> {
        if let Some(d) = &meta.discarded {
            return Some(if d.reason.is_empty() { "discarded".into() } else { format!("discarded: {}", d.reason) });
        }
        let default = [DEFAULT_OUTCOME.to_string()];
        let outcomes: &[String] = if self.outcomes.is_empty() { &default } else { &self.outcomes };
        if !outcomes.iter().any(|o| o == ANY_OUTCOME || *o == meta.outcome) {
            return Some(format!("outcome `{}` (selected: {})", meta.outcome, outcomes.join(", ")));
        }
        if !self.tasks.is_empty() && !self.tasks.contains(&meta.task) {
            return Some(format!("task `{}` (selected: {})", meta.task, self.tasks.join(", ")));
        }
        None
    }
}

/// An episode left out of a selection, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeftOut {
    /// Episode id (its folder name).
    pub id: String,
    /// Why.
    pub reason: String,
}

/// The episodes of a root that a selection keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct Selected {
    /// Episode folders that train, sorted by id.
    pub dirs: Vec<PathBuf>,
    /// Per folder of `dirs`: sha256 over its recorded files (names, sizes, modification times)
    /// and `episode.json` contents, equal while the episode is unchanged.
    pub fingerprints: Vec<String>,
    /// Episodes left out, sorted by id.
    pub left_out: Vec<LeftOut>,
    /// sha256 over `fingerprints`: equal while the selected episodes are unchanged.
    pub fingerprint: String,
}

/// Whether `path` is an episodes root (holds `episodes/`).
pub fn is_episodes_root(path: &Path) -> bool {
    path.join("episodes").is_dir()
}

/// Selects the episodes of `root` that `sel` keeps. An unreadable `episode.json` is kept (the
/// compile lists it as unreadable with its reason), one being recorded is left out.
pub fn select(root: &Path, sel: &EpisodeSelection) -> Result<Selected, SelectionError> {
    if !is_episodes_root(root) {
        return Err(SelectionError::NotARoot(root.to_path_buf()));
    }
    let dirs =
        list_episodes(root).map_err(|e| SelectionError::Io { path: root.join("episodes"), message: e.to_string() })?;
    let mut out =
        Selected { dirs: Vec::new(), fingerprints: Vec::new(), left_out: Vec::new(), fingerprint: String::new() };
    let mut hash = Sha256::new();
    for dir in dirs {
        let id = folder_id(&dir);
        if let Some(pid) = recording_pid(&dir) {
            out.left_out.push(LeftOut { id, reason: format!("being recorded (pid {pid})") });
            continue;
        }
        if let Ok(meta) = read_episode_json(&dir) {
            if let Some(reason) = sel.excludes(&meta) {
                out.left_out.push(LeftOut { id, reason });
                continue;
            }
        }
        let fingerprint = episode_fingerprint(&dir, &id)?;
        hash.update(fingerprint.as_bytes());
        out.fingerprints.push(fingerprint);
        out.dirs.push(dir);
    }
    if out.dirs.is_empty() {
        return Err(SelectionError::Empty { root: root.to_path_buf(), detail: describe_left_out(&out.left_out) });
    }
    out.fingerprint = hex(&hash.finalize());
    Ok(out)
}

/// "3 episodes found, 2 left out: outcome `failure` (selected: success) x2, ...", grouped.
fn describe_left_out(left: &[LeftOut]) -> String {
    if left.is_empty() {
        return "the `episodes/` folder is empty".into();
    }
    let mut groups: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for l in left {
        *groups.entry(l.reason.as_str()).or_default() += 1;
    }
    let parts: Vec<String> = groups.iter().map(|(r, n)| format!("{n} {r}")).collect();
    format!("{} episode(s) found, all left out: {}", left.len(), parts.join("; "))
}

/// The pid of the live recorder writing episode folder `dir`, if one is.
fn recording_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join(RECORDING_MARKER)).ok().and_then(|m| live_recorder(&m))
}

/// The id of the episode in folder `dir`: its folder name, as the recorder names it.
pub fn folder_id(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn episode_fingerprint(dir: &Path, id: &str) -> Result<String, SelectionError> {
    let io = |e: std::io::Error| SelectionError::Io { path: dir.to_path_buf(), message: e.to_string() };
    let mut files: Vec<(String, u64, i128)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let md = entry.metadata().map_err(io)?;
        // episode.json is hashed by content below (a discard taken back gives the same set).
        if md.is_file() && entry.file_name() != EPISODE_JSON {
            let mtime = md
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos() as i128)
                .unwrap_or(-1);
            files.push((entry.file_name().to_string_lossy().into_owned(), md.len(), mtime));
        }
    }
    files.sort();
    let mut hash = Sha256::new();
    hash.update(id.as_bytes());
    hash.update([0]);
    for (name, len, mtime) in files {
        hash.update(format!("{name}\0{len}\0{mtime}\0").as_bytes());
    }
    hash.update(std::fs::read(dir.join(EPISODE_JSON)).unwrap_or_default());
    Ok(hex(&hash.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Recorded episode folders for compiling, each opened by [`open_one`] only while it is read.
/// Listing them reads their `episode.json` and recovers those left unfinished by a stopped
/// recorder; one that cannot be listed is kept with the reason (compile lists it as left out).
pub fn recorded(dirs: &[PathBuf]) -> Vec<LazyEpisode<'static>> {
    dirs.iter()
        .map(|d| match finish_unfinished(d).and_then(|()| read_episode_json(d).map_err(|e| e.to_string())) {
            Ok(meta) => {
                let dir = d.clone();
                LazyEpisode { meta, unreadable: None, open: Box::new(move || open_one(&dir)) }
            }
            Err(error) => {
                tracing::warn!("{}: unreadable, left out: {error}", d.display());
                let ep = UnreadableEpisode::new(&folder_id(d), error.clone());
                LazyEpisode {
                    meta: ep.meta.clone(),
                    unreadable: Some(error),
                    open: Box::new(move || Box::new(ep.clone())),
                }
            }
        })
        .collect()
}

/// Opens a recorded episode folder for compiling. One that cannot be opened is kept as an
/// [`UnreadableEpisode`] (compile lists it with the reason and compiles the rest); one left
/// unfinished by a recorder that is gone (kill -9) is recovered first, as the next recorder
/// would; one whose recorder still runs is listed as being recorded.
pub fn open_one(dir: &Path) -> Box<dyn EpisodeSource> {
    let opened = finish_unfinished(dir).and_then(|()| McapEpisode::open(dir).map_err(|e| e.to_string()));
    match opened {
        Ok(ep) => Box::new(ep),
        Err(error) => {
            tracing::warn!("{}: unreadable, left out: {error}", dir.display());
            Box::new(UnreadableEpisode::new(&folder_id(dir), error))
        }
    }
}

/// Recovers an episode left unfinished (a `RECORDING` marker) by a recorder that is no longer
/// running; `Err` names the live recorder when there is one, or why recovery failed.
fn finish_unfinished(dir: &Path) -> Result<(), String> {
    let marker = dir.join(RECORDING_MARKER);
    let Ok(text) = std::fs::read_to_string(&marker) else { return Ok(()) };
    if let Some(pid) = live_recorder(&text) {
        return Err(format!(
            "{}: still being recorded by pid {pid}; compile it after that recording stops",
            dir.display()
        ));
    }
    let r = recover_episode(dir).map_err(|e| e.to_string())?;
    tracing::warn!(
        "{}: recovered an episode left unfinished by a stopped recorder: {} messages from {} chunks{}",
        dir.display(),
        r.messages,
        r.chunks,
        r.stopped.map(|s| format!(" (damaged tail: {s})")).unwrap_or_default()
    );
    Ok(())
}

/// Marks episode `id` of `root` discarded with `reason` (or, with `restore`, takes a discard
/// back) in its `episode.json`; returns the new metadata. Refused while it is being recorded.
pub fn set_discarded(root: &Path, id: &str, reason: &str, restore: bool) -> Result<EpisodeMeta, SelectionError> {
    let dir = root.join("episodes").join(id);
    if id.is_empty() || id.contains('/') || id == "." || id == ".." || !dir.join(EPISODE_JSON).is_file() {
        return Err(SelectionError::UnknownEpisode { root: root.to_path_buf(), id: id.to_string() });
    }
    if let Some(pid) = recording_pid(&dir) {
        return Err(SelectionError::Recording { id: id.to_string(), pid });
    }
    let mut meta = read_episode_json(&dir)
        .map_err(|e| SelectionError::Io { path: dir.join(EPISODE_JSON), message: e.to_string() })?;
    meta.discarded = (!restore).then(|| Discard {
        reason: reason.to_string(),
        time_unix_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0),
    });
    write_episode_json(&dir, &meta)
        .map_err(|e| SelectionError::Io { path: dir.join(EPISODE_JSON), message: e.to_string() })?;
    Ok(meta)
}
