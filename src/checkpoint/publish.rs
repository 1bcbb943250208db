//! Publication of deployable checkpoints: `checkpoints/<version>/` folders that appear whole or
//! not at all, each with a `manifest.json` listing every file's sha256 and size, and a `latest`
//! pointer.
//!
//! Protocol ([`Publisher::stage`] then [`Publisher::commit`]):
//! 1. copy the files into `<root>/.tmp-<version>/`, fsync each file and folder;
//! 2. write `manifest.json` there (fsynced);
//! 3. rename the folder to `<root>/<version>/`, fsync `<root>`;
//! 4. write `<root>/.latest.<pid>.tmp` holding the version name, fsync, rename it to `<root>/latest`,
//!    fsync `<root>`.
//!
//! `latest` is a small text file (the version name and a newline), not a symlink: renaming a file
//! over it is atomic on every POSIX filesystem, works where symlinks do not (some network and
//! Windows-shared mounts, container volume copies), and a reader resolves it with one read
//! without following links into a folder that may be pruned. A crash at any point leaves the
//! previous `latest` and its folder intact; stale `.tmp-*` folders are removed by the next stage.
//! Versions are `v0001`, `v0002`, ... (at least four digits), one above the highest published.
//! One publisher per root at a time (the trainer job); readers may run concurrently.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::atomic_file::{self, fsync_dir, write as write_atomic, WriteError};

/// Manifest layout version written by this code.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;
/// File name of the manifest inside a checkpoint folder.
pub const MANIFEST_NAME: &str = "manifest.json";
/// The dataset statistics a checkpoint carries (its identity for [`Publisher::guard_latest`]).
const STATS_NAME: &str = super::deploy::STATS_FILE;
/// File name of the pointer to the latest version inside the root.
pub const LATEST_NAME: &str = "latest";
const TMP_PREFIX: &str = ".tmp-";

/// Errors of publication and verification.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A filesystem operation failed.
    #[error("{op} `{path}`: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    /// A durable write failed.
    #[error(transparent)]
    Durable(#[from] WriteError),
    /// The publish request is unusable.
    #[error("publish request: {0}")]
    Request(String),
    /// `manifest.json` is missing or unreadable.
    #[error("manifest `{path}`: {reason}")]
    Manifest { path: PathBuf, reason: String },
    /// A file listed in the manifest is absent.
    #[error("checkpoint `{dir}`: file `{file}` listed in the manifest is missing")]
    MissingFile { dir: PathBuf, file: String },
    /// A file is present that the manifest does not list.
    #[error("checkpoint `{dir}`: file `{file}` is not listed in the manifest")]
    ExtraFile { dir: PathBuf, file: String },
    /// A file's size differs from the manifest (e.g. truncated).
    #[error("checkpoint `{dir}`: file `{file}` has {actual} bytes, manifest says {expected}")]
    SizeMismatch { dir: PathBuf, file: String, expected: u64, actual: u64 },
    /// A file's content hash differs from the manifest (corrupted or replaced).
    #[error("checkpoint `{dir}`: file `{file}` has sha256 {actual}, manifest says {expected}")]
    HashMismatch { dir: PathBuf, file: String, expected: String, actual: String },
    /// The `latest` pointer is unreadable or names no published version.
    #[error("latest pointer `{path}`: {reason}")]
    Latest { path: PathBuf, reason: String },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PublishError + 'a {
    move |source| PublishError::Io { op, path: path.to_path_buf(), source }
}

/// One file in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to the checkpoint folder, `/`-separated.
    pub path: String,
    /// Lower-case hex sha256 of the content.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// The `manifest.json` of a published checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// Version name (`v0001`, ...), equal to the folder name when published.
    pub version: String,
    /// Creation time, RFC 3339 UTC (`2026-11-27T00:10:00Z`).
    pub created: String,
    /// Identity of the base VL model the adapter and heads belong to.
    pub base_model_id: String,
    /// Validation metrics at publication (e.g. `val_action_error_mm`).
    pub metrics: BTreeMap<String, f64>,
    /// Free-form information (job id, epoch, global step, cache mode, ...).
    pub info: serde_json::Value,
    /// Every file of the checkpoint but the manifest itself, sorted by path.
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// The entry for `path`, if listed.
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// Where a published file's content comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Copy this file.
    File(PathBuf),
    /// Copy this folder recursively (regular files only), e.g. a PEFT adapter folder.
    Dir(PathBuf),
    /// Write these bytes (config, normalization stats, metrics JSON).
    Bytes(Vec<u8>),
}

