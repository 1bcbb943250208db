//! A local LeRobot v3.0 dataset -> a compiled dataset (shards, index, stats, report), with its
//! features mapped to ours by an [`ImportMapping`] (YAML, `config/lerobot_import.yaml`).
//!
//! Each LeRobot episode becomes one episode, each frame one sample:
//! - cameras: `image` features (PNG or JPEG, embedded or as files; JPEG frames of the mapped
//!   size are kept byte for byte, others are encoded to JPEG at `jpeg_quality`) or `video`
//!   features (each episode's frames decoded with ffmpeg, then encoded to JPEG).
//! - state: a 1-D float feature.
//! - sensor: a 2-D `[T, C]` feature is the window as stored; a 1-D `[C]` feature makes a
//!   window of the `window_frames` frames ending at the sample (earlier frames have no sample).
//! - action: a 2-D `[H, A]` feature is the chunk as stored; a 1-D `[A]` feature makes a chunk
//!   of the `horizon` frames starting at the sample (later frames have no sample).
//! - instruction: the frame's task (one per episode).
//!
//! Without our sidecar (`meta/vla_finetune.json`, written by the export) episodes are named
//! `lerobot_<episode_index>`, their task is the instruction, their outcome empty, the split is
//! drawn as compile draws it, and sample times come from `timestamp`. With it, the export's
//! ids, tasks, outcomes, splits and sample times come back. Statistics are computed on the
//! training split, as compile does. A mapped feature the dataset lacks or of another shape, a
//! data file whose frames do not match `meta/episodes`, a picture that does not decode: each
//! is an error naming the file or feature and what was expected; nothing is written then.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use serde::{Deserialize, Serialize};

use super::format::{self, column, float_at, int_at, values_at, Feature, Info, Sidecar, SidecarEpisode};
use super::LeRobotError;
use crate::dataset::compile::{
    add_totals, encode_jpeg, split_episodes, write_outputs, CompileConfig, CompileReport, EpisodeReport, SplitConfig,
};
use crate::dataset::episode::RgbImage;
use crate::dataset::stats::{DatasetStats, StatsAccumulator, DEFAULT_RESERVOIR_ROWS};
use crate::dataset::store::{
    CameraInfo, DatasetIndex, EpisodeEntry, SampleEntry, ShardInfo, ShardWriter, Split, Staging, FORMAT,
};

/// A camera: our name and the LeRobot feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraMap {
    /// Our camera name.
    pub name: String,
    /// LeRobot feature key (an `image` or `video` feature).
    pub feature: String,
}

/// Where the sensor window comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SensorMap {
    /// LeRobot feature key; left out: the one our export wrote (from the sidecar).
    pub feature: Option<String>,
    /// Our sensor stream name; left out: the sidecar's, else the feature key after `observation.`.
    pub name: Option<String>,
    /// For a 1-D feature: frames per window.
    pub window_frames: usize,
}

impl Default for SensorMap {
    fn default() -> Self {
        Self { feature: None, name: None, window_frames: 1 }
    }
}

/// Where the action chunk comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActionMap {
    /// LeRobot feature key; left out: the chunk our export wrote (from the sidecar), else `action`.
    pub feature: Option<String>,
    /// For a 1-D feature: chunk steps `H`.
    pub horizon: usize,
}

impl Default for ActionMap {
    fn default() -> Self {
        Self { feature: None, horizon: 8 }
    }
}

/// How LeRobot features map to ours (`config/lerobot_import.yaml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImportMapping {
    /// Cameras in order; empty: every `image` or `video` feature `observation.images.<name>`, in the
    /// dataset's order, named `<name>`.
    pub cameras: Vec<CameraMap>,
    /// State feature key.
    pub state: String,
    /// Sensor.
    pub sensor: SensorMap,
    /// Action.
    pub action: ActionMap,
    /// Train/validation split of episodes (used without our sidecar).
    pub split: SplitConfig,
    /// JPEG quality of frames that must be encoded, 1-100.
    pub jpeg_quality: u8,
    /// A shard is closed once it holds this many MiB.
    pub shard_max_mb: f64,
}

impl Default for ImportMapping {
    fn default() -> Self {
        Self {
            cameras: Vec::new(),
            state: "observation.state".into(),
            sensor: SensorMap::default(),
            action: ActionMap::default(),
            split: SplitConfig::default(),
            jpeg_quality: 90,
            shard_max_mb: 512.0,
        }
    }
}

impl ImportMapping {
    /// Reads a mapping; missing fields take their defaults.
    pub fn from_yaml_file(path: &Path) -> Result<Self, LeRobotError> {
        let text = std::fs::read_to_string(path).map_err(|source| LeRobotError::Io { path: path.into(), source })?;
        let m: ImportMapping =
            serde_yaml::from_str(&text).map_err(|e| LeRobotError::Mapping(format!("{}: {e}", path.display())))?;
        m.validate()?;
        Ok(m)
    }

