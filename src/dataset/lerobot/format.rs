//! LeRobot v3.0 on-disk format: `meta/info.json`, features, file paths, the Arrow types of the
//! columns (as LeRobot's writer, through Hugging Face `datasets`, stores them), parquet files
//! and the statistics layout of `meta/stats.json`.
//!
//! ```text
//! meta/info.json                                codebase_version "v3.0", fps, features, totals, paths
//! meta/stats.json                               {feature: {min, max, mean, std, count, q01, q10, q50, q90, q99}}
//! meta/tasks.parquet                            task_index, task (the pandas index)
//! meta/episodes/chunk-000/file-000.parquet      one row per episode: length, data file, frame range, stats/*
//! data/chunk-000/file-000.parquet               one row per frame; an image is a struct {bytes, path}
//! videos/<feature>/chunk-000/file-000.mp4       video features only
//! meta/vla_finetune.json                        ours (LeRobot ignores it): episode ids, splits, sample times
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{Float64Builder, Int64Builder, ListBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use super::LeRobotError;
use crate::dataset::stats::StatsAccumulator;

/// The only version read and written.
pub const CODEBASE_VERSION: &str = "v3.0";
/// Dataset description.
pub const INFO_PATH: &str = "meta/info.json";
/// Aggregated statistics.
pub const STATS_PATH: &str = "meta/stats.json";
/// Task strings.
pub const TASKS_PATH: &str = "meta/tasks.parquet";
/// Episode metadata folder (chunked like the data).
pub const EPISODES_DIR: &str = "meta/episodes";
/// Data file path template of info.json.
pub const DATA_PATH: &str = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet";
/// Video file path template of info.json.
pub const VIDEO_PATH: &str = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4";
/// Our metadata beside LeRobot's.
pub const SIDECAR_PATH: &str = "meta/vla_finetune.json";
/// Files per chunk folder (LeRobot's default).
pub const CHUNKS_SIZE: usize = 1000;
/// A data file is closed before it would exceed this (LeRobot's default).
pub const DATA_FILES_SIZE_MB: usize = 100;
/// A video file is closed before it would exceed this (LeRobot's default).
pub const VIDEO_FILES_SIZE_MB: usize = 200;
/// Quantiles LeRobot 0.6 keeps, with their key.
pub const QUANTILES: [(&str, f64); 5] = [("q01", 0.01), ("q10", 0.10), ("q50", 0.50), ("q90", 0.90), ("q99", 0.99)];
/// Columns every frame has besides the features of the robot.
pub const INDEX_FEATURES: [&str; 5] = ["timestamp", "frame_index", "episode_index", "index", "task_index"];

/// `data/chunk-XXX/file-XXX.parquet` (or `meta/episodes/...` with `dir`).
pub fn chunk_file(dir: &str, chunk: usize, file: usize, ext: &str) -> String {
    format!("{dir}/chunk-{chunk:03}/file-{file:03}.{ext}")
}

/// One feature of info.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feature {
    /// `float32`, `int64`, `image`, `video`, `string`, ...
    pub dtype: String,
    /// Per-frame shape (`[h, w, c]` for images).
    pub shape: Vec<usize>,
    /// Names of the dimensions or values (a list, a mapping or null).
    #[serde(default)]
    pub names: serde_json::Value,
    /// Video encoding facts (video features).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

impl Feature {
    /// A float32 feature of `shape`.
    pub fn f32(shape: Vec<usize>, names: serde_json::Value) -> Self {
        Self { dtype: "float32".into(), shape, names, info: None }
    }

    /// Whether frames of this feature are pictures.
    pub fn is_visual(&self) -> bool {
        self.dtype == "image" || self.dtype == "video"
    }

    /// Values per frame.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Features in the order of the file (a JSON object keeps its key order here).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Features(pub Vec<(String, Feature)>);

impl Features {
    /// The feature named `key`.
    pub fn get(&self, key: &str) -> Option<&Feature> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, f)| f)
    }
}