/// One file or folder to publish, at `dest` (relative, `/`-separated) inside the checkpoint.
#[derive(Debug, Clone)]
pub struct PublishItem {
    /// Destination path inside the checkpoint folder.
    pub dest: String,
    /// Content.
    pub source: Source,
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    /// Identity of the base VL model (copied into the manifest).
    pub base_model_id: String,
    /// Validation metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Free-form information for the manifest.
    pub info: serde_json::Value,
    /// The files.
    pub items: Vec<PublishItem>,
}

/// A checkpoint written to its temporary folder, not yet visible.
#[derive(Debug)]
pub struct Staged {
    /// The version it will be published as.
    pub version: String,
    /// The temporary folder (`<root>/.tmp-<version>`).
    pub tmp_dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

/// A published checkpoint: what the `checkpoint` announcement carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// Version name.
    pub version: String,
    /// `<root>/<version>`.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// sha256 (hex) of the `manifest.json` bytes.
    pub manifest_sha256: String,
    /// Whether `latest` now names it (false: kept, not announced, see [`Publisher::guard_latest`]).
    pub latest: bool,
}

/// Publishes versioned checkpoints under one root folder (usually `checkpoints/`).
#[derive(Debug, Clone)]
pub struct Publisher {
    root: PathBuf,
    /// Metric (lower is better) and the version `latest` named when the guard was set: a later
    /// version worse than that one on the same dataset does not become latest.
    guard: Option<(String, Option<String>)>,
}

