//! On-disk layout of a compiled dataset, built for memory-mapped random access.
//!
//! ```text
//! DIR/index.json              DatasetIndex: shapes, cameras, episodes (split), samples
//! DIR/shard-00000.safetensors sensor F32 [N,T,C], state F32 [N,S], action F32 [N,H,A],
//!                             image.<camera> U8 [bytes] (JPEG files back to back) and
//!                             image.<camera>.offsets I64 [N+1] (byte range of row i: [o[i], o[i+1]))
//! DIR/stats.json              DatasetStats of the training split
//! DIR/report.json             CompileReport: drops by reason, per-stream rates, skew, leftovers removed
//! DIR/compile.yaml            the CompileConfig used
//! ```
//! A dataset is written into a sibling staging folder, every file fsynced, then renamed into
//! place, so a reader never sees a half-written dataset.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

/// Identifies the index format.
pub const FORMAT: &str = "vla_finetune.dataset/1";
/// Index file name.
pub const INDEX_FILE: &str = "index.json";
/// Statistics file name.
pub const STATS_FILE: &str = "stats.json";
/// Compile report file name.
pub const REPORT_FILE: &str = "report.json";
/// Copy of the compile config.
pub const CONFIG_FILE: &str = "compile.yaml";

/// Errors reading or writing dataset files.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File system error on a path.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file's content is not what was expected.
    #[error("{path}: {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what was expected.
        what: String,
    },
    /// A row given to a shard does not have the shard's shapes.
    #[error("shard row: {input}: {got} values, expected {expected}")]
    RowShape {
        /// `sensor`, `state`, `action` or `images`.
        input: &'static str,
        /// Values (or images) given.
        got: usize,
        /// Values (or images) a row holds.
        expected: usize,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// Train or validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Training split.
    Train,
    /// Validation split.
    Val,
}

/// A camera of the dataset and its frame size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CameraInfo {
    /// Stream name.
    pub name: String,
    /// Frame width, pixels.
    pub width: u32,
    /// Frame height, pixels.
    pub height: u32,
}

/// One episode of the dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeEntry {
    /// Episode id.
    pub id: String,
    /// Language instruction.
    pub instruction: String,
    /// Task name.
    pub task: String,
    /// Recorded outcome (`success`, `failure`, `aborted`, or empty).
    pub outcome: String,
    /// Split of every sample of the episode.
    pub split: Split,
    /// Samples kept.
    pub samples: usize,
}

/// One sample of the dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleEntry {
    /// Index into `DatasetIndex::episodes`.
    pub episode: usize,
    /// Sample time, ns (episode clock).
    pub t_ns: i64,
    /// Split (the episode's).
    pub split: Split,
    /// Shard number.
    pub shard: usize,
    /// Row inside the shard.
    pub row: usize,
    /// Recorded frame index used per camera.
    pub frames: Vec<usize>,
}

/// A shard file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name inside the dataset folder.
    pub file: String,
    /// Rows.
    pub samples: usize,
}

/// The dataset's `index.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetIndex {
    /// Always [`FORMAT`].
    pub format: String,
    /// Cameras in sample order.
    pub cameras: Vec<CameraInfo>,
    /// Sensor window `[T, C]`.
    pub sensor_shape: [usize; 2],
    /// State value names.
    pub state_names: Vec<String>,
    /// Action chunk `[H, A]`.
    pub action_shape: [usize; 2],
    /// Name of each action dimension (empty in sets compiled before names were kept).
    #[serde(default)]
    pub action_names: Vec<String>,
    /// Physical unit of each action dimension (`""` where unknown).
    #[serde(default)]
    pub action_units: Vec<String>,
    /// Control rate, Hz.
    pub control_hz: f64,
    /// Shards in order.
    pub shards: Vec<ShardInfo>,
    /// Episodes in compile order (sorted by id).
    pub episodes: Vec<EpisodeEntry>,
    /// Samples in compile order.
    pub samples: Vec<SampleEntry>,
}