    /// Checks the numbers.
    pub fn validate(&self) -> Result<(), LeRobotError> {
        let bad = |what: &str| Err(LeRobotError::Mapping(what.into()));
        if self.sensor.window_frames == 0 {
            return bad("`sensor.window_frames` must be at least 1");
        }
        if self.action.horizon == 0 {
            return bad("`action.horizon` must be at least 1");
        }
        if !(1..=100).contains(&self.jpeg_quality) {
            return bad("`jpeg_quality` must be within 1..=100");
        }
        if !(0.0..=1.0).contains(&self.split.val_fraction) {
            return bad("`split.val_fraction` must be within [0, 1]");
        }
        if !(self.shard_max_mb.is_finite() && self.shard_max_mb > 0.0) {
            return bad("`shard_max_mb` must be a positive number");
        }
        Ok(())
    }
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The compiled dataset folder.
    pub out: PathBuf,
    /// Episodes.
    pub episodes: usize,
    /// LeRobot frames read.
    pub frames: usize,
    /// Samples written.
    pub samples: usize,
    /// Frames without a sample, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Dataset features no mapping entry reads.
    pub ignored_features: Vec<String>,
}

/// Import settings besides the mapping.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Replace an existing output folder.
    pub overwrite: bool,
    /// The ffmpeg program for video features (None: `ffmpeg` on PATH).
    pub ffmpeg: Option<PathBuf>,
}

/// Drop reason: a 1-D sensor feature's window reaches before the episode's first frame.
pub const DROP_WINDOW: &str = "lerobot_sensor_window_before_start";
/// Drop reason: a 1-D action feature's chunk reaches past the episode's last frame.
pub const DROP_HORIZON: &str = "lerobot_action_horizon_past_end";

/// A mapped camera: our name, the feature key, its shape, whether it is a video.
struct Camera {
    name: String,
    key: String,
    shape: [usize; 3],
    video: bool,
}

/// The mapping resolved against the dataset's features.
struct Resolved {
    cameras: Vec<Camera>,
    state: (String, usize),
    sensor: (String, String, Option<usize>, [usize; 2]),
    action: (String, Option<usize>, [usize; 2]),
}

fn feature<'a>(info: &'a Info, key: &str, role: &str) -> Result<&'a Feature, LeRobotError> {
    info.features.get(key).ok_or_else(|| LeRobotError::Feature {
        feature: key.into(),
        what: format!(
            "mapped as the {role} but not in meta/info.json; the dataset has {:?}",
            info.features.0.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>()
        ),
    })
}

fn numeric(f: &Feature, key: &str, role: &str, dims: &[usize]) -> Result<(), LeRobotError> {
    if !matches!(f.dtype.as_str(), "float32" | "float64" | "int64" | "int32") || !dims.contains(&f.shape.len()) {
        return Err(LeRobotError::Feature {
            feature: key.into(),
            what: format!(
                "{} {:?} cannot be the {role}; expected a number feature of {} dimension(s)",
                f.dtype,
                f.shape,
                dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(" or ")
            ),
        });
    }
    Ok(())
}

fn resolve(m: &ImportMapping, info: &Info, sidecar: Option<&Sidecar>) -> Result<Resolved, LeRobotError> {
    let cams: Vec<(String, String)> = if m.cameras.is_empty() {
        info.features
            .0
            .iter()
            .filter(|(_, f)| f.is_visual())
            .filter_map(|(k, _)| k.strip_prefix("observation.images.").map(|n| (n.to_string(), k.clone())))
            .collect()
    } else {
        m.cameras.iter().map(|c| (c.name.clone(), c.feature.clone())).collect()
    };
    let mut cameras = Vec::new();
    for (name, key) in cams {
        let f = feature(info, &key, "camera")?;
        if !f.is_visual() || f.shape.len() != 3 || f.shape[2] != 3 {
            return Err(LeRobotError::Feature {
                feature: key,
                what: format!(
                    "{} {:?} cannot be a camera; expected an image or video feature of shape [height, width, 3]",
                    f.dtype, f.shape
                ),
            });
        }
        cameras.push(Camera { name, shape: [f.shape[0], f.shape[1], 3], video: f.dtype == "video", key });
    }
    let sf = feature(info, &m.state, "state")?;
    numeric(sf, &m.state, "state", &[1])?;
    let state = (m.state.clone(), sf.shape[0]);
    let skey = m.sensor.feature.clone().or_else(|| sidecar.map(|s| s.sensor_feature.clone())).ok_or_else(|| {
        LeRobotError::Mapping("`sensor.feature` is not set and the dataset has no meta/vla_finetune.json naming it; set it to the feature holding the sensor data".into())
    })?;
    let f = feature(info, &skey, "sensor")?;
    numeric(f, &skey, "sensor", &[1, 2])?;
    let name = m
        .sensor
        .name
        .clone()
        .or_else(|| sidecar.map(|s| s.sensor.clone()))
        .unwrap_or_else(|| skey.strip_prefix("observation.").unwrap_or(&skey).to_string());
    let sensor = match f.shape[..] {
        [t, c] => (skey, name, None, [t, c]),
        [c] => (skey, name, Some(m.sensor.window_frames), [m.sensor.window_frames, c]),
        _ => unreachable!("checked by numeric"),
    };
    let akey = m
        .action
        .feature
        .clone()
        .or_else(|| sidecar.map(|s| s.action_chunk_feature.clone()))
        .unwrap_or_else(|| "action".into());
    let f = feature(info, &akey, "action")?;
    numeric(f, &akey, "action", &[1, 2])?;
    let action = match f.shape[..] {
        [h, a] => (akey, None, [h, a]),
        [a] => (akey, Some(m.action.horizon), [m.action.horizon, a]),
        _ => unreachable!("checked by numeric"),
    };
    Ok(Resolved { cameras, state, sensor, action })
}

