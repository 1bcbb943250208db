//! Episodes -> a compiled training dataset (see [`super::store`] for the layout).
//!
//! Episodes are processed in id order. Each is split as a whole into train or validation
//! (no sample of one episode lands in both), aligned with [`Aligner`], its frames encoded to JPEG,
//! and its samples appended to shards. Statistics come from the training split only. An episode
//! that cannot be read or does not match the dataset's shapes is listed in the report with its
//! error and the others are still compiled. The expected streams are those of the majority of
//! the episodes that yield sample times (ties: the first by id), so one empty or odd episode
//! never sets them. A damaged recording is compiled from what could be read and its
//! [`Damage`] is reported with the episode. A compile that yields no sample is an error and
//! leaves any existing output untouched. The staging folders of compiles that were killed are
//! removed first and listed in the report.
//!
//! Besides the alignment drop reasons ([`super::align::DropReason`]), a sample is dropped as
//! `camera_bad_frame:<camera>` when its frame cannot be read or encoded, and as
//! `camera_size_changed:<camera>` when the frame size differs from the camera's first frame.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::align::{AlignConfig, AlignError, AlignedSample, Aligner, DropCounts, DropReason, StreamReport};
use super::episode::{Damage, EpisodeSource, ImageError, LazyEpisode, RgbImage};
use super::stats::{DatasetStats, StatsAccumulator, DEFAULT_RESERVOIR_ROWS};
use super::store::{
    write_synced, CameraInfo, DatasetIndex, EpisodeEntry, SampleEntry, ShardInfo, ShardWriter, Split, Staging,
    StoreError, CONFIG_FILE, FORMAT, INDEX_FILE, REPORT_FILE, STATS_FILE,
};

/// Train/validation split settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SplitConfig {
    /// Fraction of episodes in validation (rounded; at least one when > 0 and there are two or
    /// more episodes, never all of them).
    pub val_fraction: f64,
    /// Seed of the split (and of the stats reservoir).
    pub seed: u64,
    /// Episode ids held out for validation; when any is given, exactly these (and
    /// `val_fraction` is not used), e.g. episodes recorded with a simulator seed the training
    /// never saw.
    pub val_episodes: Vec<String>,
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self { val_fraction: 0.1, seed: 0, val_episodes: Vec::new() }
    }
}

/// Storage settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// JPEG quality of stored frames, 1-100.
    pub jpeg_quality: u8,
    /// A shard is closed once it holds this many MiB (fractions allowed).
    pub shard_max_mb: f64,
    /// Rows kept per field for the q01/q99 estimate (exact up to this many rows).
    pub stats_reservoir_rows: usize,
    /// Threads encoding JPEG; 0 = one per available core.
    pub encode_threads: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { jpeg_quality: 90, shard_max_mb: 512.0, stats_reservoir_rows: DEFAULT_RESERVOIR_ROWS, encode_threads: 0 }
    }
}

/// Everything `dataset compile` is configured with (`config/compile.yaml`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompileConfig {
    /// Alignment.
    pub align: AlignConfig,
    /// Split.
    pub split: SplitConfig,
    /// Storage.
    pub store: StoreConfig,
}

