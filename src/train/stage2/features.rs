//! [`Features`]: where Stage 2 takes the VL features from, one variant per `cache.mode`, each
//! with the state only that mode has (see the module doc of [`super::task`]).

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::vl::{only_tensor, HostWeights, Vl};
use crate::dist::Group;
use crate::train::cache::{CacheStats, FeatureCache};
use crate::train::config::{CacheMode, TrainConfig};
use crate::train::drift::{feature_drift, DriftStats, RefreshDecision, RefreshPolicy};
use crate::train::error::TrainError;
use crate::train::progress::Phase;

type Result<T> = std::result::Result<T, TrainError>;

const POOLED: &str = "pooled";

/// Features-mode state saved with the training state (exact resume).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct FeatureState {
    /// Adapter hash the cached features were computed with (None: not built yet).
    adapter: Option<String>,
    /// Cached epochs begun since the last (re)build.
    cached_since_refresh: u64,
    /// Refresh epochs begun.
    refreshes: u64,
    /// Drift measured after the last refresh epoch.
    drift: Option<DriftStats>,
    /// The epoch whose decision is below (so a resumed epoch keeps it).
    decided_epoch: Option<u64>,
    /// Whether that epoch runs the VL model live.
    live: bool,
}

/// The cache folder and the vision entries this process computed into it.
pub(super) struct Store {
    pub(super) cache: FeatureCache,
    /// Pin the vision entries (`vision` mode: every step reads them).
    pub(super) pin_vision: bool,
    /// Vision entries computed by this process.
    pub(super) vision_built: u64,
}

/// The source of the VL features, by `cache.mode`.
pub(super) enum Features {
    /// `off`: the whole VL model live every step.
    Live,
    /// `vision`: the vision embeddings cached (pinned), the decoder live every step.
    Vision(Box<Store>),
    /// `features`: pooled VL features cached, rewritten after each refresh epoch.
    Cached(Box<CachedFeatures>),
}

/// The `features` mode's cache and bookkeeping.
pub(super) struct CachedFeatures {
    store: Store,
    /// Owner of this job's features entries in the shared cache folder (`features@<state_dir>`).
    owner: String,
    refresh: Option<RefreshPolicy>,
    /// Training samples whose drift is measured after a refresh epoch.
    probe: Vec<usize>,
    fs: FeatureState,
    /// Offload the base VL weights during cached epochs (on an accelerator).
    offload: bool,
}

/// Whether this process builds sample `i`'s cache entries (data-parallel: its share).
pub(super) fn builds(group: Option<&Group>, i: usize) -> bool {
    group.is_none_or(|g| i % g.world_size() == g.rank())
}

/// `k` of `items` evenly spaced over the whole list (all of them when `k >= len`): the drift
/// probe covers every episode, not the first one (samples are stored episode by episode).
fn spread(items: &[usize], k: usize) -> Vec<usize> {
    let n = items.len();
    if k >= n {
        return items.to_vec();
    }
    (0..k).map(|j| items[j * n / k]).collect()
}

impl Features {
    /// The source `cfg.cache.mode` names, its cache opened (a vision cache checked to fit first).
    pub(super) fn open(cfg: &TrainConfig, vl: &mut Vl, train_idx: &[usize]) -> Result<Self> {
        let open = || FeatureCache::open(&cfg.cache.dir, cfg.cache_config());
        Ok(match cfg.cache.mode {
            CacheMode::Off => Self::Live,
            CacheMode::Vision => {
                let cache = open()?;
                vl.check_vision_cache_fits(&cache)?;
                Self::Vision(Box::new(Store { cache, pin_vision: true, vision_built: 0 }))
            }
            CacheMode::Features => Self::Cached(Box::new(CachedFeatures {
                store: Store { cache: open()?, pin_vision: false, vision_built: 0 },
                owner: format!("features@{}", cfg.checkpoint.state_dir.display()),
                refresh: cfg.refresh_policy(),
                probe: spread(train_idx, cfg.cache.probe_samples.max(1)),
                fs: FeatureState::default(),
                offload: cfg.memory.offload_vl_when_cached && vl.device != Device::Cpu,
            })),
        })
    }

    pub(super) fn mode(&self) -> CacheMode {
        match self {
            Self::Live => CacheMode::Off,
            Self::Vision(_) => CacheMode::Vision,
            Self::Cached(_) => CacheMode::Features,
        }
    }