/// One row of `meta/episodes`.
#[derive(Debug, Clone)]
struct EpisodeMeta {
    index: i64,
    length: usize,
    file: PathBuf,
    /// Per camera: its video file and the episode's start in it, seconds (image cameras: None).
    videos: Vec<Option<(PathBuf, f64)>>,
}

fn read_episodes(root: &Path, info: &Info, cameras: &[Camera]) -> Result<Vec<EpisodeMeta>, LeRobotError> {
    let dir = root.join(format::EPISODES_DIR);
    if !dir.is_dir() {
        return Err(LeRobotError::Missing {
            path: dir,
            what: "the episodes metadata of a LeRobot v3.0 dataset (meta/episodes/chunk-XXX/file-XXX.parquet)".into(),
        });
    }
    let mut out = Vec::new();
    for path in format::chunked_files(&dir)? {
        for b in format::read_parquet(&path)? {
            let cols: Vec<&ArrayRef> = ["episode_index", "length", "data/chunk_index", "data/file_index"]
                .iter()
                .map(|c| column(&b, c, &path))
                .collect::<Result<_, _>>()?;
            for r in 0..b.num_rows() {
                let v: Vec<i64> = cols
                    .iter()
                    .map(|c| {
                        int_at(c, r)
                            .ok_or_else(|| format::invalid(&path, format!("row {r}: expected int64 episode columns")))
                    })
                    .collect::<Result<_, _>>()?;
                let fill = |t: &str, c: i64, f: i64| {
                    t.replace("{chunk_index:03d}", &format!("{c:03}")).replace("{file_index:03d}", &format!("{f:03}"))
                };
                let mut videos = Vec::new();
                for cam in cameras {
                    if !cam.video {
                        videos.push(None);
                        continue;
                    }
                    let template = info.video_path.as_deref().ok_or_else(|| {
                        format::invalid(
                            &root.join(format::INFO_PATH),
                            format!("video feature `{}` but no video_path", cam.key),
                        )
                    })?;
                    let col = |k: &str| column(&b, &format!("videos/{}/{k}", cam.key), &path);
                    let (c, f, from) = (col("chunk_index")?, col("file_index")?, col("from_timestamp")?);
                    let bad = || {
                        format::invalid(
                            &path,
                            format!(
                                "row {r}: expected int64 chunk/file and a float from_timestamp for video `{}`",
                                cam.key
                            ),
                        )
                    };
                    let file = fill(
                        &template.replace("{video_key}", &cam.key),
                        int_at(c, r).ok_or_else(bad)?,
                        int_at(f, r).ok_or_else(bad)?,
                    );
                    videos.push(Some((root.join(file), float_at(from, r).ok_or_else(bad)?)));
                }
                out.push(EpisodeMeta {
                    index: v[0],
                    length: v[1].max(0) as usize,
                    file: root.join(fill(&info.data_path, v[2], v[3])),
                    videos,
                });
            }
        }
    }
    if out.is_empty() {
        return Err(format::invalid(&dir, "no episode rows; expected one per episode".into()));
    }
    out.sort_by_key(|e| e.index);
    if out.len() != info.total_episodes {
        return Err(format::invalid(
            &dir,
            format!("{} episode rows; meta/info.json says total_episodes {}", out.len(), info.total_episodes),
        ));
    }
    Ok(out)
}

fn read_tasks(root: &Path) -> Result<BTreeMap<i64, String>, LeRobotError> {
    let path = root.join(format::TASKS_PATH);
    if !path.is_file() {
        return Err(LeRobotError::Missing {
            path,
            what: "the task strings of a LeRobot v3.0 dataset (meta/tasks.parquet)".into(),
        });
    }
    let mut out = BTreeMap::new();
    for b in format::read_parquet(&path)? {
        let (ti, t) = (column(&b, "task_index", &path)?, column(&b, "task", &path)?);
        let t =
            t.as_string_opt::<i32>().ok_or_else(|| format::invalid(&path, "column `task`: expected strings".into()))?;
        for r in 0..b.num_rows() {
            out.insert(
                int_at(ti, r).ok_or_else(|| format::invalid(&path, "column `task_index`: expected int64".into()))?,
                t.value(r).to_string(),
            );
        }
    }
    Ok(out)
}

