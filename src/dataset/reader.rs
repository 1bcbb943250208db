//! Random access to a compiled dataset and a multi-threaded, prefetching batch reader.
//!
//! The order of samples in an epoch is a Fisher-Yates shuffle (SplitMix64 seeded with
//! `seed ^ epoch * 0x9E3779B97F4A7C15`) of the split's sample indices, and batches are yielded in
//! that order whatever the number of worker threads: workers decode batches ahead (at most
//! `prefetch` batches beyond the one consumed) and the reader puts them back in order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::episode::RgbImage;
use super::rng::SplitMix64;
use super::stats::{DatasetStats, FieldStats, StatsError};
use super::store::{read_json, DatasetIndex, ShardReader, Split, StoreError, STATS_FILE};

/// Errors reading samples.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    /// A dataset file is missing or malformed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored frame does not decode to the camera's size.
    #[error("{dir}: sample {sample}, camera `{camera}`: {what}")]
    Image {
        /// Dataset folder.
        dir: PathBuf,
        /// Sample index.
        sample: usize,
        /// Camera name.
        camera: String,
        /// What is wrong.
        what: String,
    },
    /// A sample index out of range.
    #[error("sample index {index} out of range; the dataset has {len} samples")]
    OutOfRange {
        /// Asked index.
        index: usize,
        /// Samples.
        len: usize,
    },
    /// Every decoding thread stopped before producing a batch (a thread panicked).
    #[error("the reader's decoding threads stopped before batch {batch} was produced")]
    WorkersStopped {
        /// The batch that was awaited.
        batch: usize,
    },
    /// Statistics unusable for normalization.
    #[error("{dir}/stats.json: {source}")]
    Stats {
        /// Dataset folder.
        dir: PathBuf,
        /// What is wrong.
        source: StatsError,
    },
}

/// A dense array: `data` in row-major order with `shape`.
#[derive(Debug, Clone, PartialEq)]
pub struct Array<T> {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<T>,
}

impl<T: tch::kind::Element + Copy> Array<T> {
    /// Copies into a CPU tensor of the same shape.
    pub fn to_tensor(&self) -> tch::Tensor {
        let shape: Vec<i64> = self.shape.iter().map(|&d| d as i64).collect();
        tch::Tensor::from_slice(&self.data).reshape(&shape)
    }
}

/// One decoded sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Index in the dataset.
    pub index: usize,
    /// Episode id.
    pub episode: String,
    /// The episode's instruction.
    pub instruction: String,
    /// Sample time, ns.
    pub t_ns: i64,
    /// One frame per camera.
    pub images: Vec<RgbImage>,
    /// `T x C` sensor window.
    pub sensor: Vec<f32>,
    /// State.
    pub state: Vec<f32>,
    /// `H x A` action chunk.
    pub action: Vec<f32>,
}

/// A batch of samples as dense arrays, raw and normalized with the dataset's statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Dataset sample indices, in batch order.
    pub indices: Vec<usize>,
    /// Instruction per sample.
    pub instructions: Vec<String>,
    /// One `[B, H, W, 3]` u8 array per camera.
    pub images: Vec<Array<u8>>,
    /// `[B, T, C]`.
    pub sensor: Array<f32>,
    /// `[B, S]`.
    pub state: Array<f32>,
    /// `[B, H, A]`.
    pub action: Array<f32>,
    /// `sensor` normalized per channel, `(x - mean) / max(std, MIN_STD)`.
    pub sensor_norm: Array<f32>,
    /// `state` normalized per value.
    pub state_norm: Array<f32>,
    /// `action` normalized per action channel.
    pub action_norm: Array<f32>,
}

/// A compiled dataset opened for random access (shards memory-mapped).
#[derive(Debug)]
pub struct Dataset {
    dir: PathBuf,
    /// The index.
    pub index: DatasetIndex,
    /// The training-split statistics.
    pub stats: DatasetStats,
    shards: Vec<ShardReader>,
}