    /// The cache, in `vision` and `features` modes.
    pub(super) fn store_mut(&mut self) -> Option<&mut Store> {
        match self {
            Self::Live => None,
            Self::Vision(store) => Some(&mut **store),
            Self::Cached(c) => Some(&mut c.store),
        }
    }

    fn store(&self) -> Option<&Store> {
        match self {
            Self::Live => None,
            Self::Vision(store) => Some(&**store),
            Self::Cached(c) => Some(&c.store),
        }
    }

    fn state(&self) -> Option<&FeatureState> {
        match self {
            Self::Cached(c) => Some(&c.fs),
            _ => None,
        }
    }

    /// The cache's counters (zero without a cache).
    pub(super) fn stats(&self) -> CacheStats {
        self.store().map(|s| s.cache.stats()).unwrap_or_default()
    }

    /// Vision-cache entries computed by this process.
    pub(super) fn vision_built(&self) -> u64 {
        self.store().map_or(0, |s| s.vision_built)
    }

    /// Refresh epochs begun (`features` mode).
    pub(super) fn refreshes(&self) -> u64 {
        self.state().map_or(0, |fs| fs.refreshes)
    }

    /// Drift (rel. L2 mean over the probe set) measured at the last refresh, if any.
    pub(super) fn last_drift(&self) -> Option<f64> {
        self.state().and_then(|fs| fs.drift).map(|d| d.rel_l2_mean)
    }

    /// Whether the current epoch is a refresh epoch (`features` mode).
    pub(super) fn refreshing(&self) -> bool {
        self.state().is_some_and(|fs| fs.live)
    }

    /// The state saved with the training state (the defaults outside `features` mode).
    pub(super) fn saved_state(&self) -> serde_json::Value {
        serde_json::to_value(self.state().cloned().unwrap_or_default()).expect("cache state serializes")
    }

    /// Restores [`Features::saved_state`] (checked in every mode, kept in `features` mode).
    pub(super) fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let fs: FeatureState = serde_json::from_value(state.clone())
            .map_err(|e| TrainError::invalid("features-mode cache state", e.to_string()))?;
        if let Self::Cached(c) = self {
            c.fs = fs;
        }
        Ok(())
    }
}

impl Store {
    /// Begins a `vision`-mode epoch: the first one (or one that finds none built by this
    /// process) builds this process's share of the vision embeddings; then the vision tower
    /// waits in host memory (on an accelerator).
    pub(super) fn begin_epoch(&mut self, vl: &mut Vl, group: Option<&Group>, epoch: u64) -> Result<()> {
        if epoch == 0 || self.vision_built == 0 {
            for i in (0..vl.ds.len()).filter(|&i| builds(group, i)) {
                let _ = vl.vision_embeds(self, i)?;
            }
        }
        // Every step now reads the cache: the vision tower waits in host memory (it
        // comes back only to fill a miss) and its blocks go back to the device.
        if vl.device != Device::Cpu && vl.host != HostWeights::VisionTower {
            vl.offload_vision_tower();
            crate::memory::release_cached_accelerator_memory()?;
        }
        Ok(())
    }
}

impl CachedFeatures {
    /// Whether the features are cached under some adapter yet.
    pub(super) fn built(&self) -> bool {
        self.fs.adapter.is_some()
    }

    /// Whether the current epoch trains from the cache (not a refresh epoch).
    pub(super) fn cached_epoch(&self) -> bool {
        !self.fs.live
    }

    /// Cached pooled features of sample `i` under the adapter the cache holds.
    pub(super) fn get(&mut self, vl: &mut Vl, i: usize) -> Result<Tensor> {
        let adapter = self.fs.adapter.clone().ok_or_else(|| {
            TrainError::invalid("features cache", "is not built yet (expected a cached epoch after it was built)")
        })?;
        let key = vl.memo_key(i, "features", &adapter)?;
        if let Some(t) = self.store.cache.get(&key) {
            return Ok(only_tensor(t));
        }
        let (f, _) = vl.live_features(Some(&mut self.store), &[i], false)?;
        let f = f.to_device(Device::Cpu);
        self.store.cache.put_owned(key, &[(POOLED.to_string(), f.shallow_clone())], &self.owner)?;
        Ok(f)
    }