/// One frame's values, as read.
struct Frame {
    frame_index: i64,
    timestamp: f64,
    task_index: i64,
    state: Vec<f32>,
    sensor: Vec<f32>,
    action: Vec<f32>,
    jpegs: Vec<Vec<u8>>,
}

/// Reads the frames of `ep` from its data file's batches (and its videos with `ffmpeg`).
fn episode_frames(
    root: &Path,
    ep: &EpisodeMeta,
    batches: &[RecordBatch],
    r: &Resolved,
    quality: u8,
    fps: u32,
    ffmpeg: Option<&Path>,
) -> Result<Vec<Frame>, LeRobotError> {
    let mut frames = Vec::with_capacity(ep.length);
    for b in batches {
        batch_frames(root, ep, b, r, quality, &mut frames)?;
    }
    frames.sort_by_key(|f| f.frame_index);
    check_frame_indices(ep, &frames)?;
    if let Some(ffmpeg) = ffmpeg {
        video_frames(ep, r, quality, fps, ffmpeg, &mut frames)?;
    }
    Ok(frames)
}

/// Appends to `frames` the rows of batch `b` that belong to episode `ep` (video cameras' JPEGs
/// left empty).
fn batch_frames(
    root: &Path,
    ep: &EpisodeMeta,
    b: &RecordBatch,
    r: &Resolved,
    quality: u8,
    frames: &mut Vec<Frame>,
) -> Result<(), LeRobotError> {
    let path = &ep.file;
    let epi = column(b, "episode_index", path)?;
    let (fi, ts, ti) = (column(b, "frame_index", path)?, column(b, "timestamp", path)?, column(b, "task_index", path)?);
    let st = column(b, &r.state.0, path)?;
    let se = column(b, &r.sensor.0, path)?;
    let ac = column(b, &r.action.0, path)?;
    let cams: Vec<Option<&ArrayRef>> = r
        .cameras
        .iter()
        .map(|c| if c.video { Ok(None) } else { column(b, &c.key, path).map(Some) })
        .collect::<Result<_, _>>()?;
    let sensor_vals = r.sensor.3[1] * if r.sensor.2.is_some() { 1 } else { r.sensor.3[0] };
    let action_vals = r.action.2[1] * if r.action.1.is_some() { 1 } else { r.action.2[0] };
    for row in 0..b.num_rows() {
        if int_at(epi, row) != Some(ep.index) {
            continue;
        }
        let bad = |key: &str, what: String| LeRobotError::Feature {
            feature: key.into(),
            what: format!("{}: episode {}, row {row}: {what}", path.display(), ep.index),
        };
        let read = |col: &ArrayRef, key: &str, want: usize| -> Result<Vec<f32>, LeRobotError> {
            let mut v = Vec::with_capacity(want);
            values_at(col, row, &mut v).map_err(|e| bad(key, e))?;
            if v.len() != want {
                return Err(bad(key, format!("{} values; expected {want} (its shape in meta/info.json)", v.len())));
            }
            Ok(v)
        };
        let mut jpegs = Vec::with_capacity(cams.len());
        for (col, cam) in cams.iter().zip(&r.cameras) {
            // Video frames are filled in later.
            jpegs.push(match col {
                Some(col) => frame_jpeg(root, col, row, &cam.shape, quality).map_err(|e| bad(&cam.key, e))?,
                None => Vec::new(),
            });
        }
        frames.push(Frame {
            frame_index: int_at(fi, row).ok_or_else(|| bad("frame_index", "expected int64".into()))?,
            timestamp: float_at(ts, row).ok_or_else(|| bad("timestamp", "expected float32 or float64".into()))?,
            task_index: int_at(ti, row).ok_or_else(|| bad("task_index", "expected int64".into()))?,
            state: read(st, &r.state.0, r.state.1)?,
            sensor: read(se, &r.sensor.0, sensor_vals)?,
            action: read(ac, &r.action.0, action_vals)?,
            jpegs,
        });
    }
    Ok(())
}

/// The sorted `frames` must be exactly frames `0..length` of `ep`.
fn check_frame_indices(ep: &EpisodeMeta, frames: &[Frame]) -> Result<(), LeRobotError> {
    if frames.len() != ep.length {
        return Err(LeRobotError::Frames {
            episode: ep.index,
            what: format!(
                "{} has {} frames of the episode; meta/episodes says length {}",
                ep.file.display(),
                frames.len(),
                ep.length
            ),
        });
    }
    if let Some((i, f)) = frames.iter().enumerate().find(|(i, f)| f.frame_index != *i as i64) {
        return Err(LeRobotError::Frames {
            episode: ep.index,
            what: format!(
                "frame_index {} where {i} was expected (frame indices must run 0..{})",
                f.frame_index, ep.length
            ),
        });
    }
    Ok(())
}