impl Dataset {
    /// Opens the dataset in `dir`.
    pub fn open(dir: &Path) -> Result<Self, ReaderError> {
        let index = DatasetIndex::load(dir)?;
        let stats: DatasetStats = read_json(&dir.join(STATS_FILE))?;
        stats.validate().map_err(|source| ReaderError::Stats { dir: dir.to_path_buf(), source })?;
        let shards =
            index.shards.iter().map(|s| ShardReader::open(&dir.join(&s.file))).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { dir: dir.to_path_buf(), index, stats, shards })
    }

    /// Samples.
    pub fn len(&self) -> usize {
        self.index.samples.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.index.samples.is_empty()
    }

    /// Indices of the samples of `split`, in stored order.
    pub fn split_indices(&self, split: Split) -> Vec<usize> {
        self.index.samples.iter().enumerate().filter(|(_, s)| s.split == split).map(|(i, _)| i).collect()
    }

    /// The JPEG bytes of sample `i`, camera number `c`.
    pub fn jpeg(&self, i: usize, c: usize) -> Result<&[u8], ReaderError> {
        let s = self.index.samples.get(i).ok_or(ReaderError::OutOfRange { index: i, len: self.len() })?;
        let cam = self.index.cameras.get(c).ok_or_else(|| ReaderError::Image {
            dir: self.dir.clone(),
            sample: i,
            camera: format!("#{c}"),
            what: format!("no such camera; the dataset has {}", self.index.cameras.len()),
        })?;
        Ok(self.shards[s.shard].jpeg(&cam.name, s.row)?)
    }

    /// Reads and decodes sample `i`.
    pub fn sample(&self, i: usize) -> Result<Sample, ReaderError> {
        let s = self.index.samples.get(i).ok_or(ReaderError::OutOfRange { index: i, len: self.len() })?;
        let shard = &self.shards[s.shard];
        let ix = &self.index;
        let mut sensor = Vec::new();
        shard.f32_row("sensor", s.row, ix.sensor_shape[0] * ix.sensor_shape[1], &mut sensor)?;
        let mut state = Vec::new();
        shard.f32_row("state", s.row, ix.state_names.len(), &mut state)?;
        let mut action = Vec::new();
        shard.f32_row("action", s.row, ix.action_shape[0] * ix.action_shape[1], &mut action)?;
        let mut images = Vec::with_capacity(ix.cameras.len());
        for (c, cam) in ix.cameras.iter().enumerate() {
            let bytes = self.jpeg(i, c)?;
            let err =
                |what: String| ReaderError::Image { dir: self.dir.clone(), sample: i, camera: cam.name.clone(), what };
            let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg)
                .map_err(|e| err(format!("JPEG decoding: {e}")))?
                .to_rgb8();
            if (img.width(), img.height()) != (cam.width, cam.height) {
                return Err(err(format!(
                    "frame is {}x{}; expected {}x{}",
                    img.width(),
                    img.height(),
                    cam.width,
                    cam.height
                )));
            }
            images.push(RgbImage { width: img.width(), height: img.height(), data: img.into_raw() });
        }
        let ep = &ix.episodes[s.episode];
        Ok(Sample {
            index: i,
            episode: ep.id.clone(),
            instruction: ep.instruction.clone(),
            t_ns: s.t_ns,
            images,
            sensor,
            state,
            action,
        })
    }

    /// The raw `[B, T, C]` sensor windows and `[B, H, A]` action chunks of `indices`, read
    /// without decoding any image.
    pub fn sensor_action(&self, indices: &[usize]) -> Result<(Array<f32>, Array<f32>), ReaderError> {
        let ([t, c], [h, a]) = (self.index.sensor_shape, self.index.action_shape);
        let mut sensor = Array { shape: vec![indices.len(), t, c], data: Vec::with_capacity(indices.len() * t * c) };
        let mut action = Array { shape: vec![indices.len(), h, a], data: Vec::with_capacity(indices.len() * h * a) };
        for &i in indices {
            let s = self.index.samples.get(i).ok_or(ReaderError::OutOfRange { index: i, len: self.len() })?;
            self.shards[s.shard].f32_row("sensor", s.row, t * c, &mut sensor.data)?;
            self.shards[s.shard].f32_row("action", s.row, h * a, &mut action.data)?;
        }
        Ok((sensor, action))
    }

    /// Reads, decodes and stacks the samples `indices` into a batch.
    pub fn batch(&self, indices: &[usize]) -> Result<Batch, ReaderError> {
        let ix = &self.index;
        for (field, st) in
            [("sensor", &self.stats.sensor), ("state", &self.stats.state), ("action", &self.stats.action)]
        {
            if st.count == 0 {
                return Err(ReaderError::Stats { dir: self.dir.clone(), source: StatsError::Empty { field } });
            }
        }
        let b = indices.len();
        let mut out = Batch {
            indices: indices.to_vec(),
            instructions: Vec::with_capacity(b),
            images: ix
                .cameras
                .iter()
                .map(|c| Array { shape: vec![b, c.height as usize, c.width as usize, 3], data: Vec::new() })
                .collect(),
            sensor: Array { shape: vec![b, ix.sensor_shape[0], ix.sensor_shape[1]], data: Vec::new() },
            state: Array { shape: vec![b, ix.state_names.len()], data: Vec::new() },
            action: Array { shape: vec![b, ix.action_shape[0], ix.action_shape[1]], data: Vec::new() },
            sensor_norm: Array { shape: Vec::new(), data: Vec::new() },
            state_norm: Array { shape: Vec::new(), data: Vec::new() },
            action_norm: Array { shape: Vec::new(), data: Vec::new() },
        };
        for &i in indices {
            let s = self.sample(i)?;
            out.instructions.push(s.instruction);
            for (a, img) in out.images.iter_mut().zip(s.images) {
                a.data.extend_from_slice(&img.data);
            }
            out.sensor.data.extend_from_slice(&s.sensor);
            out.state.data.extend_from_slice(&s.state);
            out.action.data.extend_from_slice(&s.action);
        }
        out.sensor_norm = self.normalized(&out.sensor, &self.stats.sensor, "sensor")?;
        out.state_norm = self.normalized(&out.state, &self.stats.state, "state")?;
        out.action_norm = self.normalized(&out.action, &self.stats.action, "action")?;
        Ok(out)
    }

    fn normalized(&self, a: &Array<f32>, st: &FieldStats, field: &'static str) -> Result<Array<f32>, ReaderError> {
        let mut n = a.clone();
        let expected = a.shape.last().copied().unwrap_or(0);
        if st.dims() != expected || !st.normalize(&mut n.data) {
            let source = StatsError::Dims { field, dims: st.dims(), expected, shape: a.shape.clone() };
            return Err(ReaderError::Stats { dir: self.dir.clone(), source });
        }
        Ok(n)
    }
}

