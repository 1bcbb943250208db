//! Feature cache: keys that bind everything a cached tensor depends on, a disk store (one
//! safetensors file per entry) with a RAM LRU layer, hit/miss/size statistics and pin-aware
//! eviction.
//!
//! A key is the sha256 of a key format version, the cached kind, base model id (by content, see
//! [`crate::checkpoint::model_id`]), compute dtype, adapter version/hash, image-processor settings, prompt
//! and image bytes (each length-prefixed), so a change to any of them is a miss;
//! each file also stores its key in its metadata and is checked on load, so a renamed, foreign or
//! corrupted file is a miss (with a warning, and the file is removed), never a stale hit.
//! Eviction (disk budget) removes least-recently-used entries but never a pinned one (entries the
//! running job still needs); the RAM layer evicts LRU copies only (the disk copy stays).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tch::Tensor;

use super::tensor_io::{self, TensorIoError};

const KEY_META: &str = "cache_key";
const OWNER_META: &str = "cache_owner";

/// Version of the key scheme: a new one makes every older entry a miss.
const KEY_FORMAT: &[u8] = b"vla_finetune.cache.v2";

/// Errors of the cache (only writes and the folder itself; a bad entry is a miss, not an error).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Creating, listing or removing in the cache folder failed.
    #[error("feature cache {op} `{path}`: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    /// Writing an entry failed.
    #[error(transparent)]
    Write(#[from] TensorIoError),
}

/// The identity of a cached value (sha256).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// Lower-case hex.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = hex::decode(s).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", &self.hex()[..12])
    }
}

/// Everything a cached value depends on. Pass exactly what the computation used.
#[derive(Debug, Clone)]
pub struct KeyInput<'a> {
    /// What is cached, e.g. `vision` (vision-tower embeddings) or `features` (pooled VL features).
    pub kind: &'a str,
    /// Identity of the base model by content ([`crate::checkpoint::model_id::base_model_id`]).
    pub base_model: &'a str,
    /// Compute dtype the value was computed in (`f32`, `bf16`).
    pub dtype: &'a str,
    /// Adapter version or hash; `none` when the value does not depend on an adapter (vision tower
    /// with LLM-only LoRA).
    pub adapter: &'a str,
    /// Image-processor settings (resolution, min/max pixels, normalization); serialized with
    /// sorted keys, so key order does not matter.
    pub processor: &'a serde_json::Value,
    /// The exact prompt text (template with instruction filled in); empty when not used.
    pub prompt: &'a str,
    /// Image content bytes, one slice per camera view, in view order.
    pub images: &'a [&'a [u8]],
}

/// The cache key of `input`.
pub fn cache_key(input: &KeyInput<'_>) -> CacheKey {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(KEY_FORMAT);
    field(input.kind.as_bytes());
    field(input.base_model.as_bytes());
    field(input.dtype.as_bytes());
    field(input.adapter.as_bytes());
    field(input.processor.to_string().as_bytes());
    field(input.prompt.as_bytes());
    field(&(input.images.len() as u64).to_le_bytes());
    for img in input.images {
        field(img);
    }
    CacheKey(h.finalize().into())
}

/// Budgets of the cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheConfig {
    /// Bytes of tensors kept in RAM.
    pub ram_budget_bytes: u64,
    /// Bytes of files kept on disk (None: unbounded).
    pub disk_budget_bytes: Option<u64>,
}

/// Counters and sizes, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Lookups served from RAM.
    pub ram_hits: u64,
    /// Lookups served from disk.
    pub disk_hits: u64,
    /// Lookups not served.
    pub misses: u64,
    /// Files found unreadable or holding another key (counted as misses too; removed).
    pub corrupt: u64,
    /// Entries removed from disk by eviction.
    pub evictions: u64,
    /// Entries on disk.
    pub entries: u64,
    /// Bytes on disk.
    pub disk_bytes: u64,
    /// Bytes of tensors in RAM.
    pub ram_bytes: u64,
}