/// Fills in the JPEGs of `ep`'s video cameras, decoded with `ffmpeg` and encoded at `quality`.
fn video_frames(
    ep: &EpisodeMeta,
    r: &Resolved,
    quality: u8,
    fps: u32,
    ffmpeg: &Path,
    frames: &mut [Frame],
) -> Result<(), LeRobotError> {
    for (c, (cam, v)) in r.cameras.iter().zip(&ep.videos).enumerate() {
        let Some((file, from)) = v else { continue };
        let [h, w, _] = cam.shape;
        let decoded = super::video::decode(ffmpeg, file, *from, fps, ep.length, w, h)?;
        for (f, rgb) in frames.iter_mut().zip(decoded) {
            f.jpegs[c] = encode_jpeg(&RgbImage { width: w as u32, height: h as u32, data: rgb }, quality)
                .map_err(|e| LeRobotError::Video(format!("{}: encoding a frame as JPEG: {e}", file.display())))?;
        }
    }
    Ok(())
}

/// The JPEG of one picture cell: the stored bytes when they are a JPEG of `shape`, otherwise
/// the decoded picture encoded at `quality`. A cell without bytes is read from its path
/// (relative to the dataset root, or absolute).
fn frame_jpeg(root: &Path, col: &ArrayRef, row: usize, shape: &[usize; 3], quality: u8) -> Result<Vec<u8>, String> {
    let s = col
        .as_struct_opt()
        .ok_or_else(|| format!("a {} column; expected struct<bytes, path> (an image feature)", col.data_type()))?;
    let bytes = s.column_by_name("bytes").filter(|b| b.is_valid(row)).map(|b| match b.data_type() {
        DataType::Binary => Ok(b.as_binary::<i32>().value(row).to_vec()),
        DataType::LargeBinary => Ok(b.as_binary::<i64>().value(row).to_vec()),
        t => Err(format!("image bytes of type {t}; expected binary")),
    });
    let bytes = match bytes {
        Some(b) => b?,
        None => {
            let p = s
                .column_by_name("path")
                .filter(|p| p.is_valid(row))
                .and_then(|p| p.as_string_opt::<i32>().map(|p| p.value(row).to_string()));
            let p = p.ok_or("an image with neither bytes nor path")?;
            let full = if Path::new(&p).is_absolute() { PathBuf::from(&p) } else { root.join(&p) };
            std::fs::read(&full).map_err(|e| format!("image file {}: {e}", full.display()))?
        }
    };
    let fmt = image::guess_format(&bytes).map_err(|e| format!("picture of unknown format: {e}"))?;
    let img = image::load_from_memory_with_format(&bytes, fmt)
        .map_err(|e| format!("picture does not decode ({fmt:?}): {e}"))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if [h, w] != shape[..2] {
        return Err(format!(
            "picture is {w}x{h}; expected {}x{} (shape {:?} in meta/info.json)",
            shape[1], shape[0], shape
        ));
    }
    if fmt == image::ImageFormat::Jpeg && img.color() == image::ColorType::Rgb8 {
        return Ok(bytes);
    }
    let rgb = img.to_rgb8();
    encode_jpeg(&RgbImage { width: w as u32, height: h as u32, data: rgb.into_raw() }, quality)
        .map_err(|e| format!("encoding JPEG: {e}"))
}

/// Imports the LeRobot v3.0 dataset at `root` into the new compiled dataset folder `out`;
/// `progress(done, total)` counts frames.
pub fn import(
    root: &Path,
    mapping: &ImportMapping,
    out: &Path,
    opts: &ImportOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ImportReport, LeRobotError> {
    mapping.validate()?;
    let info = Info::load(root)?;
    let sidecar_path = root.join(format::SIDECAR_PATH);
    let sidecar: Option<Sidecar> =
        if sidecar_path.is_file() { Some(crate::dataset::store::read_json(&sidecar_path)?) } else { None };
    let sidecar = sidecar.filter(|s| s.format == format::SIDECAR_FORMAT && s.episodes.len() == info.total_episodes);
    let r = resolve(mapping, &info, sidecar.as_ref())?;
    let ffmpeg =
        if r.cameras.iter().any(|c| c.video) { Some(super::video::find_ffmpeg(opts.ffmpeg.as_deref())?) } else { None };
    let tasks = read_tasks(root)?;
    let episodes = read_episodes(root, &info, &r.cameras)?;
    let staging = Staging::create(out, opts.overwrite)?;
    let src = Source {
        root,
        info: &info,
        sidecar: sidecar.as_ref(),
        tasks: &tasks,
        episodes: &episodes,
        ffmpeg: ffmpeg.as_deref(),
    };
    match build(&src, mapping, &r, &staging.dir, progress) {
        Ok(mut rep) => {
            staging.commit()?;
            rep.out = out.to_path_buf();
            Ok(rep)
        }
        Err(e) => {
            staging.abandon();
            Err(e)
        }
    }
}

/// What was read of the dataset before its frames.
struct Source<'a> {
    root: &'a Path,
    info: &'a Info,
    sidecar: Option<&'a Sidecar>,
    tasks: &'a BTreeMap<i64, String>,
    episodes: &'a [EpisodeMeta],
    ffmpeg: Option<&'a Path>,
}