impl Publisher {
    /// A publisher for `root` (created if absent).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, PublishError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io_err("create folder", &root))?;
        Ok(Self { root, guard: None })
    }

    /// From now on `latest` is not moved to a version whose `metric` (lower is better) is worse
    /// than that of the version `latest` names now (a training restarted over an earlier one),
    /// on the same data: both checkpoints carry the same dataset statistics (`stats.json` with
    /// one sha256), which a compiled dataset has once, with its validation split. Such a version
    /// is still published (kept), not made latest. Within one run the caller decides.
    pub fn guard_latest(mut self, metric: impl Into<String>) -> Result<Self, PublishError> {
        self.guard = Some((metric.into(), self.latest()?));
        Ok(self)
    }

    /// Whether committing `m` moves `latest` (see [`Publisher::guard_latest`]).
    fn moves_latest(&self, m: &Manifest) -> Result<bool, PublishError> {
        let Some((metric, Some(prev))) = &self.guard else { return Ok(true) };
        let Ok(bytes) = fs::read(self.root.join(prev).join(MANIFEST_NAME)) else { return Ok(true) };
        let Ok(old) = serde_json::from_slice::<Manifest>(&bytes) else { return Ok(true) };
        let data = |x: &Manifest| x.file(STATS_NAME).map(|f| f.sha256.clone());
        let same_data = data(m).is_some() && data(m) == data(&old);
        match (m.metrics.get(metric), old.metrics.get(metric)) {
            (Some(new), Some(was)) if same_data && new.is_finite() && was.is_finite() && new > was => {
                tracing::warn!(
                    "{}: {metric} {new} is worse than {prev}'s {was} on the same data; kept, `latest` stays at {prev}",
                    m.version
                );
                Ok(false)
            }
            _ => Ok(true),
        }
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Published version names, oldest first.
    pub fn versions(&self) -> Result<Vec<String>, PublishError> {
        let mut found: Vec<(u64, String)> = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_err("list", &self.root))? {
            let entry = entry.map_err(io_err("list", &self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(n) = parse_version(&name) {
                if entry.path().is_dir() {
                    found.push((n, name));
                }
            }
        }
        found.sort();
        Ok(found.into_iter().map(|(_, n)| n).collect())
    }

    /// The version `latest` names, if any; an error if it names no published folder.
    pub fn latest(&self) -> Result<Option<String>, PublishError> {
        read_latest(&self.root)
    }

    /// The published `version`, verified (see [`verify`]), with whether `latest` names it.
    pub fn published(&self, version: &str) -> Result<Published, PublishError> {
        let dir = self.root.join(version);
        let manifest = verify(&dir)?;
        let manifest_sha256 = hash_file(&dir.join(MANIFEST_NAME))?.0;
        let latest = self.latest()?.as_deref() == Some(version);
        Ok(Published { version: version.to_string(), dir, manifest, manifest_sha256, latest })
    }

    /// The folder of the latest version, if any.
    pub fn latest_dir(&self) -> Result<Option<PathBuf>, PublishError> {
        Ok(self.latest()?.map(|v| self.root.join(v)))
    }

    /// Removes temporary folders and pointer files left by an interrupted publication; returns them.
    pub fn clean_stale(&self) -> Result<Vec<PathBuf>, PublishError> {
        let mut removed = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_err("list", &self.root))? {
            let entry = entry.map_err(io_err("list", &self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(TMP_PREFIX) && path.is_dir() {
                fs::remove_dir_all(&path).map_err(io_err("remove stale folder", &path))?;
            } else if atomic_file::is_stale_tmp(&name, Some(LATEST_NAME)) {
                fs::remove_file(&path).map_err(io_err("remove stale file", &path))?;
            } else {
                continue;
            }
            tracing::warn!("{}: removed the leftover of an interrupted publication", path.display());
            removed.push(path);
        }
        if !removed.is_empty() {
            fsync_dir(&self.root)?;
        }
        Ok(removed)
    }

    /// Steps 1-2: cleans stale temporaries, writes the files and the manifest into
    /// `<root>/.tmp-<next version>/` and fsyncs them. Nothing is visible to readers yet.
    pub fn stage(&self, req: &PublishRequest) -> Result<Staged, PublishError> {
        self.clean_stale()?;
        let next = self.versions()?.iter().filter_map(|v| parse_version(v)).max().unwrap_or(0) + 1;
        let version = format!("v{next:04}");
        let tmp_dir = self.root.join(format!("{TMP_PREFIX}{version}"));
        fs::create_dir(&tmp_dir).map_err(io_err("create folder", &tmp_dir))?;
        let mut dests = BTreeSet::new();
        for item in &req.items {
            let rel = check_dest(&item.dest)?;
            match &item.source {
                Source::File(src) => copy_file(src, &tmp_dir, &rel, &mut dests)?,
                Source::Bytes(bytes) => {
                    let target = prepare_target(&tmp_dir, &rel, &mut dests)?;
                    let mut f = File::create(&target).map_err(io_err("create", &target))?;
                    f.write_all(bytes).map_err(io_err("write", &target))?;
                    f.sync_all().map_err(io_err("fsync", &target))?;
                }
                Source::Dir(src) => copy_dir(src, &tmp_dir, &rel, &mut dests)?,
            }
        }
        let mut files = Vec::with_capacity(dests.len());
        for rel in &dests {
            let (sha256, size) = hash_file(&tmp_dir.join(rel))?;
            files.push(FileEntry { path: rel.clone(), sha256, size });
        }
        let manifest = Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            version: version.clone(),
            created: rfc3339_now(),
            base_model_id: req.base_model_id.clone(),
            metrics: req.metrics.clone(),
            info: req.info.clone(),
            files,
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| PublishError::Request(e.to_string()))?;
        write_atomic(&tmp_dir.join(MANIFEST_NAME), &json)?;
        fsync_tree(&tmp_dir)?;
        fsync_dir(&self.root)?;
        Ok(Staged { version, tmp_dir, manifest })
    }

    /// Steps 3-4: renames the staged folder into place and points `latest` at it.
    pub fn commit(&self, staged: Staged) -> Result<Published, PublishError> {
        let dir = self.root.join(&staged.version);
        if dir.exists() {
            return Err(PublishError::Request(format!("`{}` already exists", dir.display())));
        }
        let latest = self.moves_latest(&staged.manifest)?;
        fs::rename(&staged.tmp_dir, &dir).map_err(io_err("rename into", &dir))?;
        fsync_dir(&self.root)?;
        if latest {
            write_atomic(&self.root.join(LATEST_NAME), format!("{}\n", staged.version).as_bytes())?;
        }
        let manifest_sha256 = hash_file(&dir.join(MANIFEST_NAME))?.0;
        Ok(Published { version: staged.version, dir, manifest: staged.manifest, manifest_sha256, latest })
    }

    /// [`Publisher::stage`] then [`Publisher::commit`].
    pub fn publish(&self, req: &PublishRequest) -> Result<Published, PublishError> {
        let staged = self.stage(req)?;
        self.commit(staged)
    }

    /// Deletes published versions beyond the newest `keep`, never the one `latest` names nor any
    /// in `protect` (e.g. the best); returns the removed folders.
    pub fn prune(&self, keep: usize, protect: &[&str]) -> Result<Vec<PathBuf>, PublishError> {
        let latest = self.latest()?;
        let versions = self.versions()?;
        let cut = versions.len().saturating_sub(keep);
        let mut removed = Vec::new();
        for v in &versions[..cut] {
            if Some(v) == latest.as_ref() || protect.contains(&v.as_str()) {
                continue;
            }
            let path = self.root.join(v);
            fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
            removed.push(path);
        }
        if !removed.is_empty() {
            fsync_dir(&self.root)?;
        }
        Ok(removed)
    }
}

/// The checkpoint folder `path` means: a checkpoints root (a folder with a `latest` pointer and
/// no manifest of its own) or its `latest` file mean the version `latest` names; anything else
/// is returned as given.
pub fn resolve_checkpoint_dir(path: &Path) -> Result<PathBuf, PublishError> {
    let root = if path.file_name().is_some_and(|n| n == LATEST_NAME) && path.is_file() {
        path.parent().unwrap_or(Path::new("."))
    } else if path.is_dir() && !path.join(MANIFEST_NAME).exists() && path.join(LATEST_NAME).is_file() {
        path
    } else {
        return Ok(path.to_path_buf());
    };
    let p = Publisher { root: root.to_path_buf(), guard: None };
    p.latest_dir()?.ok_or_else(|| PublishError::Latest {
        path: root.join(LATEST_NAME),
        reason: "vanished while being read".into(),
    })
}

/// Reads `<dir>/manifest.json`, recomputes every listed file's size and sha256 and checks that no
/// file is missing or unlisted. The first problem found is returned, naming the file.
pub fn verify(dir: &Path) -> Result<Manifest, PublishError> {
    let mpath = dir.join(MANIFEST_NAME);
    let bytes = fs::read(&mpath).map_err(|e| PublishError::Manifest { path: mpath.clone(), reason: e.to_string() })?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| PublishError::Manifest { path: mpath.clone(), reason: e.to_string() })?;
    if manifest.format_version != MANIFEST_FORMAT_VERSION {
        return Err(PublishError::Manifest {
            path: mpath,
            reason: format!("format_version {} (expected {MANIFEST_FORMAT_VERSION})", manifest.format_version),
        });
    }
    let mut present = BTreeSet::new();
    list_files(dir, "", &mut present)?;
    present.remove(MANIFEST_NAME);
    for entry in &manifest.files {
        let path = dir.join(&entry.path);
        if !present.remove(&entry.path) {
            return Err(PublishError::MissingFile { dir: dir.to_path_buf(), file: entry.path.clone() });
        }
        let size = fs::metadata(&path).map_err(io_err("stat", &path))?.len();
        if size != entry.size {
            return Err(PublishError::SizeMismatch {
                dir: dir.to_path_buf(),
                file: entry.path.clone(),
                expected: entry.size,
                actual: size,
            });
        }
        let (sha, _) = hash_file(&path)?;
        if sha != entry.sha256 {
            return Err(PublishError::HashMismatch {
                dir: dir.to_path_buf(),
                file: entry.path.clone(),
                expected: entry.sha256.clone(),
                actual: sha,
            });
        }
    }
    if let Some(extra) = present.into_iter().next() {
        return Err(PublishError::ExtraFile { dir: dir.to_path_buf(), file: extra });
    }
    Ok(manifest)
}