impl Serialize for Features {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Features {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Features;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of features")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Features, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, Feature>()? {
                    out.push((k, v));
                }
                Ok(Features(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// `meta/info.json` (fields in LeRobot's order; those a reader can do without take LeRobot's
/// defaults when absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    /// Always [`CODEBASE_VERSION`].
    pub codebase_version: String,
    /// Frames per second.
    pub fps: u32,
    /// Every column of a frame.
    pub features: Features,
    /// Episodes.
    pub total_episodes: usize,
    /// Frames.
    pub total_frames: usize,
    /// Distinct tasks.
    #[serde(default)]
    pub total_tasks: usize,
    /// Files per chunk folder.
    #[serde(default = "default_chunks_size")]
    pub chunks_size: usize,
    /// Data file size limit, MB.
    #[serde(default = "default_data_mb")]
    pub data_files_size_in_mb: usize,
    /// Video file size limit, MB.
    #[serde(default = "default_video_mb")]
    pub video_files_size_in_mb: usize,
    /// Data path template.
    #[serde(default = "default_data_path")]
    pub data_path: String,
    /// Video path template (null without video features).
    #[serde(default)]
    pub video_path: Option<String>,
    /// Robot type.
    #[serde(default)]
    pub robot_type: Option<String>,
    /// Splits, as `{"train": "0:N"}`.
    #[serde(default)]
    pub splits: BTreeMap<String, String>,
}

fn default_chunks_size() -> usize {
    CHUNKS_SIZE
}

fn default_data_mb() -> usize {
    DATA_FILES_SIZE_MB
}

fn default_video_mb() -> usize {
    VIDEO_FILES_SIZE_MB
}

fn default_data_path() -> String {
    DATA_PATH.into()
}

impl Info {
    /// Reads `root/meta/info.json`; a dataset of another codebase version is refused with what
    /// was found.
    pub fn load(root: &Path) -> Result<Self, LeRobotError> {
        let path = root.join(INFO_PATH);
        if !path.is_file() {
            return Err(LeRobotError::Missing { path, what: "meta/info.json of a LeRobot v3.0 dataset".into() });
        }
        let bytes = std::fs::read(&path).map_err(|source| LeRobotError::Io { path: path.clone(), source })?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| invalid(&path, format!("not JSON: {e}")))?;
        let version = value.get("codebase_version").and_then(|v| v.as_str()).unwrap_or("(none)");
        if version != CODEBASE_VERSION {
            return Err(LeRobotError::Version { path, found: version.into() });
        }
        let info: Info =
            serde_json::from_value(value).map_err(|e| invalid(&path, format!("not a LeRobot v3.0 info.json: {e}")))?;
        if info.fps == 0 {
            return Err(invalid(&path, "fps is 0; expected a positive frame rate".into()));
        }
        Ok(info)
    }
}

/// Our sidecar file: what LeRobot's format has no place for, so an import of our export gives
/// back the same compiled samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    /// Always [`SIDECAR_FORMAT`].
    pub format: String,
    /// Control rate of the compiled set (info.json's fps is its rounding).
    pub control_hz: f64,
    /// Our name of the sensor stream.
    pub sensor: String,
    /// The feature holding the sensor window.
    pub sensor_feature: String,
    /// The feature holding the whole action chunk.
    pub action_chunk_feature: String,
    /// Per LeRobot episode, in episode_index order.
    pub episodes: Vec<SidecarEpisode>,
}

/// Identifies [`Sidecar`].
pub const SIDECAR_FORMAT: &str = "vla_finetune.lerobot/1";

/// One episode in the sidecar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SidecarEpisode {
    /// Our episode id.
    pub id: String,
    /// Task name (LeRobot's `task` is the instruction).
    pub task: String,
    /// Recorded outcome.
    pub outcome: String,
    /// Train or validation.
    pub split: crate::dataset::store::Split,
    /// Sample time of each frame, ns (episode clock).
    pub t_ns: Vec<i64>,
}

pub(super) fn invalid(path: &Path, what: String) -> LeRobotError {
    LeRobotError::Invalid { path: path.to_path_buf(), what }
}