/// How to iterate a split.
#[derive(Debug, Clone, PartialEq)]
pub struct ReaderConfig {
    /// Which samples.
    pub split: Split,
    /// Samples per batch.
    pub batch_size: usize,
    /// Shuffle the order (from `seed` and `epoch`); otherwise stored order.
    pub shuffle: bool,
    /// Shuffle seed.
    pub seed: u64,
    /// Epoch number (a different order per epoch).
    pub epoch: u64,
    /// Leave out a last, smaller batch.
    pub drop_last: bool,
    /// Decoding threads; 0 decodes on the calling thread.
    pub workers: usize,
    /// Batches decoded ahead of the one consumed.
    pub prefetch: usize,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        Self {
            split: Split::Train,
            batch_size: 32,
            shuffle: true,
            seed: 0,
            epoch: 0,
            drop_last: false,
            workers: 2,
            prefetch: 4,
        }
    }
}

/// The sample indices of one epoch, grouped into batches.
pub fn epoch_batches(ds: &Dataset, cfg: &ReaderConfig) -> Vec<Vec<usize>> {
    let mut idx = ds.split_indices(cfg.split);
    if cfg.shuffle {
        SplitMix64::new(cfg.seed ^ cfg.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)).shuffle(&mut idx);
    }
    let bs = cfg.batch_size.max(1);
    idx.chunks(bs).filter(|c| !(cfg.drop_last && c.len() < bs)).map(|c| c.to_vec()).collect()
}