impl CompileConfig {
    /// Reads a YAML config; missing fields take their defaults.
    pub fn from_yaml_file(path: &Path) -> Result<Self, CompileError> {
        let text = std::fs::read_to_string(path).map_err(|source| StoreError::Io { path: path.into(), source })?;
        let cfg: CompileConfig =
            serde_yaml::from_str(&text).map_err(|e| CompileError::Config(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every section.
    pub fn validate(&self) -> Result<(), CompileError> {
        self.align.validate()?;
        if !(0.0..=1.0).contains(&self.split.val_fraction) {
            return Err(CompileError::Config("`split.val_fraction` must be within [0, 1]".into()));
        }
        if !(1..=100).contains(&self.store.jpeg_quality) {
            return Err(CompileError::Config("`store.jpeg_quality` must be within 1..=100".into()));
        }
        if !(self.store.shard_max_mb.is_finite() && self.store.shard_max_mb > 0.0) {
            return Err(CompileError::Config("`store.shard_max_mb` must be a positive number".into()));
        }
        Ok(())
    }
}

/// Errors that stop a compile.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// Bad configuration.
    #[error("compile config: {0}")]
    Config(String),
    /// Two episodes share an id.
    #[error("two episodes have the id `{0}`; expected unique ids")]
    DuplicateEpisode(String),
    /// Alignment settings rejected.
    #[error(transparent)]
    Align(#[from] AlignError),
    /// Writing the dataset failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Nothing usable: no dataset is written and an existing one is kept.
    #[error("{out}: no usable sample from {episodes} episode(s) ({failed} left out{first}{dropped}); nothing written, an existing dataset there is kept")]
    NoSamples {
        /// The output folder.
        out: PathBuf,
        /// Episodes given.
        episodes: usize,
        /// Of which left out.
        failed: usize,
        /// The first episode left out and why, as `; first: <id>: <error>`.
        first: String,
        /// Why the others gave no sample: `; all N sample times dropped: <reason> xK, ...` (most
        /// frequent first), or that they gave no sample time; empty when none was read.
        dropped: String,
    },
}

/// An episode left out, with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedEpisode {
    /// Episode id.
    pub id: String,
    /// Why.
    pub error: String,
}

/// Age of the data a stream contributed at the kept samples (`t` minus the stamp used).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Skew {
    /// Samples measured.
    pub samples: u64,
    /// Mean age, seconds.
    pub mean_s: f64,
    /// Largest age, seconds.
    pub max_s: f64,
}

impl Skew {
    fn add(&mut self, age_ns: i64) {
        let a = age_ns as f64 * 1e-9;
        self.samples += 1;
        self.mean_s += (a - self.mean_s) / self.samples as f64;
        self.max_s = self.max_s.max(a);
    }

    fn merge(&mut self, o: &Skew) {
        if o.samples == 0 {
            return;
        }
        let n = self.samples + o.samples;
        self.mean_s = (self.mean_s * self.samples as f64 + o.mean_s * o.samples as f64) / n as f64;
        self.samples = n;
        self.max_s = self.max_s.max(o.max_s);
    }
}

/// What happened to one episode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeReport {
    /// Episode id.
    pub id: String,
    /// Its split.
    pub split: Split,
    /// Sample times considered.
    pub candidates: u64,
    /// Samples kept.
    pub samples: u64,
    /// Dropped samples by reason.
    pub drops: DropCounts,
    /// Per-stream rates and timing.
    pub streams: Vec<StreamReport>,
    /// Per-stream age of the data used, by stream name.
    pub skew: BTreeMap<String, Skew>,
    /// Spread of the camera frames used together: newest minus oldest frame stamp per sample.
    pub camera_spread: Skew,
    /// What a damaged recording lost (its readable part was compiled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damage: Option<Damage>,
}

/// Per-stream figures over all episodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamSummary {
    /// `camera`, `sensor`, `state` or `command`.
    pub kind: String,
    /// Episodes with the stream.
    pub episodes: u64,
    /// Messages.
    pub messages: u64,
    /// Messages removed for non-monotonic stamps.
    pub non_monotonic: u64,
    /// Lowest per-episode mean rate, Hz.
    pub rate_hz_min: f64,
    /// Highest per-episode mean rate, Hz.
    pub rate_hz_max: f64,
    /// Largest gap, seconds.
    pub max_gap_s: f64,
    /// Largest receive-minus-header latency, seconds.
    pub max_latency_s: f64,
    /// Age of the data used at kept samples.
    pub skew: Skew,
}