/// The Arrow type of a feature's column, as `datasets` writes it: a scalar for shape `[1]`,
/// a fixed-size list for one dimension, nested lists (`Array2D`/`Array3D`) beyond.
pub fn column_field(key: &str, f: &Feature) -> Result<Field, LeRobotError> {
    let leaf = match f.dtype.as_str() {
        "float32" => DataType::Float32,
        "float64" => DataType::Float64,
        "int64" => DataType::Int64,
        "image" => return Ok(Field::new(key, image_type(), true)),
        other => {
            return Err(LeRobotError::Feature {
                feature: key.into(),
                what: format!("dtype `{other}` cannot be written; expected float32, float64, int64 or image"),
            })
        }
    };
    let field = match f.shape.len() {
        1 if f.shape[0] == 1 => Field::new(key, leaf, true),
        1 => Field::new(
            key,
            DataType::FixedSizeList(Arc::new(Field::new("element", leaf, true)), f.shape[0] as i32),
            true,
        ),
        n => {
            let mut t = leaf;
            for _ in 0..n {
                t = DataType::List(Arc::new(Field::new("element", t, true)));
            }
            let ext = serde_json::json!([f.shape, f.dtype]).to_string();
            Field::new(key, t, true).with_metadata(
                [
                    ("ARROW:extension:name".to_string(), format!("datasets.features.features.Array{n}DExtensionType")),
                    ("ARROW:extension:metadata".to_string(), ext),
                ]
                .into_iter()
                .collect(),
            )
        }
    };
    Ok(field)
}

/// `struct<bytes: binary, path: string>`, the `datasets` Image feature.
pub fn image_type() -> DataType {
    DataType::Struct(vec![Field::new("bytes", DataType::Binary, true), Field::new("path", DataType::Utf8, true)].into())
}

/// The `datasets` description of a feature (the `huggingface` schema metadata).
fn hf_feature(f: &Feature) -> serde_json::Value {
    use serde_json::json;
    match (f.dtype.as_str(), f.shape.len()) {
        ("image", _) => json!({"_type": "Image"}),
        (_, 1) if f.shape[0] == 1 => json!({"dtype": f.dtype, "_type": "Value"}),
        (_, 1) => json!({"feature": {"dtype": f.dtype, "_type": "Value"}, "length": f.shape[0], "_type": "List"}),
        (_, n) => json!({"shape": f.shape, "dtype": f.dtype, "_type": format!("Array{n}D")}),
    }
}

/// The schema of the data files for `features` (video features have no column).
pub fn data_schema(features: &Features) -> Result<Arc<Schema>, LeRobotError> {
    let mut fields = Vec::new();
    let mut hf = serde_json::Map::new();
    for (k, f) in features.0.iter().filter(|(_, f)| f.dtype != "video") {
        fields.push(column_field(k, f)?);
        hf.insert(k.clone(), hf_feature(f));
    }
    let meta = serde_json::json!({"info": {"features": hf}}).to_string();
    Ok(Arc::new(Schema::new(fields).with_metadata([("huggingface".to_string(), meta)].into_iter().collect())))
}

/// Snappy-compressed parquet, as pyarrow writes by default.
pub fn writer_props() -> WriterProperties {
    WriterProperties::builder().set_compression(Compression::SNAPPY).build()
}

/// Opens a parquet writer on a new file (its folder created).
pub fn create_writer(path: &Path, schema: Arc<Schema>) -> Result<ArrowWriter<File>, LeRobotError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| LeRobotError::Io { path: dir.to_path_buf(), source })?;
    }
    let f = File::create(path).map_err(|source| LeRobotError::Io { path: path.to_path_buf(), source })?;
    ArrowWriter::try_new(f, schema, Some(writer_props())).map_err(|e| invalid(path, format!("parquet writer: {e}")))
}

/// Writes one record batch as a whole parquet file.
pub fn write_parquet(path: &Path, batch: &RecordBatch) -> Result<(), LeRobotError> {
    let mut w = create_writer(path, batch.schema())?;
    w.write(batch).map_err(|e| invalid(path, format!("writing parquet: {e}")))?;
    let f = w.into_inner().map_err(|e| invalid(path, format!("closing parquet: {e}")))?;
    f.sync_all().map_err(|source| LeRobotError::Io { path: path.to_path_buf(), source })
}

/// Reads every record batch of a parquet file.
pub fn read_parquet(path: &Path) -> Result<Vec<RecordBatch>, LeRobotError> {
    if !path.is_file() {
        return Err(LeRobotError::Missing {
            path: path.to_path_buf(),
            what: "a parquet file the dataset's metadata names".into(),
        });
    }
    let f = File::open(path).map_err(|source| LeRobotError::Io { path: path.to_path_buf(), source })?;
    let r = ParquetRecordBatchReaderBuilder::try_new(f)
        .and_then(|b| b.with_batch_size(256).build())
        .map_err(|e| invalid(path, format!("not a readable parquet file: {e}")))?;
    r.collect::<Result<Vec<_>, _>>().map_err(|e| invalid(path, format!("reading parquet: {e}")))
}