/// Writes the compiled dataset of `src` into `dir` (the staging folder).
fn build(
    src: &Source<'_>,
    m: &ImportMapping,
    r: &Resolved,
    dir: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ImportReport, LeRobotError> {
    let Source { root, info, sidecar, tasks, episodes, ffmpeg } = *src;
    let (ids, splits) = ids_and_splits(src, m);
    let mut out = Imported {
        sink: SampleSink::new(dir, r, m),
        entries: Vec::new(),
        report: CompileReport::default(),
        dropped: BTreeMap::new(),
        frames: 0,
    };
    let mut loaded: Option<(PathBuf, Vec<RecordBatch>)> = None;
    for (i, ep) in episodes.iter().enumerate() {
        if loaded.as_ref().is_none_or(|(p, _)| *p != ep.file) {
            loaded = Some((ep.file.clone(), format::read_parquet(&ep.file)?));
        }
        let batches = &loaded.as_ref().expect("loaded above").1;
        let frames = episode_frames(root, ep, batches, r, m.jpeg_quality, info.fps, ffmpeg)?;
        let instruction = episode_instruction(root, tasks, ep, &frames)?;
        let side = sidecar.map(|s| &s.episodes[i]).filter(|s| s.t_ns.len() == frames.len());
        out.episode(&frames, r, EpisodeOrigin { id: &ids[i], split: splits[i], instruction, side })?;
        progress(out.frames, info.total_frames);
    }
    let (shards, samples, stats) = out.sink.finish()?;
    add_totals(&mut out.report);
    if samples.is_empty() {
        return Err(LeRobotError::Mapping(format!("no frame gave a sample ({:?}); nothing written", out.dropped)));
    }
    let control_hz = sidecar.map_or(info.fps as f64, |s| s.control_hz);
    let index = DatasetIndex {
        format: FORMAT.into(),
        cameras: r
            .cameras
            .iter()
            .map(|c| CameraInfo { name: c.name.clone(), width: c.shape[1] as u32, height: c.shape[0] as u32 })
            .collect(),
        sensor_shape: r.sensor.3,
        state_names: state_names(info, &r.state.0, r.state.1),
        action_shape: r.action.2,
        // Unnamed: reports label them `dim<k>`.
        action_names: Vec::new(),
        action_units: Vec::new(),
        control_hz,
        shards,
        episodes: out.entries,
        samples,
    };
    write_outputs(dir, &compile_config(m, r, control_hz), &index, &stats, &out.report)?;
    Ok(ImportReport {
        out: dir.to_path_buf(),
        episodes: episodes.len(),
        frames: out.frames,
        samples: index.samples.len(),
        dropped: out.dropped,
        ignored_features: ignored_features(info, r),
    })
}

/// Where an episode's samples come from, besides its frames.
struct EpisodeOrigin<'a> {
    id: &'a str,
    split: Split,
    instruction: String,
    /// Its entry in our sidecar, when that covers each of its frames.
    side: Option<&'a SidecarEpisode>,
}

/// What the import has gathered so far: the samples written, the episodes' index entries and
/// report, the drops by reason and the frames read.
struct Imported<'a> {
    sink: SampleSink<'a>,
    entries: Vec<EpisodeEntry>,
    report: CompileReport,
    dropped: BTreeMap<String, u64>,
    frames: usize,
}

impl Imported<'_> {
    /// Writes a sample for each of an episode's `frames` that has a sensor window and action
    /// chunk, and lists the episode.
    fn episode(&mut self, frames: &[Frame], r: &Resolved, ep: EpisodeOrigin<'_>) -> Result<(), LeRobotError> {
        let EpisodeOrigin { id, split, instruction, side } = ep;
        let (mut kept, mut drops) = (0usize, BTreeMap::new());
        for (k, f) in frames.iter().enumerate() {
            let (sensor, action) = match sample_windows(frames, k, r) {
                Ok(w) => w,
                Err(reason) => {
                    *drops.entry(reason.to_string()).or_insert(0u64) += 1;
                    continue;
                }
            };
            let t_ns = side.map_or_else(|| (f.timestamp * 1e9).round() as i64, |s| s.t_ns[k]);
            let episode = self.entries.len();
            let at = SampleEntry { episode, t_ns, split, shard: 0, row: 0, frames: vec![k; r.cameras.len()] };
            self.sink.push(f, &sensor, &action, at)?;
            kept += 1;
        }
        self.frames += frames.len();
        for (k, v) in &drops {
            *self.dropped.entry(k.clone()).or_default() += v;
        }
        let (task, outcome) =
            side.map_or_else(|| (instruction.clone(), String::new()), |s| (s.task.clone(), s.outcome.clone()));
        self.entries.push(EpisodeEntry { id: id.to_string(), instruction, task, outcome, split, samples: kept });
        self.report.episodes.push(EpisodeReport {
            id: id.to_string(),
            split,
            candidates: frames.len() as u64,
            samples: kept as u64,
            drops,
            streams: Vec::new(),
            skew: BTreeMap::new(),
            camera_spread: Default::default(),
            damage: None,
        });
        Ok(())
    }
}