/// The dataset's `report.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompileReport {
    /// Episodes compiled (including those with zero samples).
    pub episodes: Vec<EpisodeReport>,
    /// Episodes left out.
    pub failed_episodes: Vec<FailedEpisode>,
    /// Sample times considered.
    pub candidates: u64,
    /// Samples kept.
    pub samples: u64,
    /// Of which training.
    pub train_samples: u64,
    /// Of which validation.
    pub val_samples: u64,
    /// Dropped samples by reason, over all episodes.
    pub drops: DropCounts,
    /// Per-stream figures by stream name.
    pub streams: BTreeMap<String, StreamSummary>,
    /// Spread of the camera frames used together, over all episodes.
    pub camera_spread: Skew,
    /// Folders left by compiles that were killed (`.<out>.staging-<pid>`, `.<out>.old-<pid>`),
    /// removed before this one wrote anything.
    #[serde(default)]
    pub removed_leftovers: Vec<PathBuf>,
}

/// Splits episodes by id: the ids of `val_episodes` when it names any, else each id gets the key `sha256(seed_le || id)`, the `round(f * n)` ids
/// with the smallest keys go to validation. Independent of the order ids are given in.
pub fn split_episodes(ids: &[String], cfg: &SplitConfig) -> Vec<Split> {
    if !cfg.val_episodes.is_empty() {
        return ids.iter().map(|id| if cfg.val_episodes.contains(id) { Split::Val } else { Split::Train }).collect();
    }
    let n = ids.len();
    let mut n_val = (cfg.val_fraction * n as f64).round() as usize;
    if n >= 2 && cfg.val_fraction > 0.0 {
        n_val = n_val.clamp(1, n - 1);
    } else if n < 2 {
        n_val = 0;
    }
    let mut keyed: Vec<(Vec<u8>, usize)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut h = Sha256::new();
            h.update(cfg.seed.to_le_bytes());
            h.update(id.as_bytes());
            (h.finalize().to_vec(), i)
        })
        .collect();
    keyed.sort();
    let mut out = vec![Split::Train; n];
    for (_, i) in keyed.iter().take(n_val) {
        out[*i] = Split::Val;
    }
    out
}

/// Encodes an RGB8 frame to JPEG.
pub fn encode_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>, ImageError> {
    if img.data.len() as u64 != img.width as u64 * img.height as u64 * 3 || img.width == 0 || img.height == 0 {
        return Err(ImageError::FrameSize { width: img.width, height: img.height, bytes: img.data.len() });
    }
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
        .encode(&img.data, img.width, img.height, image::ExtendedColorType::Rgb8)
        .map_err(ImageError::Jpeg)?;
    Ok(buf)
}

/// Shapes fixed by the first usable episode; later episodes must match.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Shapes {
    pub(super) cameras: Vec<String>,
    pub(super) sensor_channels: usize,
    pub(super) state_names: Vec<String>,
    pub(super) action_dim: usize,
}

impl Shapes {
    /// No streams (a dataset without usable episodes).
    pub(super) fn empty() -> Self {
        Shapes { cameras: Vec::new(), sensor_channels: 0, state_names: Vec::new(), action_dim: 0 }
    }

    fn of(al: &Aligner) -> Self {
        Shapes {
            cameras: al.camera_names(),
            sensor_channels: al.sensor_channels(),
            state_names: al.state_names().to_vec(),
            action_dim: al.action_dim(),
        }
    }

    /// The shapes a compiled dataset holds.
    pub(super) fn of_index(ix: &DatasetIndex) -> Self {
        Shapes {
            cameras: ix.cameras.iter().map(|c| c.name.clone()).collect(),
            sensor_channels: ix.sensor_shape[1],
            state_names: ix.state_names.clone(),
            action_dim: ix.action_shape[1],
        }
    }

    /// Why an episode of shapes `self` cannot join a dataset of shapes `want`.
    pub(super) fn mismatch(&self, want: &Shapes) -> String {
        format!(
            "streams do not match the dataset: cameras {:?}, sensor channels {}, state {:?}, action dim {}; expected cameras {:?}, sensor channels {}, state {:?}, action dim {}",
            self.cameras, self.sensor_channels, self.state_names, self.action_dim, want.cameras, want.sensor_channels, want.state_names, want.action_dim
        )
    }

