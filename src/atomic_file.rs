//! Durable atomic file replacement: the one way this crate writes a file that readers (another
//! node, a resumed job, the user after a power cut) may open at any time. The bytes go to a
//! temporary sibling `.<name>.<pid>.tmp`, which is fsynced, renamed over the target, and the
//! folder is fsynced: a reader sees the old file or the complete new one, never a torn one.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A failed step of an atomic write, with the file it concerned.
#[derive(Debug, thiserror::Error)]
#[error("{op} `{path}`: {source}")]
pub struct WriteError {
    /// The step: `create`, `write`, `fsync`, `rename into`, `fsync folder`.
    pub op: &'static str,
    /// The file or folder.
    pub path: PathBuf,
    /// The operating system's error.
    #[source]
    pub source: io::Error,
}

impl WriteError {
    /// The path and an I/O error whose message names the failed step, for error types that
    /// hold a path and an `io::Error`.
    pub fn into_parts(self) -> (PathBuf, io::Error) {
        (self.path, io::Error::new(self.source.kind(), format!("{}: {}", self.op, self.source)))
    }
}

fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WriteError + 'a {
    move |source| WriteError { op, path: path.to_path_buf(), source }
}

/// Replaces `path` with `bytes` durably. On failure (a full disk, say) the temporary is removed
/// and `path` is left as it was.
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let tmp = tmp_sibling(path);
    let written = (|| {
        let mut f = File::create(&tmp).map_err(err("create", &tmp))?;
        f.write_all(bytes).map_err(err("write", &tmp))?;
        f.sync_all().map_err(err("fsync", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(err("rename into", path))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    fsync_dir(parent(path))
}

/// The temporary name [`write`] uses for `path`: per process, so that processes writing the
/// same file at once (data-parallel ranks filling one cache) never share a temporary.
fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Whether `name` is a temporary of [`write`] for a file named `target` (any file when `None`)
/// left by a process that is gone; one of a live process is still being written.
pub fn is_stale_tmp(name: &str, target: Option<&str>) -> bool {
    let Some(stem) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else { return false };
    let (file, pid) = match stem.rsplit_once('.') {
        Some((file, pid)) if pid.parse::<u32>().is_ok() => (file, pid.parse::<u32>().ok()),
        _ => (stem, None),
    };
    if target.is_some_and(|t| t != file) {
        return false;
    }
    match pid {
        Some(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
        None => true,
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsyncs a folder, making the creations, renames and removals in it durable.
pub fn fsync_dir(dir: &Path) -> Result<(), WriteError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(err("fsync folder", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write(&p, b"old").unwrap();
        write(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_names_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write(&p, b"old").unwrap();
        // Renaming a file over a non-empty folder fails: the old folder stays, no temporary is left.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"x").unwrap();
        let e = write(&blocked, b"new").unwrap_err();
        assert_eq!(e.op, "rename into");
        assert!(e.to_string().contains("blocked"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn stale_temporaries_are_those_of_gone_processes() {
        let me = std::process::id();
        assert!(!is_stale_tmp(&format!(".latest.{me}.tmp"), Some("latest")));
        // pid 0 is never a process with a /proc entry.
        assert!(is_stale_tmp(".latest.0.tmp", Some("latest")));
        assert!(!is_stale_tmp(".latest.0.tmp", Some("other")));
        assert!(is_stale_tmp(".a.safetensors.0.tmp", None));
        assert!(is_stale_tmp(".job.json.tmp", Some("job.json")));
        assert!(!is_stale_tmp("latest", None));
    }
}