/// Each episode's id and split: our sidecar's when the dataset has one (an export of ours),
/// else `lerobot_<index>` and the mapping's split.
fn ids_and_splits(src: &Source<'_>, m: &ImportMapping) -> (Vec<String>, Vec<Split>) {
    let ids: Vec<String> = src
        .episodes
        .iter()
        .enumerate()
        .map(|(i, e)| src.sidecar.map_or_else(|| format!("lerobot_{:06}", e.index), |s| s.episodes[i].id.clone()))
        .collect();
    let splits = match src.sidecar {
        Some(s) => s.episodes.iter().map(|e| e.split).collect(),
        None => split_episodes(&ids, &m.split),
    };
    (ids, splits)
}

/// The imported samples being written: shard files, their index entries and the statistics of
/// the training split.
struct SampleSink<'a> {
    dir: &'a Path,
    cameras: Vec<String>,
    r: &'a Resolved,
    shard_max_bytes: f64,
    /// Sensor, state and action.
    accs: [StatsAccumulator; 3],
    shard: ShardWriter,
    shards: Vec<ShardInfo>,
    samples: Vec<SampleEntry>,
}

impl<'a> SampleSink<'a> {
    fn new(dir: &'a Path, r: &'a Resolved, m: &ImportMapping) -> Self {
        let cameras: Vec<String> = r.cameras.iter().map(|c| c.name.clone()).collect();
        let seed = m.split.seed;
        let accs = [
            StatsAccumulator::new(r.sensor.3[1], DEFAULT_RESERVOIR_ROWS, seed ^ 1),
            StatsAccumulator::new(r.state.1, DEFAULT_RESERVOIR_ROWS, seed ^ 2),
            StatsAccumulator::new(r.action.2[1], DEFAULT_RESERVOIR_ROWS, seed ^ 3),
        ];
        let shard = ShardWriter::new(&cameras, r.sensor.3, r.state.1, r.action.2);
        let shard_max_bytes = m.shard_max_mb * 1024.0 * 1024.0;
        Self { dir, cameras, r, shard_max_bytes, accs, shard, shards: Vec::new(), samples: Vec::new() }
    }

    /// Writes the sample of frame `f` with its sensor window and action chunk; `at` says where
    /// it comes from (its shard and row are filled in here).
    fn push(&mut self, f: &Frame, sensor: &[f32], action: &[f32], mut at: SampleEntry) -> Result<(), LeRobotError> {
        if at.split == Split::Train {
            self.accs[0].add_rows(sensor);
            self.accs[1].add_rows(&f.state);
            self.accs[2].add_rows(action);
        }
        let jpegs: Vec<&[u8]> = f.jpegs.iter().map(|j| j.as_slice()).collect();
        at.row = self.shard.push(sensor, &f.state, action, &jpegs)?;
        at.shard = self.shards.len();
        self.samples.push(at);
        if self.shard.bytes() as f64 >= self.shard_max_bytes {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), LeRobotError> {
        if self.shard.rows() > 0 {
            let file = format!("shard-{:05}.safetensors", self.shards.len());
            self.shard.write(&self.dir.join(&file))?;
            self.shards.push(ShardInfo { file, samples: self.shard.rows() });
            self.shard = ShardWriter::new(&self.cameras, self.r.sensor.3, self.r.state.1, self.r.action.2);
        }
        Ok(())
    }

    /// The shards, the samples and the statistics, the last shard written.
    fn finish(mut self) -> Result<(Vec<ShardInfo>, Vec<SampleEntry>, DatasetStats), LeRobotError> {
        self.flush()?;
        let [sensor, state, action] = self.accs;
        let stats = DatasetStats { sensor: sensor.finish(), state: state.finish(), action: action.finish() };
        Ok((self.shards, self.samples, stats))
    }
}

/// Episode `ep`'s instruction: the task of its frames, which must all have the same one.
fn episode_instruction(
    root: &Path,
    tasks: &BTreeMap<i64, String>,
    ep: &EpisodeMeta,
    frames: &[Frame],
) -> Result<String, LeRobotError> {
    let Some(first) = frames.first() else { return Ok(String::new()) };
    if let Some(f) = frames.iter().find(|f| f.task_index != first.task_index) {
        return Err(LeRobotError::Frames {
            episode: ep.index,
            what: format!(
                "frame {} has task_index {} but frame 0 has {}; expected one task per episode",
                f.frame_index, f.task_index, first.task_index
            ),
        });
    }
    tasks.get(&first.task_index).cloned().ok_or_else(|| {
        format::invalid(
            &root.join(format::TASKS_PATH),
            format!("no task_index {} (episode {})", first.task_index, ep.index),
        )
    })
}

/// The sensor window and action chunk of frame `k` (each a single frame's values when the
/// mapping builds none), or the drop reason when the episode is too short for them there.
fn sample_windows(frames: &[Frame], k: usize, r: &Resolved) -> Result<(Vec<f32>, Vec<f32>), &'static str> {
    let sensor = match r.sensor.2 {
        None => frames[k].sensor.clone(),
        Some(w) if k + 1 >= w => frames[k + 1 - w..=k].iter().flat_map(|g| g.sensor.iter().copied()).collect(),
        Some(_) => return Err(DROP_WINDOW),
    };
    let action = match r.action.1 {
        None => frames[k].action.clone(),
        Some(h) if k + h <= frames.len() => frames[k..k + h].iter().flat_map(|g| g.action.iter().copied()).collect(),
        Some(_) => return Err(DROP_HORIZON),
    };
    Ok((sensor, action))
}