/// The parquet files `dir/chunk-*/file-*.parquet`, sorted.
pub fn chunked_files(dir: &Path) -> Result<Vec<PathBuf>, LeRobotError> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|source| LeRobotError::Io { path: dir.to_path_buf(), source })?;
    for chunk in rd.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("chunk-")) {
        let files =
            std::fs::read_dir(chunk.path()).map_err(|source| LeRobotError::Io { path: chunk.path(), source })?;
        out.extend(files.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "parquet")));
    }
    out.sort();
    Ok(out)
}

/// A column of `batch` by name, or which one is missing.
pub fn column<'a>(batch: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a ArrayRef, LeRobotError> {
    batch.column_by_name(name).ok_or_else(|| {
        invalid(
            path,
            format!(
                "no column `{name}`; the columns are {:?}",
                batch.schema().fields().iter().map(|f| f.name().clone()).collect::<Vec<_>>()
            ),
        )
    })
}

/// An integer column's value at `row` (int64 or int32).
pub fn int_at(col: &ArrayRef, row: usize) -> Option<i64> {
    match col.data_type() {
        DataType::Int64 => Some(col.as_primitive::<Int64Type>().value(row)),
        DataType::Int32 => Some(col.as_primitive::<Int32Type>().value(row) as i64),
        _ => None,
    }
}

/// A float column's value at `row` (float32 or float64).
pub fn float_at(col: &ArrayRef, row: usize) -> Option<f64> {
    match col.data_type() {
        DataType::Float32 => Some(col.as_primitive::<Float32Type>().value(row) as f64),
        DataType::Float64 => Some(col.as_primitive::<Float64Type>().value(row)),
        _ => None,
    }
}

/// Appends the values of row `row` of a (nested) list column of floats or integers, or of a
/// scalar column, to `out`; `Err` names the type found.
pub fn values_at(col: &ArrayRef, row: usize, out: &mut Vec<f32>) -> Result<(), String> {
    match col.data_type() {
        DataType::FixedSizeList(..) => flatten(&col.as_fixed_size_list().value(row), out),
        DataType::List(_) => flatten(&col.as_list::<i32>().value(row), out),
        DataType::LargeList(_) => flatten(&col.as_list::<i64>().value(row), out),
        _ => flatten(&col.slice(row, 1), out),
    }
}

fn flatten(a: &ArrayRef, out: &mut Vec<f32>) -> Result<(), String> {
    if a.null_count() > 0 {
        return Err("a null value".into());
    }
    match a.data_type() {
        DataType::Float32 => out.extend_from_slice(a.as_primitive::<Float32Type>().values()),
        DataType::Float64 => out.extend(a.as_primitive::<Float64Type>().values().iter().map(|&v| v as f32)),
        DataType::Int64 => out.extend(a.as_primitive::<Int64Type>().values().iter().map(|&v| v as f32)),
        DataType::Int32 => out.extend(a.as_primitive::<Int32Type>().values().iter().map(|&v| v as f32)),
        DataType::FixedSizeList(..) => {
            let l = a.as_fixed_size_list();
            (0..l.len()).try_for_each(|i| flatten(&l.value(i), out))?
        }
        DataType::List(_) => {
            let l = a.as_list::<i32>();
            (0..l.len()).try_for_each(|i| flatten(&l.value(i), out))?
        }
        DataType::LargeList(_) => {
            let l = a.as_list::<i64>();
            (0..l.len()).try_for_each(|i| flatten(&l.value(i), out))?
        }
        t => return Err(format!("values of type {t}")),
    }
    Ok(())
}

/// Statistics of one feature in LeRobot's layout: per value of the last axis for numbers
/// (pooled over the other axes), per color channel (`[3, 1, 1]`, in [0, 1]) for pictures.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStats {
    /// Frames.
    pub count: u64,
    /// `min`, `max`, `mean`, `std`, then each of [`QUANTILES`], one value per channel.
    pub values: Vec<(&'static str, Vec<f64>)>,
    /// Picture statistics (`[3, 1, 1]` nesting).
    pub visual: bool,
}