    /// The training statistics' accumulators of a dataset of these shapes.
    pub(super) fn stats_accumulators(&self, cfg: &CompileConfig) -> [StatsAccumulator; 3] {
        let seed = cfg.split.seed;
        let r = cfg.store.stats_reservoir_rows;
        [
            StatsAccumulator::new(self.sensor_channels, r, seed ^ 1),
            StatsAccumulator::new(self.state_names.len(), r, seed ^ 2),
            StatsAccumulator::new(self.action_dim, r, seed ^ 3),
        ]
    }
}

/// The shapes of most episodes that yield sample times (ties: the first in `order`); `None` when
/// no episode yields any. Opens the episodes one at a time.
fn majority_shapes(episodes: &[LazyEpisode<'_>], order: &[usize], cfg: &AlignConfig) -> Option<Shapes> {
    let mut votes: Vec<(Shapes, usize)> = Vec::new();
    for &i in order {
        let src = (episodes[i].open)();
        let Ok(al) = Aligner::new(src.as_ref(), cfg) else { continue };
        if al.sample_times().is_empty() {
            continue;
        }
        let s = Shapes::of(&al);
        match votes.iter_mut().find(|(v, _)| *v == s) {
            Some((_, n)) => *n += 1,
            None => votes.push((s, 1)),
        }
    }
    let best = votes.iter().map(|(_, n)| *n).max()?;
    votes.into_iter().find(|(_, n)| *n == best).map(|(s, _)| s)
}

/// A frame's JPEG bytes and size, or why it could not be read/encoded.
type EncodedFrame = Result<(Vec<u8>, (u32, u32)), String>;

struct Builder<'a> {
    cfg: &'a CompileConfig,
    dir: &'a Path,
    shapes: Option<Shapes>,
    camera_sizes: Vec<Option<(u32, u32)>>,
    shard: Option<ShardWriter>,
    shards: Vec<ShardInfo>,
    samples: Vec<SampleEntry>,
    stats: Option<[StatsAccumulator; 3]>,
    threads: usize,
}