/// The compile settings the imported set is equivalent to (written as its compile.yaml).
fn compile_config(m: &ImportMapping, r: &Resolved, control_hz: f64) -> CompileConfig {
    let (sensor_shape, action_shape) = (r.sensor.3, r.action.2);
    let mut cfg = CompileConfig::default();
    cfg.align.control_hz = control_hz;
    cfg.align.cameras = r.cameras.iter().map(|c| c.name.clone()).collect();
    cfg.align.sensor = r.sensor.1.clone();
    cfg.align.sensor_samples = sensor_shape[0];
    cfg.align.sensor_window_s = sensor_shape[0] as f64 / control_hz;
    cfg.align.horizon = action_shape[0];
    cfg.align.action_dim = Some(action_shape[1]);
    cfg.split = m.split.clone();
    cfg.store.jpeg_quality = m.jpeg_quality;
    cfg.store.shard_max_mb = m.shard_max_mb;
    cfg
}

/// The dataset's features the mapping does not use (LeRobot's index columns aside).
fn ignored_features(info: &Info, r: &Resolved) -> Vec<String> {
    let used: Vec<&str> = r
        .cameras
        .iter()
        .map(|c| c.key.as_str())
        .chain([r.state.0.as_str(), r.sensor.0.as_str(), r.action.0.as_str()])
        .collect();
    info.features
        .0
        .iter()
        .map(|(k, _)| k.clone())
        .filter(|k| !used.contains(&k.as_str()) && !format::INDEX_FEATURES.contains(&k.as_str()))
        .collect()
}

/// The state's value names from the feature's `names` (a list, or a mapping holding one list,
/// as `{"motors": [...]}` in older LeRobot datasets), else `s0, s1, ...`.
fn state_names(info: &Info, key: &str, n: usize) -> Vec<String> {
    let names = info.features.get(key).map(|f| match &f.names {
        serde_json::Value::Object(m) if m.len() == 1 => m.values().next().cloned().unwrap_or_default(),
        v => v.clone(),
    });
    let names: Option<Vec<String>> = names.and_then(|v| serde_json::from_value(v).ok());
    match names {
        Some(v) if v.len() == n => v,
        _ => (0..n).map(|i| format!("s{i}")).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_rejects_unknown_keys_and_bad_numbers() {
        let e = serde_yaml::from_str::<ImportMapping>("camras: []").unwrap_err().to_string();
        assert!(e.contains("camras"), "{e}");
        let m: ImportMapping = serde_yaml::from_str("action: {horizon: 0}").unwrap();
        assert!(m.validate().unwrap_err().to_string().contains("action.horizon"));
    }

    #[test]
    fn state_names_come_from_a_list_or_a_one_list_mapping() {
        let info = |names: serde_json::Value| Info {
            codebase_version: format::CODEBASE_VERSION.into(),
            fps: 10,
            features: format::Features(vec![("observation.state".into(), Feature::f32(vec![2], names))]),
            total_episodes: 0,
            total_frames: 0,
            total_tasks: 0,
            chunks_size: 1000,
            data_files_size_in_mb: 100,
            video_files_size_in_mb: 200,
            data_path: format::DATA_PATH.into(),
            video_path: None,
            robot_type: None,
            splits: BTreeMap::new(),
        };
        let names = |v| state_names(&info(v), "observation.state", 2);
        assert_eq!(names(serde_json::json!(["a", "b"])), ["a", "b"]);
        assert_eq!(names(serde_json::json!({"motors": ["a", "b"]})), ["a", "b"]);
        assert_eq!(names(serde_json::json!(["a"])), ["s0", "s1"]);
        assert_eq!(names(serde_json::Value::Null), ["s0", "s1"]);
    }

    #[test]
    fn the_documented_mapping_is_the_default() {
        let m: ImportMapping = serde_yaml::from_str(include_str!("../../../config/lerobot_import.yaml")).unwrap();
        assert_eq!(m, ImportMapping::default());
    }
}