    /// Writes the features of every sample under the current adapter's key (the missing ones
    /// computed in batches of `chunk`), pins them and removes this job's other features entries
    /// (older adapters); other jobs' entries and the shared vision embeddings stay.
    fn rebuild(&mut self, vl: &mut Vl, group: Option<&Group>, chunk: usize) -> Result<()> {
        let adapter = vl.adapter_hash();
        self.store.cache.unpin_all();
        let mut missing = Vec::new();
        for i in 0..vl.ds.len() {
            let key = vl.memo_key(i, "features", &adapter)?;
            self.store.cache.pin(key);
            if !self.store.cache.contains(&key) && builds(group, i) {
                missing.push((i, key));
            }
        }
        for part in missing.chunks(chunk.max(1)) {
            let idx: Vec<usize> = part.iter().map(|&(i, _)| i).collect();
            let f = vl.live_features_nograd(Some(&mut self.store), &idx)?;
            for (row, &(_, key)) in part.iter().enumerate() {
                let pooled = f.narrow(0, row as i64, 1).copy();
                self.store.cache.put_owned(key, &[(POOLED.to_string(), pooled)], &self.owner)?;
            }
        }
        // Only a complete rebuild moves the cache to the new adapter (one cut short by an
        // out-of-memory is done again in smaller chunks).
        self.fs.adapter = Some(adapter);
        if group.is_none_or(|g| g.is_main()) {
            self.store.cache.remove_unpinned_owned_by(&self.owner)?;
        }
        Ok(())
    }

    /// Decides once per epoch whether `epoch` is a refresh epoch.
    fn decide(&mut self, epoch: u64) {
        if self.fs.decided_epoch == Some(epoch) {
            return;
        }
        let live = match (&self.fs.adapter, self.refresh) {
            (Some(_), Some(p)) => {
                matches!(p.decide(self.fs.cached_since_refresh, self.fs.drift.as_ref()), RefreshDecision::Refresh(_))
            }
            _ => false,
        };
        if live {
            self.fs.refreshes += 1;
            self.fs.cached_since_refresh = 0;
        } else {
            self.fs.cached_since_refresh += 1;
        }
        self.fs.decided_epoch = Some(epoch);
        self.fs.live = live;
    }

    /// Begins `epoch`: a refresh epoch puts the VL model on the device with the LoRA trainable;
    /// a cached one freezes the LoRA, rebuilds the cache if the adapter changed and offloads the
    /// base VL weights when asked.
    pub(super) fn begin_epoch(
        &mut self,
        vl: &mut Vl,
        group: Option<&Group>,
        epoch: u64,
        chunk: usize,
    ) -> Result<Phase> {
        self.decide(epoch);
        vl.set_lora_trainable(self.fs.live);
        let current = vl.adapter_hash();
        if !self.fs.live && self.fs.adapter.as_deref() != Some(current.as_str()) {
            self.rebuild(vl, group, chunk)?;
        }
        if self.fs.live {
            vl.back_to_device();
        } else if self.offload && vl.host != HostWeights::All {
            vl.offload_all();
            // Hand the freed blocks back to the device (a policy may share the GPU).
            crate::memory::release_cached_accelerator_memory()?;
        }
        Ok(if self.fs.live { Phase::RefreshingCache } else { Phase::Training })
    }

    /// Ends a refresh epoch: the drift of the probe set (rank 0's, broadcast), then the cache
    /// under the new adapter.
    pub(super) fn end_refresh(&mut self, vl: &mut Vl, group: Option<&Group>, chunk: usize) -> Result<()> {
        let probe = self.probe.clone();
        let cached = probe.iter().map(|&i| self.get(vl, i)).collect::<Result<Vec<_>>>()?;
        let fresh = probe
            .chunks(chunk.max(1))
            .map(|c| vl.live_features_nograd(Some(&mut self.store), c))
            .collect::<Result<Vec<_>>>()?;
        let drift = feature_drift(&Tensor::cat(&fresh, 0), &Tensor::cat(&cached, 0))?;
        self.fs.drift = Some(match group {
            Some(g) => {
                let bytes = serde_json::to_vec(&drift).map_err(|e| TrainError::invalid("drift", e.to_string()))?;
                serde_json::from_slice(&g.broadcast_bytes(&bytes)?)
                    .map_err(|e| TrainError::invalid("drift from rank 0", e.to_string()))?
            }
            None => drift,
        });
        self.rebuild(vl, group, chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn the_probe_is_spread_over_the_whole_training_split() {
        let train: Vec<usize> = (100..110).collect();
        assert_eq!(spread(&train, 4), [100, 102, 105, 107]);
        assert_eq!(spread(&train, 10), train);
        assert_eq!(spread(&train, 32), train);
        assert_eq!(spread(&train, 1), [100]);
    }
}