/// sha256 (hex) and size of a file, streamed.
pub fn hash_file(path: &Path) -> Result<(String, u64), PublishError> {
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(h.finalize()), size))
}

/// The version `<root>/latest` names (`Ok(None)` while there is none), checked to be a
/// published version folder: how the trainer, the policy's watcher and the CLI read it.
pub fn read_latest(root: &Path) -> Result<Option<String>, PublishError> {
    let path = root.join(LATEST_NAME);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PublishError::Io { op: "read", path, source: e }),
    };
    let version = text.trim().to_string();
    if parse_version(&version).is_none() || !root.join(&version).is_dir() {
        return Err(PublishError::Latest {
            path,
            reason: format!("names `{version}`, which is not a published version"),
        });
    }
    Ok(Some(version))
}

fn parse_version(name: &str) -> Option<u64> {
    let digits = name.strip_prefix('v')?;
    (digits.len() >= 4 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// A destination must be relative, without `..`, and not the manifest.
fn check_dest(dest: &str) -> Result<String, PublishError> {
    let p = Path::new(dest);
    let ok = !dest.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        return Err(PublishError::Request(format!("destination `{dest}` must be a relative path without `..`")));
    }
    let norm = p.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/");
    if norm == MANIFEST_NAME {
        return Err(PublishError::Request(format!("destination `{dest}` is reserved for the manifest")));
    }
    Ok(norm)
}

fn prepare_target(tmp_dir: &Path, rel: &str, dests: &mut BTreeSet<String>) -> Result<PathBuf, PublishError> {
    if rel == MANIFEST_NAME || !dests.insert(rel.to_string()) {
        return Err(PublishError::Request(format!("destination `{rel}` is given twice or reserved")));
    }
    let target = tmp_dir.join(rel);
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(io_err("create folder", parent))?;
    }
    Ok(target)
}