impl Builder<'_> {
    fn flush_shard(&mut self) -> Result<(), StoreError> {
        if let Some(w) = self.shard.take() {
            if w.rows() > 0 {
                let file = format!("shard-{:05}.safetensors", self.shards.len());
                w.write(&self.dir.join(&file))?;
                self.shards.push(ShardInfo { file, samples: w.rows() });
            }
        }
        Ok(())
    }

    /// Fixes the dataset's shapes and starts the statistics.
    fn set_shapes(&mut self, s: Shapes) {
        self.stats = Some(s.stats_accumulators(self.cfg));
        self.camera_sizes = vec![None; s.cameras.len()];
        self.shapes = Some(s);
    }

    fn check_shapes(&mut self, al: &Aligner) -> Result<(), String> {
        let s = Shapes::of(al);
        match &self.shapes {
            None => {
                self.set_shapes(s);
                Ok(())
            }
            Some(first) if *first == s => Ok(()),
            Some(first) => Err(s.mismatch(first)),
        }
    }

    /// Compiles one episode; `Err` only for failures that leave the episode out entirely.
    fn episode(&mut self, src: &dyn EpisodeSource, ep_index: usize, split: Split) -> Result<EpisodeReport, String> {
        if let Some(why) = src.unreadable() {
            return Err(why);
        }
        let al = Aligner::new(src, &self.cfg.align).map_err(|e| e.to_string())?;
        self.check_shapes(&al)?;
        let rep = EpisodeReport {
            id: src.meta().id.clone(),
            split,
            candidates: 0,
            samples: 0,
            drops: DropCounts::new(),
            streams: al.stream_reports().to_vec(),
            skew: BTreeMap::new(),
            camera_spread: Skew::default(),
            damage: src.damage(),
        };
        let shapes = self.shapes.clone().expect("set by check_shapes");
        let mut ep = EpisodeRun { src, index: ep_index, split, shapes, jpegs: HashMap::new(), rep };
        let times = al.sample_times();
        ep.rep.candidates = times.len() as u64;
        const CHUNK: usize = 32;
        for chunk in times.chunks(CHUNK) {
            let aligned: Vec<_> = chunk.iter().map(|&t| al.align(t)).collect();
            self.encode_new_frames(&mut ep, &aligned);
            let mut last_frames: Option<Vec<usize>> = None;
            for s in aligned {
                match s {
                    Ok(s) => {
                        last_frames = Some(s.frames.clone());
                        self.sample(&mut ep, s)?;
                    }
                    Err(reason) => *ep.rep.drops.entry(reason.key()).or_default() += 1,
                }
            }
            if let Some(last) = last_frames {
                ep.jpegs.retain(|(c, f), _| *f >= last[*c]);
            }
        }
        Ok(ep.rep)
    }

    /// Encodes the frames of `aligned` that `ep` has not encoded yet: read from this thread (the
    /// source is read from one thread only), encoded in parallel.
    fn encode_new_frames(&self, ep: &mut EpisodeRun<'_>, aligned: &[Result<AlignedSample, DropReason>]) {
        let mut todo: Vec<((usize, usize), Result<RgbImage, String>)> = Vec::new();
        for s in aligned.iter().flatten() {
            for (c, &f) in s.frames.iter().enumerate() {
                if !ep.jpegs.contains_key(&(c, f)) && !todo.iter().any(|(k, _)| *k == (c, f)) {
                    let img = ep.src.camera_frame(&ep.shapes.cameras[c], f).map_err(|e| format!("{e:#}"));
                    todo.push(((c, f), img));
                }
            }
        }
        let quality = self.cfg.store.jpeg_quality;
        let encoded = parallel_map(&todo, self.threads, |(_, img)| match img {
            Ok(img) => encode_jpeg(img, quality).map(|j| (j, (img.width, img.height))).map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        });
        for ((key, _), enc) in todo.iter().zip(encoded) {
            ep.jpegs.insert(*key, enc);
        }
    }

    /// Appends sample `s` of `ep` to the current shard with its statistics and timing, or
    /// counts why it is dropped (a frame that did not encode or changed size).
    fn sample(&mut self, ep: &mut EpisodeRun<'_>, s: AlignedSample) -> Result<(), String> {
        let frame_bytes = match self.frame_bytes(&ep.jpegs, &ep.shapes.cameras, &s.frames) {
            Ok(b) => b,
            Err(drop) => {
                *ep.rep.drops.entry(drop).or_default() += 1;
                return Ok(());
            }
        };
        let (cfg, shapes) = (self.cfg, &ep.shapes);
        let sensor_shape = [cfg.align.sensor_samples, shapes.sensor_channels];
        let action_shape = [cfg.align.horizon, shapes.action_dim];
        let w = self.shard.get_or_insert_with(|| {
            ShardWriter::new(&shapes.cameras, sensor_shape, shapes.state_names.len(), action_shape)
        });
        let row =
            w.push(&s.sensor, &s.state, &s.action, &frame_bytes).map_err(|e| format!("internal shape error: {e}"))?;
        let (episode, split) = (ep.index, ep.split);
        let frames = s.frames.clone();
        self.samples.push(SampleEntry { episode, t_ns: s.t_ns, split, shard: self.shards.len(), row, frames });
        ep.rep.samples += 1;
        if split == Split::Train {
            let st = self.stats.as_mut().expect("set by check_shapes");
            st[0].add_rows(&s.sensor);
            st[1].add_rows(&s.state);
            st[2].add_rows(&s.action);
        }
        ep.rep.add_timing(&s, &ep.shapes.cameras, &cfg.align.sensor);
        if self.shard.as_ref().is_some_and(|w| w.bytes() as f64 >= cfg.store.shard_max_mb * 1048576.0) {
            self.flush_shard().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The JPEG of each of a sample's `frames` (one per camera), or the drop key when one did
    /// not encode or its size differs from the camera's first frame.
    fn frame_bytes<'j>(
        &mut self,
        jpegs: &'j HashMap<(usize, usize), EncodedFrame>,
        cameras: &[String],
        frames: &[usize],
    ) -> Result<Vec<&'j [u8]>, String> {
        let mut frame_bytes: Vec<&[u8]> = Vec::with_capacity(frames.len());
        for (c, &f) in frames.iter().enumerate() {
            let Some(Ok((j, wh))) = jpegs.get(&(c, f)) else {
                return Err(format!("camera_bad_frame:{}", cameras[c]));
            };
            match self.camera_sizes[c] {
                None => self.camera_sizes[c] = Some(*wh),
                Some(known) if known != *wh => return Err(format!("camera_size_changed:{}", cameras[c])),
                _ => {}
            }
            frame_bytes.push(j);
        }
        Ok(frame_bytes)
    }
}