impl FeatureStats {
    /// The JSON object of stats.json.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (k, v) in &self.values {
            let val = if self.visual {
                serde_json::json!(v.iter().map(|x| [[x]]).collect::<Vec<_>>())
            } else {
                serde_json::json!(v)
            };
            m.insert((*k).into(), val);
            if *k == "std" {
                m.insert("count".into(), serde_json::json!([self.count]));
            }
        }
        serde_json::Value::Object(m)
    }

    /// The statistic named `key`.
    pub fn get(&self, key: &str) -> Option<&[f64]> {
        self.values.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_slice())
    }
}

/// Numeric statistics: mean/std/min/max exact; quantiles exact while the rows fit the
/// accumulator's reservoir (see [`StatsAccumulator`]).
pub fn numeric_stats(acc: &StatsAccumulator, frames: u64) -> FeatureStats {
    let [mean, min, max] = acc.mean_min_max().map(|v| v.to_vec());
    let mut values = vec![("min", min), ("max", max), ("mean", mean), ("std", acc.std())];
    let qs = acc.quantiles(&QUANTILES.map(|(_, q)| q));
    values.extend(QUANTILES.iter().map(|(k, _)| *k).zip(qs));
    FeatureStats { count: frames, values, visual: false }
}

/// Exact per-channel statistics of 8-bit RGB pictures from a histogram of their pixels.
#[derive(Debug, Clone)]
pub struct PixelHistogram {
    hist: [[u64; 256]; 3],
    frames: u64,
}

impl Default for PixelHistogram {
    fn default() -> Self {
        Self { hist: [[0; 256]; 3], frames: 0 }
    }
}

impl PixelHistogram {
    /// Adds one interleaved RGB frame.
    pub fn add_frame(&mut self, rgb: &[u8]) {
        for px in rgb.chunks_exact(3) {
            for (h, &v) in self.hist.iter_mut().zip(px) {
                h[v as usize] += 1;
            }
        }
        self.frames += 1;
    }

    /// Adds another histogram.
    pub fn merge(&mut self, o: &PixelHistogram) {
        for c in 0..3 {
            for v in 0..256 {
                self.hist[c][v] += o.hist[c][v];
            }
        }
        self.frames += o.frames;
    }

    /// The statistics, values scaled to [0, 1]; quantiles interpolate linearly between order
    /// statistics (numpy's default).
    pub fn stats(&self) -> FeatureStats {
        let mut cols: Vec<(&'static str, Vec<f64>)> = ["min", "max", "mean", "std"]
            .iter()
            .chain(QUANTILES.iter().map(|(k, _)| k))
            .map(|k| (*k, Vec::new()))
            .collect();
        for h in &self.hist {
            let n: u64 = h.iter().sum();
            let nf = n.max(1) as f64;
            let mean = h.iter().enumerate().map(|(v, &c)| v as f64 * c as f64).sum::<f64>() / nf;
            let var = h.iter().enumerate().map(|(v, &c)| (v as f64 - mean).powi(2) * c as f64).sum::<f64>() / nf;
            let min = h.iter().position(|&c| c > 0).unwrap_or(0) as f64;
            let max = h.iter().rposition(|&c| c > 0).unwrap_or(0) as f64;
            // The k-th smallest pixel value (0-based).
            let kth = |k: u64| {
                let mut acc = 0;
                for (v, &c) in h.iter().enumerate() {
                    acc += c;
                    if acc > k {
                        return v as f64;
                    }
                }
                max
            };
            let q = |q: f64| {
                if n == 0 {
                    return 0.0;
                }
                let pos = q * (n - 1) as f64;
                let lo = pos.floor() as u64;
                let (a, b) = (kth(lo), kth((lo + 1).min(n - 1)));
                a + (pos - lo as f64) * (b - a)
            };
            let mut vals = vec![min, max, mean, var.sqrt()];
            vals.extend(QUANTILES.iter().map(|(_, p)| q(*p)));
            for (col, v) in cols.iter_mut().zip(vals) {
                col.1.push(v / 255.0);
            }
        }
        FeatureStats { count: self.frames, values: cols, visual: true }
    }
}

/// Appends one episode's statistics as the `stats/<feature>/<stat>` list cells LeRobot keeps in
/// the episodes metadata.
#[derive(Default)]
pub struct EpisodeStatsColumns {
    cols: Vec<(String, StatsColumn)>,
}

enum StatsColumn {
    Count(ListBuilder<Int64Builder>),
    Flat(ListBuilder<Float64Builder>),
    Visual(ListBuilder<ListBuilder<ListBuilder<Float64Builder>>>),
}

impl EpisodeStatsColumns {
    /// Adds one episode's row: `stats` per feature, in the same order for every episode.
    pub fn push(&mut self, stats: &[(String, FeatureStats)]) {
        let first = self.cols.is_empty();
        let mut i = 0;
        for (feat, s) in stats {
            let cells = s
                .values
                .iter()
                .map(|(k, v)| (*k, Some(v)))
                .take(4)
                .chain([("count", None)])
                .chain(s.values.iter().skip(4).map(|(k, v)| (*k, Some(v))));
            for (key, v) in cells {
                if first {
                    let col = match (v, s.visual) {
                        (None, _) => StatsColumn::Count(ListBuilder::new(Int64Builder::new())),
                        (Some(_), false) => StatsColumn::Flat(ListBuilder::new(Float64Builder::new())),
                        (Some(_), true) => StatsColumn::Visual(ListBuilder::new(ListBuilder::new(ListBuilder::new(
                            Float64Builder::new(),
                        )))),
                    };
                    self.cols.push((format!("stats/{feat}/{key}"), col));
                }
                match (&mut self.cols[i].1, v) {
                    (StatsColumn::Count(b), _) => {
                        b.values().append_value(s.count as i64);
                        b.append(true);
                    }
                    (StatsColumn::Flat(b), Some(v)) => {
                        b.values().append_slice(v);
                        b.append(true);
                    }
                    (StatsColumn::Visual(b), Some(v)) => {
                        for x in v {
                            let inner = b.values();
                            inner.values().values().append_value(*x);
                            inner.values().append(true);
                            inner.append(true);
                        }
                        b.append(true);
                    }
                    _ => {}
                }
                i += 1;
            }
        }
    }

