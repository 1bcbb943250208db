//! Identity of a base model folder by content: `qwen2_5_vl:v2:` + sha256 over config.json and,
//! per weight file (`*.safetensors`, by name), its name, size and the sha256 of its bytes. A
//! merged or re-fine-tuned model with the same config and sharding gets a new id, so caches
//! keyed on it miss and checkpoints trained on another base are refused.
//!
//! Hashing a 3B model's 7.5 GB takes seconds, so each file's hash is kept beside the model in
//! [`SIDECAR`], reused while the file's size, modification and change times and inode are the
//! ones it was hashed at. A read-only folder is hashed again at every start (with a warning).

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A model file that could not be read or listed.
#[derive(Debug, thiserror::Error)]
#[error("{action} `{path}`: {source}")]
pub struct ModelIdError {
    /// What was being done (`read`, `stat`, ...).
    pub action: &'static str,
    /// The file or folder.
    pub path: PathBuf,
    /// The operating system's error.
    #[source]
    pub source: std::io::Error,
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ModelIdError {
    let path = path.to_path_buf();
    move |source| ModelIdError { action, path, source }
}

/// The hashes kept beside the model (`<model>/.vla_finetune_weights_sha256.json`).
pub const SIDECAR: &str = ".vla_finetune_weights_sha256.json";

/// Prefix of the ids of this scheme; ids without it came from an older vla_finetune.
pub const ID_PREFIX: &str = "qwen2_5_vl:v2:";

/// What a weight file's hash was computed at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileHash {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
    sha256: String,
}

impl FileHash {
    fn stamp(m: &std::fs::Metadata) -> (u64, i128, i128, u64) {
        let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
        (m.len(), ns(m.mtime(), m.mtime_nsec()), ns(m.ctime(), m.ctime_nsec()), m.ino())
    }

    fn matches(&self, m: &std::fs::Metadata) -> bool {
        (self.size, self.mtime_ns, self.ctime_ns, self.inode) == Self::stamp(m)
    }
}

/// The id of the base model in `dir` (see the module doc).
pub fn base_model_id(dir: &Path) -> Result<String, ModelIdError> {
    let config = dir.join("config.json");
    let mut h = Sha256::new();
    h.update(std::fs::read(&config).map_err(io_err("read", &config))?);
    let sidecar = dir.join(SIDECAR);
    let known: BTreeMap<String, FileHash> =
        std::fs::read(&sidecar).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io_err("list folder", dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    let mut hashes = BTreeMap::new();
    for name in names {
        let path = dir.join(&name);
        let meta = std::fs::metadata(&path).map_err(io_err("stat", &path))?;
        let entry = match known.get(&name) {
            Some(k) if k.matches(&meta) => k.clone(),
            _ => {
                let sha256 = file_sha256(&path)?;
                let (size, mtime_ns, ctime_ns, inode) = FileHash::stamp(&meta);
                FileHash { size, mtime_ns, ctime_ns, inode, sha256 }
            }
        };
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(entry.size.to_le_bytes());
        h.update(entry.sha256.as_bytes());
        hashes.insert(name, entry);
    }
    if hashes != known {
        remember(&sidecar, &hashes);
    }
    Ok(format!("{ID_PREFIX}{}", hex::encode(h.finalize())))
}

/// `, recorded by an older vla_finetune ...` when `id` is not of this scheme, else empty: the
/// end of a "trained on another base model" message.
pub fn older_scheme_note(id: &str) -> &'static str {
    if id.starts_with(ID_PREFIX) {
        ""
    } else {
        " (that id is of an older vla_finetune, which identified a model by its file sizes only: train the checkpoint again on this base model)"
    }
}

fn file_sha256(path: &Path) -> Result<String, ModelIdError> {
    let mut f = std::fs::File::open(path).map_err(io_err("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Writes the sidecar atomically (concurrent starts never leave a torn file); a folder that cannot be written only costs the next start a full hash.
fn remember(sidecar: &Path, hashes: &BTreeMap<String, FileHash>) {
    let bytes = serde_json::to_vec_pretty(hashes).expect("file hashes serialize");
    if let Err(e) = crate::atomic_file::write(sidecar, &bytes) {
        tracing::warn!(file = %sidecar.display(), "weight hashes not kept ({e}): the model will be hashed again at the next start");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(dir: &Path, weights: &[u8]) {
        std::fs::write(dir.join("config.json"), b"{\"model_type\": \"qwen2_5_vl\"}").unwrap();
        std::fs::write(dir.join("model.safetensors"), weights).unwrap();
    }

    #[test]
    fn the_id_follows_weight_content_not_only_sizes_and_the_sidecar_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        model(dir.path(), b"weights-one");
        let a = base_model_id(dir.path()).unwrap();
        assert!(a.starts_with(ID_PREFIX), "{a}");
        assert!(dir.path().join(SIDECAR).is_file());
        assert_eq!(base_model_id(dir.path()).unwrap(), a, "same files, same id");
        // Same name, same size, other content (a merged or re-fine-tuned model).
        model(dir.path(), b"weights-two");
        let b = base_model_id(dir.path()).unwrap();
        assert_ne!(a, b);
        // A stale sidecar entry (right size, old stamp) is not trusted.
        let mut known: BTreeMap<String, FileHash> =
            serde_json::from_slice(&std::fs::read(dir.path().join(SIDECAR)).unwrap()).unwrap();
        known.get_mut("model.safetensors").unwrap().mtime_ns -= 1;
        std::fs::write(dir.path().join(SIDECAR), serde_json::to_vec(&known).unwrap()).unwrap();
        assert_eq!(base_model_id(dir.path()).unwrap(), b);
        // The sidecar's hash is what is used while the stamp matches (it is not recomputed).
        let mut known: BTreeMap<String, FileHash> =
            serde_json::from_slice(&std::fs::read(dir.path().join(SIDECAR)).unwrap()).unwrap();
        known.get_mut("model.safetensors").unwrap().sha256 = "0".repeat(64);
        std::fs::write(dir.path().join(SIDECAR), serde_json::to_vec(&known).unwrap()).unwrap();
        assert_ne!(base_model_id(dir.path()).unwrap(), b);
        assert_eq!(older_scheme_note(&b), "");
        assert!(older_scheme_note("qwen2_5_vl:0123").contains("older vla_finetune"));
    }
}