fn copy_file(src: &Path, tmp_dir: &Path, rel: &str, dests: &mut BTreeSet<String>) -> Result<(), PublishError> {
    let target = prepare_target(tmp_dir, rel, dests)?;
    fs::copy(src, &target).map_err(io_err("copy", src))?;
    File::open(&target).and_then(|f| f.sync_all()).map_err(io_err("fsync", &target))
}

fn copy_dir(src: &Path, tmp_dir: &Path, rel: &str, dests: &mut BTreeSet<String>) -> Result<(), PublishError> {
    let mut files = BTreeSet::new();
    list_files(src, "", &mut files)?;
    if files.is_empty() {
        return Err(PublishError::Request(format!("folder `{}` holds no files", src.display())));
    }
    for f in files {
        copy_file(&src.join(&f), tmp_dir, &format!("{rel}/{f}"), dests)?;
    }
    Ok(())
}

/// Regular files under `dir`, as `/`-separated paths relative to it; anything else is an error.
fn list_files(dir: &Path, prefix: &str, out: &mut BTreeSet<String>) -> Result<(), PublishError> {
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        let ft = entry.file_type().map_err(io_err("stat", &entry.path()))?;
        if ft.is_dir() {
            list_files(&entry.path(), &rel, out)?;
        } else if ft.is_file() {
            out.insert(rel);
        } else {
            return Err(PublishError::Request(format!(
                "`{}` is neither a regular file nor a folder",
                entry.path().display()
            )));
        }
    }
    Ok(())
}

/// fsyncs every folder under and including `dir` (files were synced when written).
fn fsync_tree(dir: &Path) -> Result<(), PublishError> {
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        if entry.file_type().map_err(io_err("stat", &entry.path()))?.is_dir() {
            fsync_tree(&entry.path())?;
        }
    }
    Ok(fsync_dir(dir)?)
}

/// Now as RFC 3339 UTC with seconds.
fn rfc3339_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    rfc3339(secs)
}

/// Unix seconds as RFC 3339 UTC (civil-from-days, proleptic Gregorian calendar).
pub fn rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (year, month, day) = crate::civil_date::civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}