/// One episode being compiled.
struct EpisodeRun<'s> {
    src: &'s dyn EpisodeSource,
    /// Its position among the dataset's episodes.
    index: usize,
    split: Split,
    /// The dataset's shapes.
    shapes: Shapes,
    /// Encoded frames and their size by (camera, recorded index); consecutive samples share
    /// frames, and frames only move forward in time, so the cache keeps the newest per camera.
    jpegs: HashMap<(usize, usize), EncodedFrame>,
    rep: EpisodeReport,
}

impl EpisodeReport {
    /// Adds a kept sample's data ages per stream (`cameras` in order, then the sensor named
    /// `sensor` and the state) and its camera spread.
    fn add_timing(&mut self, s: &AlignedSample, cameras: &[String], sensor: &str) {
        for (c, &age) in s.frame_age_ns.iter().enumerate() {
            self.skew.entry(cameras[c].clone()).or_default().add(age);
        }
        if let (Some(lo), Some(hi)) = (s.frame_age_ns.iter().min(), s.frame_age_ns.iter().max()) {
            self.camera_spread.add(hi - lo);
        }
        self.skew.entry(sensor.to_string()).or_default().add(s.sensor_age_ns);
        self.skew.entry("state".into()).or_default().add(s.state_age_ns);
    }
}

/// Applies `f` to every item on up to `threads` threads, keeping the order.
fn parallel_map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if threads <= 1 || items.len() <= 1 {
        return items.iter().map(f).collect();
    }
    let per = items.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = items.chunks(per).map(|c| s.spawn(|| c.iter().map(&f).collect::<Vec<R>>())).collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

/// The outcome of a compile.
#[derive(Debug, Clone)]
pub struct CompileOutput {
    /// The written index.
    pub index: DatasetIndex,
    /// The written statistics.
    pub stats: DatasetStats,
    /// The written report.
    pub report: CompileReport,
}

/// Compiles `episodes` into a new dataset folder `out` (replacing an existing one only when
/// `overwrite`). The folder appears complete or not at all.
pub fn compile(
    episodes: &[&dyn EpisodeSource],
    cfg: &CompileConfig,
    out: &Path,
    overwrite: bool,
) -> Result<CompileOutput, CompileError> {
    let lazy: Vec<LazyEpisode<'_>> = episodes.iter().map(|&e| LazyEpisode::borrowed(e)).collect();
    compile_lazily(&lazy, cfg, out, overwrite)
}

/// [`compile`] of episodes opened one at a time, each while it is read (twice: once for the
/// dataset's shapes, once for its samples), so that memory does not grow with the recordings.
pub fn compile_lazily(
    episodes: &[LazyEpisode<'_>],
    cfg: &CompileConfig,
    out: &Path,
    overwrite: bool,
) -> Result<CompileOutput, CompileError> {
    cfg.validate()?;
    let mut order: Vec<usize> = (0..episodes.len()).collect();
    order.sort_by(|&a, &b| episodes[a].meta.id.cmp(&episodes[b].meta.id));
    let ids: Vec<String> = order.iter().map(|&i| episodes[i].meta.id.clone()).collect();
    check_unique(&ids)?;
    let splits = split_episodes(&ids, &cfg.split);
    let staging = Staging::create(out, overwrite)?;
    let result = build(episodes, &order, &splits, cfg, &staging.dir, &staging.removed);
    finish(staging, result, out, episodes.len())
}

/// Fails on the first id given twice; `ids` sorted.
pub(super) fn check_unique(ids: &[String]) -> Result<(), CompileError> {
    match ids.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(CompileError::DuplicateEpisode(w[0].clone())),
        None => Ok(()),
    }
}