impl DatasetIndex {
    /// Reads `dir/index.json` and checks it against itself.
    pub fn load(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(INDEX_FILE);
        let idx: DatasetIndex = read_json(&path)?;
        let bad = |what: String| StoreError::Invalid { path: path.clone(), what };
        if idx.format != FORMAT {
            return Err(bad(format!("format `{}`; expected `{FORMAT}`", idx.format)));
        }
        for (i, s) in idx.samples.iter().enumerate() {
            if s.episode >= idx.episodes.len() || s.shard >= idx.shards.len() || s.row >= idx.shards[s.shard].samples {
                return Err(bad(format!(
                    "sample {i} points to episode {} / shard {} row {} outside the index",
                    s.episode, s.shard, s.row
                )));
            }
            if s.frames.len() != idx.cameras.len() {
                return Err(bad(format!(
                    "sample {i} has {} frame indices; expected {} (one per camera)",
                    s.frames.len(),
                    idx.cameras.len()
                )));
            }
        }
        Ok(idx)
    }
}

/// Reads a JSON file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StoreError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&bytes).map_err(|e| StoreError::Invalid {
        path: path.to_path_buf(),
        what: format!("not valid JSON of the expected shape: {e}"),
    })
}

/// Writes `bytes` to `path` and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Accumulates rows of one shard.
#[derive(Debug)]
pub struct ShardWriter {
    sensor_shape: [usize; 2],
    state_dim: usize,
    action_shape: [usize; 2],
    rows: usize,
    sensor: Vec<u8>,
    state: Vec<u8>,
    action: Vec<u8>,
    images: Vec<(String, Vec<u8>, Vec<i64>)>,
}

fn put_f32(buf: &mut Vec<u8>, v: &[f32]) {
    buf.reserve(v.len() * 4);
    for x in v {
        buf.extend_from_slice(&x.to_le_bytes());
    }
}

impl ShardWriter {
    /// An empty shard for the given shapes and camera names.
    pub fn new(cameras: &[String], sensor_shape: [usize; 2], state_dim: usize, action_shape: [usize; 2]) -> Self {
        Self {
            sensor_shape,
            state_dim,
            action_shape,
            rows: 0,
            sensor: Vec::new(),
            state: Vec::new(),
            action: Vec::new(),
            images: cameras.iter().map(|c| (c.clone(), Vec::new(), vec![0i64])).collect(),
        }
    }

    /// Rows so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes held so far.
    pub fn bytes(&self) -> usize {
        self.sensor.len()
            + self.state.len()
            + self.action.len()
            + self.images.iter().map(|(_, b, o)| b.len() + o.len() * 8).sum::<usize>()
    }

    /// Appends a row; `jpegs` has one encoded image per camera. Returns the row number, or
    /// which input has the wrong length.
    pub fn push(
        &mut self,
        sensor: &[f32],
        state: &[f32],
        action: &[f32],
        jpegs: &[&[u8]],
    ) -> Result<usize, StoreError> {
        let want = |input, got, expected| {
            if got == expected {
                Ok(())
            } else {
                Err(StoreError::RowShape { input, got, expected })
            }
        };
        want("sensor", sensor.len(), self.sensor_shape[0] * self.sensor_shape[1])?;
        want("state", state.len(), self.state_dim)?;
        want("action", action.len(), self.action_shape[0] * self.action_shape[1])?;
        want("images", jpegs.len(), self.images.len())?;
        put_f32(&mut self.sensor, sensor);
        put_f32(&mut self.state, state);
        put_f32(&mut self.action, action);
        for ((_, bytes, offs), j) in self.images.iter_mut().zip(jpegs) {
            bytes.extend_from_slice(j);
            offs.push(bytes.len() as i64);
        }
        self.rows += 1;
        Ok(self.rows - 1)
    }

