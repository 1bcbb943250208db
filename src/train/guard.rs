//! Guards of a training state folder: one training at a time ([`StateLock`]), an existing state
//! never silently restarted ([`check_start`]), and the leftovers of a killed state write removed
//! by the next run.
//!
//! The lock is an `flock` on `<state_dir>/train.lock`, which holds the holder's pid: the kernel
//! releases it when the holder exits, crash included, so a stale lock never blocks a later run.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Lock file name inside the state folder.
pub const LOCK_FILE: &str = "train.lock";
/// The state file a resume continues from.
pub const LATEST_STATE: &str = "latest.safetensors";

/// Errors of the guards; each names the folder and what to do.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// Another training holds the folder.
    #[error("{dir}: another training (pid {pid}) is using this state folder; wait for it or use another `checkpoint.state_dir`")]
    Locked {
        /// State folder.
        dir: PathBuf,
        /// The holder's pid as written in the lock file (`?` when unreadable).
        pid: String,
    },
    /// A state exists and neither resume nor fresh was asked for.
    #[error("{dir}: holds the training state `{LATEST_STATE}`; pass --resume to continue it or --fresh to start over (it is then replaced)")]
    ExistingState {
        /// State folder.
        dir: PathBuf,
    },
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// File or folder.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> GuardError + '_ {
    move |source| GuardError::Io { path: path.to_path_buf(), source }
}

/// Refuses to start over an existing state unless `resume` or `fresh` says what to do with it.
pub fn check_start(state_dir: &Path, resume: bool, fresh: bool) -> Result<(), GuardError> {
    if !resume && !fresh && state_dir.join(LATEST_STATE).exists() {
        return Err(GuardError::ExistingState { dir: state_dir.to_path_buf() });
    }
    Ok(())
}

/// Exclusive use of a state folder, held until dropped (or the process ends).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    /// Leftovers of an interrupted run removed when the lock was taken.
    pub removed: Vec<PathBuf>,
}

impl StateLock {
    /// Takes the lock of `state_dir` (created if absent), writes this pid into it, then removes
    /// the temporary files (`.<name>.tmp`) a killed state write left.
    pub fn acquire(state_dir: &Path) -> Result<Self, GuardError> {
        std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
        let path = state_dir.join(LOCK_FILE);
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = if pid.trim().is_empty() { "?".to_string() } else { pid.trim().to_string() };
            return Err(GuardError::Locked { dir: state_dir.to_path_buf(), pid });
        }
        file.set_len(0).map_err(io(&path))?;
        file.rewind().map_err(io(&path))?;
        writeln!(file, "{}", std::process::id()).map_err(io(&path))?;
        let removed = remove_tmp_leftovers(state_dir)?;
        Ok(Self { _file: file, removed })
    }
}

/// Removes `.<name>.tmp` files (an atomic write killed before its rename) from `dir`.
fn remove_tmp_leftovers(dir: &Path) -> Result<Vec<PathBuf>, GuardError> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with('.') && name.ends_with(".tmp") && path.is_file() {
            std::fs::remove_file(&path).map_err(io(&path))?;
            tracing::warn!("{}: removed the leftover of an interrupted state write", path.display());
            removed.push(path);
        }
    }
    Ok(removed)
}