impl CacheStats {
    /// Hits / lookups (0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        let hits = self.ram_hits + self.disk_hits;
        let total = hits + self.misses;
        if total == 0 {
            0.0
        } else {
            hits as f64 / total as f64
        }
    }
}

struct RamEntry {
    tensors: Vec<(String, Tensor)>,
    bytes: u64,
    tick: u64,
}

struct DiskEntry {
    bytes: u64,
    tick: u64,
}

/// The cache: disk store under one folder plus a RAM LRU layer. Not internally synchronized;
/// share it behind a `Mutex`.
pub struct FeatureCache {
    dir: PathBuf,
    cfg: CacheConfig,
    ram: HashMap<CacheKey, RamEntry>,
    disk: HashMap<CacheKey, DiskEntry>,
    pins: HashSet<CacheKey>,
    tick: u64,
    stats: CacheStats,
}

impl FeatureCache {
    /// Opens (creating) the cache folder and indexes the entries already there. Files with names
    /// that are not keys are ignored; temporary leftovers of interrupted writes are removed.
    pub fn open(dir: impl Into<PathBuf>, cfg: CacheConfig) -> Result<Self, CacheError> {
        let dir = dir.into();
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Io { op, path, source }
        };
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let mut disk = HashMap::new();
        for shard in fs::read_dir(&dir).map_err(io("list", &dir))? {
            let shard = shard.map_err(io("list", &dir))?.path();
            if !shard.is_dir() {
                continue;
            }
            for f in fs::read_dir(&shard).map_err(io("list", &shard))? {
                let path = f.map_err(io("list", &shard))?.path();
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if name.starts_with('.') && name.ends_with(".tmp") {
                    // A live process's write in progress stays; another opener may remove a stale one first.
                    if crate::atomic_file::is_stale_tmp(&name, None) {
                        match fs::remove_file(&path) {
                            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("remove", &path)(e)),
                            _ => {}
                        }
                    }
                    continue;
                }
                let Some(key) = name.strip_suffix(".safetensors").and_then(CacheKey::from_hex) else { continue };
                let bytes = fs::metadata(&path).map_err(io("stat", &path))?.len();
                disk.insert(key, DiskEntry { bytes, tick: 0 });
            }
        }
        let mut cache =
            Self { dir, cfg, ram: HashMap::new(), disk, pins: HashSet::new(), tick: 0, stats: CacheStats::default() };
        cache.refresh_sizes();
        Ok(cache)
    }

    /// The cache folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The disk budget (None: unbounded).
    pub fn disk_budget_bytes(&self) -> Option<u64> {
        self.cfg.disk_budget_bytes
    }

    /// Bytes an unprivileged writer may still use on the cache folder's file system.
    pub fn free_disk_bytes(&self) -> std::io::Result<u64> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `path` is NUL-terminated; statvfs fills `st` when it returns 0.
        if unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: initialised by the successful call above.
        let st = unsafe { st.assume_init() };
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Where the entry for `key` is stored.
    pub fn entry_path(&self, key: &CacheKey) -> PathBuf {
        let h = key.hex();
        self.dir.join(&h[..2]).join(format!("{h}.safetensors"))
    }

    /// Whether `key` is stored (RAM or disk), without counting a lookup.
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.ram.contains_key(key) || self.disk.contains_key(key)
    }

    /// Statistics so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Looks `key` up: RAM, then disk (the loaded tensors enter RAM), including an entry another
    /// process wrote since this one opened the folder (a data-parallel rank's share). A missing,
    /// unreadable or foreign file is a miss; the latter two are logged, counted as corrupt and
    /// removed.
    /// Returned tensors share storage with the RAM copy: do not modify them in place.
    pub fn get(&mut self, key: &CacheKey) -> Option<Vec<(String, Tensor)>> {
        self.tick += 1;
        if let Some(e) = self.ram.get_mut(key) {
            e.tick = self.tick;
            if let Some(d) = self.disk.get_mut(key) {
                d.tick = self.tick;
            }
            self.stats.ram_hits += 1;
            return Some(e.tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
        }
        if !self.disk.contains_key(key) && !self.index_if_written_elsewhere(key) {
            self.stats.misses += 1;
            return None;
        }
        let path = self.entry_path(key);
        match self.load_checked(key, &path) {
            Ok(tensors) => {
                self.stats.disk_hits += 1;
                if let Some(d) = self.disk.get_mut(key) {
                    d.tick = self.tick;
                }
                let out = tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
                self.insert_ram(*key, tensors);
                Some(out)
            }
            Err(reason) => {
                tracing::warn!(file = %path.display(), "feature cache entry ignored and removed: {reason}");
                self.stats.corrupt += 1;
                self.stats.misses += 1;
                self.disk.remove(key);
                let _ = fs::remove_file(&path);
                self.refresh_sizes();
                None
            }
        }
    }

    /// Indexes every entry file in the folder that is not indexed yet.
    fn index_entries_written_elsewhere(&mut self) -> Result<(), CacheError> {
        let list = |path: &Path| {
            fs::read_dir(path).map_err(|source| CacheError::Io { op: "list", path: path.to_path_buf(), source })
        };
        for shard in list(&self.dir.clone())?.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
            for path in list(&shard)?.flatten().map(|e| e.path()) {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if let Some(key) = name.strip_suffix(".safetensors").and_then(CacheKey::from_hex) {
                    if !self.disk.contains_key(&key) {
                        self.index_if_written_elsewhere(&key);
                    }
                }
            }
        }
        Ok(())
    }

    /// Indexes `key` when its file exists although this process did not write it.
    fn index_if_written_elsewhere(&mut self, key: &CacheKey) -> bool {
        let Ok(meta) = fs::metadata(self.entry_path(key)) else { return false };
        self.disk.insert(*key, DiskEntry { bytes: meta.len(), tick: self.tick });
        self.refresh_sizes();
        true
    }

    fn load_checked(&self, key: &CacheKey, path: &Path) -> Result<Vec<(String, Tensor)>, String> {
        let loaded = tensor_io::read_safetensors(path).map_err(|e| e.to_string())?;
        match loaded.metadata.get(KEY_META) {
            Some(k) if *k == key.hex() => Ok(loaded.tensors),
            Some(k) => Err(format!("file holds key {k}, expected {}", key.hex())),
            None => Err(format!("no `{KEY_META}` metadata")),
        }
    }

    /// Stores `tensors` under `key` (file written atomically, copy kept in RAM), then evicts
    /// unpinned LRU entries beyond the budgets. The new entry counts as just used.
    pub fn put(&mut self, key: CacheKey, tensors: &[(String, Tensor)]) -> Result<(), CacheError> {
        self.put_entry(key, tensors, None)
    }

    /// [`FeatureCache::put`] of an entry that belongs to `owner` (a job's own values, such as
    /// features under its adapter), for [`FeatureCache::remove_unpinned_owned_by`].
    pub fn put_owned(&mut self, key: CacheKey, tensors: &[(String, Tensor)], owner: &str) -> Result<(), CacheError> {
        self.put_entry(key, tensors, Some(owner))
    }

    fn put_entry(
        &mut self,
        key: CacheKey,
        tensors: &[(String, Tensor)],
        owner: Option<&str>,
    ) -> Result<(), CacheError> {
        self.tick += 1;
        let path = self.entry_path(&key);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|source| CacheError::Io {
                op: "create",
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let mut meta = HashMap::from([(KEY_META.to_string(), key.hex())]);
        if let Some(owner) = owner {
            meta.insert(OWNER_META.to_string(), owner.to_string());
        }
        tensor_io::write_safetensors_atomic(&path, tensors, Some(meta))?;
        let bytes =
            fs::metadata(&path).map_err(|source| CacheError::Io { op: "stat", path: path.clone(), source })?.len();
        self.disk.insert(key, DiskEntry { bytes, tick: self.tick });
        let copy = tensors.iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect();
        self.insert_ram(key, copy);
        self.evict_disk()?;
        self.refresh_sizes();
        Ok(())
    }

    /// Marks `key` as needed by the running job: disk eviction will not remove it.
    pub fn pin(&mut self, key: CacheKey) {
        self.pins.insert(key);
    }

    /// Removes every pin (the job ended or moved to a new key set).
    pub fn unpin_all(&mut self) {
        self.pins.clear();
    }

    /// Whether `key` is pinned.
    pub fn is_pinned(&self, key: &CacheKey) -> bool {
        self.pins.contains(key)
    }

    /// Removes every unpinned entry that `owner` stored (e.g. a job's features under its older
    /// adapters after a refresh); other jobs' entries and unowned ones (vision embeddings) stay.
    /// Returns how many were removed.
    /// Entries other processes wrote since this one opened the folder are included.
    pub fn remove_unpinned_owned_by(&mut self, owner: &str) -> Result<usize, CacheError> {
        self.index_entries_written_elsewhere()?;
        let victims: Vec<CacheKey> = self
            .disk
            .keys()
            .filter(|k| !self.pins.contains(k) && entry_owner(&self.entry_path(k)).as_deref() == Some(owner))
            .copied()
            .collect();
        for k in &victims {
            self.remove(k)?;
        }
        self.refresh_sizes();
        Ok(victims.len())
    }

    fn remove(&mut self, key: &CacheKey) -> Result<(), CacheError> {
        self.ram.remove(key);
        if self.disk.remove(key).is_some() {
            let path = self.entry_path(key);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(CacheError::Io { op: "remove", path, source }),
            }
        }
        Ok(())
    }

    fn insert_ram(&mut self, key: CacheKey, tensors: Vec<(String, Tensor)>) {
        let bytes = tensors.iter().map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum();
        self.ram.insert(key, RamEntry { tensors, bytes, tick: self.tick });
        let mut total: u64 = self.ram.values().map(|e| e.bytes).sum();
        while total > self.cfg.ram_budget_bytes {
            let Some((&victim, _)) = self.ram.iter().min_by_key(|(_, e)| e.tick) else { break };
            total -= self.ram.remove(&victim).map(|e| e.bytes).unwrap_or(0);
        }
        self.refresh_sizes();
    }

    fn evict_disk(&mut self) -> Result<(), CacheError> {
        let Some(budget) = self.cfg.disk_budget_bytes else { return Ok(()) };
        let mut total: u64 = self.disk.values().map(|e| e.bytes).sum();
        let mut candidates: Vec<(u64, CacheKey, u64)> =
            self.disk.iter().filter(|(k, _)| !self.pins.contains(k)).map(|(k, e)| (e.tick, *k, e.bytes)).collect();
        candidates.sort();
        for (_, key, bytes) in candidates {
            if total <= budget {
                break;
            }
            self.remove(&key)?;
            self.stats.evictions += 1;
            total -= bytes;
        }
        if total > budget {
            tracing::warn!(
                disk_bytes = total,
                budget,
                "feature cache over its disk budget: the rest is pinned by the running job"
            );
        }
        Ok(())
    }

    fn refresh_sizes(&mut self) {
        self.stats.entries = self.disk.len() as u64;
        self.stats.disk_bytes = self.disk.values().map(|e| e.bytes).sum();
        self.stats.ram_bytes = self.ram.values().map(|e| e.bytes).sum();
    }
}

/// The `cache_owner` metadata of an entry file, read from its safetensors header only (None for
/// an unowned or unreadable file).
fn entry_owner(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut f = fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&header).ok()?;
    header.get("__metadata__")?.get(OWNER_META)?.as_str().map(str::to_string)
}