    /// Writes the shard as safetensors to `path` (fsynced).
    pub fn write(&self, path: &Path) -> Result<(), StoreError> {
        let n = self.rows;
        let offsets: Vec<(String, Vec<u8>)> = self
            .images
            .iter()
            .map(|(c, _, o)| (format!("image.{c}.offsets"), o.iter().flat_map(|x| x.to_le_bytes()).collect()))
            .collect();
        let inv = |e: safetensors::SafeTensorError| StoreError::Invalid {
            path: path.to_path_buf(),
            what: format!("serializing shard: {e}"),
        };
        let mut views: Vec<(String, TensorView<'_>)> = vec![
            (
                "sensor".into(),
                TensorView::new(Dtype::F32, vec![n, self.sensor_shape[0], self.sensor_shape[1]], &self.sensor)
                    .map_err(inv)?,
            ),
            ("state".into(), TensorView::new(Dtype::F32, vec![n, self.state_dim], &self.state).map_err(inv)?),
            (
                "action".into(),
                TensorView::new(Dtype::F32, vec![n, self.action_shape[0], self.action_shape[1]], &self.action)
                    .map_err(inv)?,
            ),
        ];
        for ((c, bytes, _), (oname, obytes)) in self.images.iter().zip(&offsets) {
            views.push((format!("image.{c}"), TensorView::new(Dtype::U8, vec![bytes.len()], bytes).map_err(inv)?));
            views.push((oname.clone(), TensorView::new(Dtype::I64, vec![n + 1], obytes).map_err(inv)?));
        }
        safetensors::tensor::serialize_to_file(views, &None, path).map_err(inv)?;
        File::open(path).and_then(|f| f.sync_all()).map_err(io(path))
    }
}

/// A memory-mapped shard with its tensor table parsed once.
#[derive(Debug)]
pub struct ShardReader {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorEntry>,
}

/// Dtype, shape and byte range (relative to the data section) of a stored tensor.
type TensorEntry = (Dtype, Vec<usize>, (usize, usize));

impl ShardReader {
    /// Maps `path` and reads its tensor table.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let f = File::open(path).map_err(io(path))?;
        // SAFETY: dataset files are written once into a staging folder and never modified in
        // place afterwards; the map is read-only.
        let mmap = unsafe { Mmap::map(&f) }.map_err(io(path))?;
        let (n, meta): (usize, Metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| StoreError::Invalid {
            path: path.to_path_buf(),
            what: format!("not a safetensors file: {e}"),
        })?;
        let tensors =
            meta.tensors().into_iter().map(|(k, i)| (k, (i.dtype, i.shape.clone(), i.data_offsets))).collect();
        Ok(Self { path: path.to_path_buf(), mmap, data_start: 8 + n, tensors })
    }

    fn tensor(&self, name: &str, dtype: Dtype) -> Result<(&[usize], &[u8]), StoreError> {
        let (dt, shape, (a, b)) = self
            .tensors
            .get(name)
            .ok_or_else(|| StoreError::Invalid { path: self.path.clone(), what: format!("missing tensor `{name}`") })?;
        if *dt != dtype {
            return Err(StoreError::Invalid {
                path: self.path.clone(),
                what: format!("tensor `{name}` is {dt:?}; expected {dtype:?}"),
            });
        }
        Ok((shape, &self.mmap[self.data_start + a..self.data_start + b]))
    }

    /// Row `row` of the F32 tensor `name` whose rows hold `row_len` values.
    pub fn f32_row(&self, name: &str, row: usize, row_len: usize, out: &mut Vec<f32>) -> Result<(), StoreError> {
        let (shape, bytes) = self.tensor(name, Dtype::F32)?;
        let per: usize = shape.iter().skip(1).product();
        if per != row_len || row >= shape.first().copied().unwrap_or(0) {
            return Err(StoreError::Invalid {
                path: self.path.clone(),
                what: format!("tensor `{name}` has shape {shape:?}; expected rows of {row_len} values and a row {row}"),
            });
        }
        let b = &bytes[row * per * 4..(row + 1) * per * 4];
        out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        Ok(())
    }

    /// The JPEG bytes of camera `camera` at `row`.
    pub fn jpeg(&self, camera: &str, row: usize) -> Result<&[u8], StoreError> {
        let oname = format!("image.{camera}.offsets");
        let (_, ob) = self.tensor(&oname, Dtype::I64)?;
        let (_, bytes) = self.tensor(&format!("image.{camera}"), Dtype::U8)?;
        let off = |i: usize| ob.get(i * 8..i * 8 + 8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
        match (off(row), off(row + 1)) {
            (Some(a), Some(b)) if 0 <= a && a <= b && (b as usize) <= bytes.len() => Ok(&bytes[a as usize..b as usize]),
            _ => Err(StoreError::Invalid {
                path: self.path.clone(),
                what: format!("tensor `{oname}`: no valid byte range for row {row}"),
            }),
        }
    }
}