/// Commits a staged dataset that holds samples; abandons it otherwise.
pub(super) fn finish(
    staging: Staging,
    result: Result<CompileOutput, CompileError>,
    out: &Path,
    episodes: usize,
) -> Result<CompileOutput, CompileError> {
    match result {
        Ok(o) if o.report.samples == 0 => {
            staging.abandon();
            let first =
                o.report.failed_episodes.first().map(|f| format!("; first: {}: {}", f.id, f.error)).unwrap_or_default();
            let mut drops: Vec<(&String, &u64)> = o.report.drops.iter().collect();
            drops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let dropped = match o.report.candidates {
                0 if o.report.episodes.is_empty() => String::new(),
                0 => "; they gave no sample time: none is longer than align.sensor_window_s plus the action \
                      horizon (align.horizon / align.control_hz), or a stream is empty"
                    .into(),
                n => format!(
                    "; all {n} sample times dropped: {}",
                    drops.iter().map(|(k, c)| format!("{k} x{c}")).collect::<Vec<_>>().join(", ")
                ),
            };
            Err(CompileError::NoSamples {
                out: out.to_path_buf(),
                episodes,
                failed: o.report.failed_episodes.len(),
                first,
                dropped,
            })
        }
        Ok(o) => {
            staging.commit()?;
            Ok(o)
        }
        Err(e) => {
            staging.abandon();
            Err(e)
        }
    }
}

/// Compiles one episode, all of it as training, into the new folder `out` (a part of an
/// incremental compile, [`super::incremental`]); kept even without samples, for its report.
/// `Ok(Err(..))` when the episode is left out (nothing is written then).
pub(super) fn compile_one(
    src: &dyn EpisodeSource,
    cfg: &CompileConfig,
    out: &Path,
) -> Result<Result<CompileOutput, FailedEpisode>, CompileError> {
    let staging = Staging::create(out, false)?;
    match build(&[LazyEpisode::borrowed(src)], &[0], &[Split::Train], cfg, &staging.dir, &[]) {
        Ok(mut o) if !o.report.failed_episodes.is_empty() => {
            staging.abandon();
            Ok(Err(o.report.failed_episodes.remove(0)))
        }
        Ok(o) => {
            staging.commit()?;
            Ok(Ok(o))
        }
        Err(e) => {
            staging.abandon();
            Err(e)
        }
    }
}

fn build(
    episodes: &[LazyEpisode<'_>],
    order: &[usize],
    splits: &[Split],
    cfg: &CompileConfig,
    dir: &Path,
    removed_leftovers: &[PathBuf],
) -> Result<CompileOutput, CompileError> {
    let threads = match cfg.store.encode_threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    };
    let mut b = Builder {
        cfg,
        dir,
        shapes: None,
        camera_sizes: Vec::new(),
        shard: None,
        shards: Vec::new(),
        samples: Vec::new(),
        stats: None,
        threads,
    };
    if let Some(s) = majority_shapes(episodes, order, &cfg.align) {
        b.set_shapes(s);
    }
    let mut report = CompileReport { removed_leftovers: removed_leftovers.to_vec(), ..Default::default() };
    let mut entries = Vec::new();
    for (&i, &split) in order.iter().zip(splits) {
        let src = (episodes[i].open)();
        let meta = src.meta();
        match b.episode(src.as_ref(), entries.len(), split) {
            Ok(rep) => {
                entries.push(EpisodeEntry {
                    id: meta.id.clone(),
                    instruction: meta.instruction.clone(),
                    task: meta.task.clone(),
                    outcome: meta.outcome.clone(),
                    split,
                    samples: rep.samples as usize,
                });
                report.episodes.push(rep);
            }
            Err(error) => {
                let error = match src.damage() {
                    Some(d) => format!("{error} (the recording is damaged: {})", d.reasons.join("; ")),
                    None => error,
                };
                tracing::warn!(episode = %meta.id, %error, "episode left out of the dataset");
                report.failed_episodes.push(FailedEpisode { id: meta.id.clone(), error });
            }
        }
    }
    b.flush_shard()?;
    add_totals(&mut report);
    let shapes = b.shapes.clone().unwrap_or_else(Shapes::empty);
    let index = dataset_index(cfg, &shapes, &b.camera_sizes, b.shards.clone(), entries, b.samples);
    let stats = match &b.stats {
        Some([a, s, c]) => DatasetStats { sensor: a.finish(), state: s.finish(), action: c.finish() },
        None => DatasetStats::default(),
    };
    write_outputs(dir, cfg, &index, &stats, &report)?;
    Ok(CompileOutput { index, stats, report })
}