    /// The finished columns with their names.
    pub fn finish(self) -> Vec<(String, ArrayRef)> {
        self.cols
            .into_iter()
            .map(|(name, c)| {
                let a: ArrayRef = match c {
                    StatsColumn::Count(mut b) => Arc::new(b.finish()),
                    StatsColumn::Flat(mut b) => Arc::new(b.finish()),
                    StatsColumn::Visual(mut b) => Arc::new(b.finish()),
                };
                (name, a)
            })
            .collect()
    }
}

/// A record batch from named columns (their types give the schema), with schema metadata.
pub fn batch_of(
    cols: Vec<(String, ArrayRef)>,
    metadata: Vec<(String, String)>,
    path: &Path,
) -> Result<RecordBatch, LeRobotError> {
    let fields: Vec<Field> = cols.iter().map(|(n, a)| Field::new(n, a.data_type().clone(), true)).collect();
    let schema = Arc::new(Schema::new(fields).with_metadata(metadata.into_iter().collect()));
    RecordBatch::try_new(schema, cols.into_iter().map(|(_, a)| a).collect())
        .map_err(|e| invalid(path, format!("building columns: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_histogram_quantiles_match_sorted_values() {
        let mut h = PixelHistogram::default();
        let frame: Vec<u8> = (0..30u8).flat_map(|v| [v, 255 - v, 7]).collect();
        h.add_frame(&frame);
        let s = h.stats();
        let mut red: Vec<f64> = (0..30).map(|v| v as f64).collect();
        red.sort_by(f64::total_cmp);
        let q = crate::dataset::stats::quantile_sorted(&red, 0.10) / 255.0;
        assert!((s.get("q10").unwrap()[0] - q).abs() < 1e-12);
        assert!((s.get("mean").unwrap()[0] - 14.5 / 255.0).abs() < 1e-12);
        assert_eq!(s.get("min").unwrap()[2], 7.0 / 255.0);
        assert_eq!(s.get("max").unwrap()[1], 1.0);
    }

    #[test]
    fn features_keep_their_order() {
        let text = r#"{"b": {"dtype": "int64", "shape": [1], "names": null}, "a": {"dtype": "float32", "shape": [2], "names": ["x", "y"]}}"#;
        let f: Features = serde_json::from_str(text).unwrap();
        assert_eq!(f.0.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        assert!(serde_json::to_string(&f).unwrap().starts_with(r#"{"b""#));
    }
}