struct Shared {
    ds: Arc<Dataset>,
    jobs: Vec<Vec<usize>>,
    next_job: AtomicUsize,
    consumed: Mutex<usize>,
    wake: Condvar,
    stop: AtomicBool,
    prefetch: usize,
}

/// Iterator over the batches of one epoch, in deterministic order.
pub struct BatchReader {
    shared: Arc<Shared>,
    rx: Option<Receiver<(usize, Result<Batch, ReaderError>)>>,
    pending: BTreeMap<usize, Result<Batch, ReaderError>>,
    next: usize,
    workers: Vec<JoinHandle<()>>,
}

impl BatchReader {
    /// Starts reading one epoch of `ds` as configured.
    pub fn new(ds: Arc<Dataset>, cfg: &ReaderConfig) -> Self {
        let jobs = epoch_batches(&ds, cfg);
        let shared = Arc::new(Shared {
            ds,
            jobs,
            next_job: AtomicUsize::new(0),
            consumed: Mutex::new(0),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            prefetch: cfg.prefetch.max(1),
        });
        let mut workers = Vec::new();
        let mut rx = None;
        if cfg.workers > 0 {
            let (tx, r) = channel();
            rx = Some(r);
            for _ in 0..cfg.workers {
                let sh = shared.clone();
                let tx = tx.clone();
                workers.push(std::thread::spawn(move || loop {
                    let j = sh.next_job.fetch_add(1, Ordering::SeqCst);
                    if j >= sh.jobs.len() {
                        return;
                    }
                    // Wait until batch j is within the prefetch window.
                    let mut consumed = sh.consumed.lock().unwrap_or_else(|p| p.into_inner());
                    while j >= *consumed + sh.prefetch && !sh.stop.load(Ordering::SeqCst) {
                        consumed = sh.wake.wait(consumed).unwrap_or_else(|p| p.into_inner());
                    }
                    drop(consumed);
                    if sh.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let b = sh.ds.batch(&sh.jobs[j]);
                    if tx.send((j, b)).is_err() {
                        return;
                    }
                }));
            }
        }
        Self { shared, rx, pending: BTreeMap::new(), next: 0, workers }
    }

    /// Batches in this epoch.
    pub fn batches(&self) -> usize {
        self.shared.jobs.len()
    }
}

impl Iterator for BatchReader {
    type Item = Result<Batch, ReaderError>;

    fn next(&mut self) -> Option<Self::Item> {
        let sh = &self.shared;
        if self.next >= sh.jobs.len() {
            return None;
        }
        let item = match &self.rx {
            None => sh.ds.batch(&sh.jobs[self.next]),
            Some(rx) => loop {
                if let Some(b) = self.pending.remove(&self.next) {
                    break b;
                }
                match rx.recv() {
                    Ok((j, b)) => {
                        self.pending.insert(j, b);
                    }
                    // Every worker ended without producing this batch: only after a panic.
                    Err(_) => {
                        let batch = self.next;
                        self.next = sh.jobs.len();
                        return Some(Err(ReaderError::WorkersStopped { batch }));
                    }
                }
            },
        };
        self.next += 1;
        *sh.consumed.lock().unwrap_or_else(|p| p.into_inner()) = self.next;
        sh.wake.notify_all();
        Some(item)
    }
}

impl Drop for BatchReader {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        self.rx = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