/// The index of a dataset of `shapes`, camera sizes `sizes` (unknown: 0 x 0), and its contents.
pub(super) fn dataset_index(
    cfg: &CompileConfig,
    shapes: &Shapes,
    sizes: &[Option<(u32, u32)>],
    shards: Vec<ShardInfo>,
    episodes: Vec<EpisodeEntry>,
    samples: Vec<SampleEntry>,
) -> DatasetIndex {
    let action_names = super::align::action_axes(cfg.align.action, &shapes.state_names, shapes.action_dim);
    DatasetIndex {
        format: FORMAT.into(),
        cameras: shapes
            .cameras
            .iter()
            .zip(sizes.iter().chain(std::iter::repeat(&None)))
            .map(|(n, wh)| CameraInfo { name: n.clone(), width: wh.map_or(0, |w| w.0), height: wh.map_or(0, |w| w.1) })
            .collect(),
        sensor_shape: [cfg.align.sensor_samples, shapes.sensor_channels],
        state_names: shapes.state_names.clone(),
        action_shape: [cfg.align.horizon, shapes.action_dim],
        action_names: action_names.0,
        action_units: action_names.1,
        control_hz: cfg.align.control_hz,
        shards,
        episodes,
        samples,
    }
}

/// Fills the report's totals and per-stream figures from its episodes.
pub(super) fn add_totals(report: &mut CompileReport) {
    for ep in &report.episodes {
        report.candidates += ep.candidates;
        report.samples += ep.samples;
        match ep.split {
            Split::Train => report.train_samples += ep.samples,
            Split::Val => report.val_samples += ep.samples,
        }
        report.camera_spread.merge(&ep.camera_spread);
        for (k, v) in &ep.drops {
            *report.drops.entry(k.clone()).or_default() += v;
        }
        for s in &ep.streams {
            let e = report.streams.entry(s.name.clone()).or_insert_with(|| StreamSummary {
                kind: s.kind.clone(),
                rate_hz_min: f64::INFINITY,
                ..Default::default()
            });
            e.episodes += 1;
            e.messages += s.messages as u64;
            e.non_monotonic += s.non_monotonic as u64;
            e.rate_hz_min = e.rate_hz_min.min(s.rate_hz);
            e.rate_hz_max = e.rate_hz_max.max(s.rate_hz);
            e.max_gap_s = e.max_gap_s.max(s.max_gap_s);
            e.max_latency_s = e.max_latency_s.max(s.max_latency_s);
            if let Some(sk) = ep.skew.get(&s.name) {
                e.skew.merge(sk);
            }
        }
    }
}

/// Writes a dataset's index, statistics, report and compile settings into `dir`.
pub(super) fn write_outputs(
    dir: &Path,
    cfg: &CompileConfig,
    index: &DatasetIndex,
    stats: &DatasetStats,
    report: &CompileReport,
) -> Result<(), CompileError> {
    write_json(&dir.join(INDEX_FILE), index)?;
    write_json(&dir.join(STATS_FILE), stats)?;
    write_json(&dir.join(REPORT_FILE), report)?;
    let yaml = serde_yaml::to_string(cfg).map_err(|e| CompileError::Config(format!("serializing the config: {e}")))?;
    write_synced(&dir.join(CONFIG_FILE), yaml.as_bytes())?;
    Ok(())
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(v)
        .map_err(|e| StoreError::Invalid { path: path.into(), what: format!("serializing: {e}") })?;
    write_synced(path, &bytes)
}