/// A staging folder beside the final one; [`Staging::commit`] renames it into place.
#[derive(Debug)]
pub struct Staging {
    /// Folder being written.
    pub dir: PathBuf,
    /// Staging and replaced folders left by compiles that were killed, removed on creation.
    pub removed: Vec<PathBuf>,
    target: PathBuf,
    overwrite: bool,
}

impl Staging {
    /// Creates `<target>.staging-<pid>` after cleaning the `.staging-<pid>` and `.old-<pid>`
    /// siblings of processes that are gone (see [`remove_dead_siblings`]); fails if `target`
    /// exists and `overwrite` is false.
    pub fn create(target: &Path, overwrite: bool) -> Result<Self, StoreError> {
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "dataset".into());
        let removed = remove_dead_siblings(target, &name)?;
        if target.exists() && !overwrite {
            return Err(StoreError::Invalid {
                path: target.to_path_buf(),
                what: "already exists; expected a new folder (pass overwrite)".into(),
            });
        }
        let dir = target.with_file_name(format!(".{name}.staging-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Self { dir, removed, target: target.to_path_buf(), overwrite })
    }

    /// Moves the finished folder into place (replacing an old one when allowed).
    pub fn commit(self) -> Result<(), StoreError> {
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        let old = self.target.with_file_name(format!(
            ".{}.old-{}",
            self.target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            std::process::id()
        ));
        let replaced = self.overwrite && self.target.exists();
        if replaced {
            std::fs::rename(&self.target, &old).map_err(io(&self.target))?;
        }
        std::fs::rename(&self.dir, &self.target).map_err(io(&self.target))?;
        if let Some(parent) = self.target.parent() {
            let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
            File::open(parent).and_then(|d| d.sync_all()).map_err(io(parent))?;
        }
        if replaced {
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        Ok(())
    }

    /// Removes the staging folder (after a failure).
    pub fn abandon(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes `.<name>.staging-<pid>` and `.<name>.old-<pid>` folders beside `target` whose process
/// is gone (a compile killed mid-write), logging each; returns them. An `.old-<pid>` is moved
/// back to `target` instead when `target` is missing (a compile killed between moving the old
/// dataset aside and moving the new one in).
fn remove_dead_siblings(target: &Path, name: &str) -> Result<Vec<PathBuf>, StoreError> {
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(parent) else { return Ok(Vec::new()) };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let pid = [".staging-", ".old-"]
            .iter()
            .find_map(|k| file.strip_prefix(&format!(".{name}{k}")))
            .and_then(|p| p.parse::<i32>().ok());
        if let Some(pid) = pid.filter(|&p| p as u32 != std::process::id() && !super::recovery::process_alive(p)) {
            let path = entry.path();
            if file.starts_with(&format!(".{name}.old-")) && !target.exists() {
                std::fs::rename(&path, target).map_err(io(target))?;
                tracing::warn!(
                    "{}: restored from {} (a compile, pid {pid}, was killed while replacing it)",
                    target.display(),
                    path.display()
                );
                continue;
            }
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
            tracing::warn!("{}: removed the leftover of a compile (pid {pid}) that did not finish", path.display());
            removed.push(path);
        }
    }
    Ok(removed)
}
