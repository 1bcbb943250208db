//! A compiled dataset -> a LeRobot v3.0 dataset.
//!
//! Every sample becomes one frame of its episode (episodes in the index's order, frames in
//! sample order):
//!
//! | feature | from |
//! |---|---|
//! | `observation.images.<camera>` | the stored JPEG, embedded as is (`image`), or an mp4 per camera (`video`, ffmpeg) |
//! | `observation.state` | the state, names from the index |
//! | `observation.<sensor>` | the whole `[T, C]` sensor window (float32), `<sensor>` the compile's sensor stream |
//! | `action` | the first step of the action chunk, `[A]` (a per-frame action, as LeRobot policies expect) |
//! | `vla_finetune.action_chunk` | the whole `[H, A]` chunk (LeRobot policies ignore it; the import reads it back) |
//! | `task` | the episode's instruction |
//! | `timestamp` | `frame_index / fps`, as LeRobot's writer sets it (the sample times are kept in our sidecar) |
//!
//! Statistics cover every frame (LeRobot's convention; ours cover the training split):
//! min/max/mean/std exact, quantiles exact up to
//! [`DEFAULT_RESERVOIR_ROWS`](crate::dataset::stats::DEFAULT_RESERVOIR_ROWS) rows per feature
//! (sensor rows are window steps) and from a uniform sample beyond; pictures' statistics are
//! exact, over every pixel of every frame. Data files hold whole episodes (one row group each)
//! and are closed before an episode would take them past `data_files_size_in_mb` (100), with
//! `chunks_size` (1000) files per chunk folder, as LeRobot's writer does; with video, each data file has one mp4 per camera beside it (same chunk and
//! file numbers). The dataset is written into a staging folder and renamed into place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{BinaryBuilder, FixedSizeListBuilder, Float32Builder, ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, Float32Array, Float64Array, Int64Array, RecordBatch, StringArray, StructArray};
use arrow_schema::{Field, Schema};
use parquet::arrow::ArrowWriter;

use super::format::{self, Feature, FeatureStats, Features, Info, PixelHistogram, Sidecar, SidecarEpisode};
use super::video;
use super::LeRobotError;
use crate::dataset::compile::CompileConfig;
use crate::dataset::reader::Dataset;
use crate::dataset::stats::{StatsAccumulator, DEFAULT_RESERVOIR_ROWS};
use crate::dataset::store::{Staging, CONFIG_FILE};

/// The feature holding the whole action chunk.
pub const CHUNK_FEATURE: &str = "vla_finetune.action_chunk";

/// How pictures are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PictureMode {
    /// JPEG files embedded in the data parquet (LeRobot `image` features).
    #[default]
    Images,
    /// One mp4 per camera and data file (LeRobot `video` features); needs ffmpeg.
    Video,
}

/// Export settings.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Replace an existing output folder.
    pub overwrite: bool,
    /// Images or video.
    pub pictures: PictureMode,
    /// `robot_type` of info.json.
    pub robot_type: Option<String>,
    /// The ffmpeg program for video (None: `ffmpeg` on PATH).
    pub ffmpeg: Option<PathBuf>,
    /// Files per chunk folder (LeRobot's `chunks_size`, 1000).
    pub chunks_size: usize,
    /// A data file is closed before an episode would take it to this many MB (LeRobot's
    /// `data_files_size_in_mb`, 100).
    pub data_files_size_in_mb: usize,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            overwrite: false,
            pictures: PictureMode::Images,
            robot_type: None,
            ffmpeg: None,
            chunks_size: format::CHUNKS_SIZE,
            data_files_size_in_mb: format::DATA_FILES_SIZE_MB,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The output folder.
    pub out: PathBuf,
    /// Episodes.
    pub episodes: usize,
    /// Frames.
    pub frames: usize,
    /// Data files.
    pub data_files: usize,
    /// The features written.
    pub features: Features,
}

/// Writes the compiled dataset `dataset` as a LeRobot v3.0 dataset in the new folder `out`;
/// `progress(done, total)` is called after each frame.
pub fn export(
    dataset: &Path,
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExportReport, LeRobotError> {
    if opts.chunks_size == 0 || opts.data_files_size_in_mb == 0 {
        return Err(LeRobotError::Settings("chunks_size and data_files_size_in_mb must be at least 1".into()));
    }
    let video = match opts.pictures {
        PictureMode::Video => {
            let ffmpeg = video::find_ffmpeg(opts.ffmpeg.as_deref())?;
            let enc = video::pick_encoder(&ffmpeg)?;
            Some((ffmpeg, enc))
        }
        PictureMode::Images => None,
    };
    let ds = Dataset::open(dataset)?;
    let staging = Staging::create(out, opts.overwrite)?;
    match write(&ds, dataset, &staging.dir, opts, video.as_ref(), progress) {
        Ok(mut r) => {
            staging.commit()?;
            r.out = out.to_path_buf();
            Ok(r)
        }
        Err(e) => {
            staging.abandon();
            Err(e)
        }
    }
}

/// The sensor stream's name from the dataset's compile.yaml (`sensor` without one).
fn sensor_name(dataset: &Path) -> String {
    CompileConfig::from_yaml_file(&dataset.join(CONFIG_FILE))
        .map(|c| c.align.sensor)
        .unwrap_or_else(|_| "sensor".into())
}

/// The features of an export of `ds`; cameras as `video` features of `codec` at `fps` when given.
pub fn features_of(ds: &Dataset, sensor_feature: &str, video: Option<(&str, u32)>) -> Features {
    let ix = &ds.index;
    let mut f: Vec<(String, Feature)> = ix
        .cameras
        .iter()
        .map(|c| {
            let (dtype, info) = match video {
                Some((codec, fps)) => (
                    "video",
                    Some(serde_json::json!({"video.height": c.height, "video.width": c.width, "video.codec": codec, "video.pix_fmt": "yuv420p",
                        "video.fps": fps, "video.channels": 3, "has_audio": false, "video.g": 2, "video.crf": 23, "is_depth_map": false})),
                ),
                None => ("image", None),
            };
            let feat = Feature { dtype: dtype.into(), shape: vec![c.height as usize, c.width as usize, 3], names: serde_json::json!(["height", "width", "channels"]), info };
            (format!("observation.images.{}", c.name), feat)
        })
        .collect();
    f.push(("observation.state".into(), Feature::f32(vec![ix.state_names.len()], serde_json::json!(ix.state_names))));
    f.push((sensor_feature.into(), Feature::f32(ix.sensor_shape.to_vec(), serde_json::Value::Null)));
    f.push(("action".into(), Feature::f32(vec![ix.action_shape[1]], serde_json::Value::Null)));
    f.push((CHUNK_FEATURE.into(), Feature::f32(ix.action_shape.to_vec(), serde_json::Value::Null)));
    f.push((
        "timestamp".into(),
        Feature { dtype: "float32".into(), shape: vec![1], names: serde_json::Value::Null, info: None },
    ));
    for k in ["frame_index", "episode_index", "index", "task_index"] {
        f.push((
            k.into(),
            Feature { dtype: "int64".into(), shape: vec![1], names: serde_json::Value::Null, info: None },
        ));
    }
    Features(f)
}

/// Statistics accumulators of the numeric features, in feature order after the cameras:
/// state, sensor (rows are window steps), action, chunk (rows are horizon steps), then the
/// five index columns.
struct Accs {
    images: Vec<PixelHistogram>,
    numeric: Vec<StatsAccumulator>,
    frames: u64,
}

impl Accs {
    fn new(ds: &Dataset) -> Self {
        let ix = &ds.index;
        let dims = [ix.state_names.len(), ix.sensor_shape[1], ix.action_shape[1], ix.action_shape[1], 1, 1, 1, 1, 1];
        Self {
            images: vec![PixelHistogram::default(); ix.cameras.len()],
            numeric: dims
                .iter()
                .enumerate()
                .map(|(i, &d)| StatsAccumulator::new(d, DEFAULT_RESERVOIR_ROWS, i as u64))
                .collect(),
            frames: 0,
        }
    }

    fn add(&mut self, rows: [&[f32]; 9]) {
        for (a, r) in self.numeric.iter_mut().zip(rows) {
            a.add_rows(r);
        }
        self.frames += 1;
    }

    fn merge_images(&mut self, o: &Accs) {
        for (a, b) in self.images.iter_mut().zip(&o.images) {
            a.merge(b);
        }
    }

    /// Per feature (the order of [`features_of`]) its statistics.
    fn stats(&self, features: &Features) -> Vec<(String, FeatureStats)> {
        let visual = self.images.iter().map(|h| h.stats());
        let numeric = self.numeric.iter().map(|a| format::numeric_stats(a, self.frames));
        features.0.iter().map(|(k, _)| k.clone()).zip(visual.chain(numeric)).collect()
    }
}

/// Rows of one episode, column by column.
struct Columns {
    images: Vec<(BinaryBuilder, StringBuilder)>,
    state: FixedSizeListBuilder<Float32Builder>,
    sensor: ListBuilder<ListBuilder<Float32Builder>>,
    action: FixedSizeListBuilder<Float32Builder>,
    chunk: ListBuilder<ListBuilder<Float32Builder>>,
    scalars: (Vec<f32>, [Vec<i64>; 4]),
    bytes: usize,
}

impl Columns {
    fn new(ds: &Dataset, images: bool) -> Self {
        let ix = &ds.index;
        let fsl = |n: usize| {
            FixedSizeListBuilder::new(Float32Builder::new(), n as i32).with_field(Arc::new(Field::new(
                "element",
                arrow_schema::DataType::Float32,
                true,
            )))
        };
        let nested = || {
            let inner = ListBuilder::new(Float32Builder::new()).with_field(Arc::new(Field::new(
                "element",
                arrow_schema::DataType::Float32,
                true,
            )));
            let inner_type =
                arrow_schema::DataType::List(Arc::new(Field::new("element", arrow_schema::DataType::Float32, true)));
            ListBuilder::new(inner).with_field(Arc::new(Field::new("element", inner_type, true)))
        };
        Self {
            images: if images {
                ix.cameras.iter().map(|_| (BinaryBuilder::new(), StringBuilder::new())).collect()
            } else {
                Vec::new()
            },
            state: fsl(ix.state_names.len()),
            sensor: nested(),
            action: fsl(ix.action_shape[1]),
            chunk: nested(),
            scalars: (Vec::new(), Default::default()),
            bytes: 0,
        }
    }

    fn push_2d(b: &mut ListBuilder<ListBuilder<Float32Builder>>, v: &[f32], cols: usize) {
        for row in v.chunks(cols.max(1)) {
            b.values().values().append_slice(row);
            b.values().append(true);
        }
        b.append(true);
    }

    fn finish(&mut self, schema: &Arc<Schema>, path: &Path) -> Result<RecordBatch, LeRobotError> {
        let mut cols: Vec<ArrayRef> = Vec::new();
        for (bytes, paths) in &mut self.images {
            let fields = vec![
                Field::new("bytes", arrow_schema::DataType::Binary, true),
                Field::new("path", arrow_schema::DataType::Utf8, true),
            ];
            let arrays: Vec<ArrayRef> = vec![Arc::new(bytes.finish()), Arc::new(paths.finish())];
            cols.push(Arc::new(StructArray::new(fields.into(), arrays, None)));
        }
        cols.push(Arc::new(self.state.finish()));
        cols.push(Arc::new(self.sensor.finish()));
        cols.push(Arc::new(self.action.finish()));
        cols.push(Arc::new(self.chunk.finish()));
        cols.push(Arc::new(Float32Array::from(std::mem::take(&mut self.scalars.0))));
        for v in &mut self.scalars.1 {
            cols.push(Arc::new(Int64Array::from(std::mem::take(v))));
        }
        self.bytes = 0;
        RecordBatch::try_new(schema.clone(), cols)
            .map_err(|e| format::invalid(path, format!("building the frame columns: {e}")))
    }
}

/// The data file being written, and its videos (one per camera) in video mode.
struct DataFile {
    writer: ArrowWriter<std::fs::File>,
    path: PathBuf,
    chunk: usize,
    file: usize,
    bytes: usize,
    videos: Vec<video::VideoFile>,
}

/// Rows buffered before they are handed to the parquet writer.
const BATCH_BYTES: usize = 32 << 20;

fn write(
    ds: &Dataset,
    src: &Path,
    dir: &Path,
    opts: &ExportOptions,
    video: Option<&(PathBuf, video::Encoder)>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExportReport, LeRobotError> {
    let ix = &ds.index;
    let fps = ix.control_hz.round();
    if (ix.control_hz - fps).abs() > 1e-6 || fps < 1.0 {
        return Err(format::invalid(
            &src.join(crate::dataset::store::INDEX_FILE),
            format!("control_hz {} is not a whole number; LeRobot needs an integer fps", ix.control_hz),
        ));
    }
    let sensor = sensor_name(src);
    let sensor_feature = format!("observation.{sensor}");
    if sensor == "state" || sensor.starts_with("images.") {
        return Err(LeRobotError::Settings(format!("the sensor stream `{sensor}` would be exported as `{sensor_feature}`, which LeRobot uses for other data; rename it")));
    }
    let features = features_of(ds, &sensor_feature, video.map(|(_, e)| (e.codec, fps as u32)));
    let mut w = Writer {
        ds,
        dir,
        opts,
        video,
        fps,
        schema: format::data_schema(&features)?,
        features,
        tasks: Vec::new(),
        global: Accs::new(ds),
        ep_stats: format::EpisodeStatsColumns::default(),
        ep_rows: EpisodeRows::default(),
        sidecar: Sidecar {
            format: format::SIDECAR_FORMAT.into(),
            control_hz: ix.control_hz,
            sensor,
            sensor_feature,
            action_chunk_feature: CHUNK_FEATURE.into(),
            episodes: Vec::new(),
        },
        data: None,
        data_files: 0,
        done: 0,
        index: 0,
    };
    // Episodes in index order with their samples in stored order.
    let mut by_episode: Vec<Vec<usize>> = vec![Vec::new(); ix.episodes.len()];
    for (i, s) in ix.samples.iter().enumerate() {
        by_episode[s.episode].push(i);
    }
    for (e, samples) in by_episode.iter().enumerate().filter(|(_, s)| !s.is_empty()) {
        w.episode(e, samples, progress)?;
    }
    w.finish()
}

/// An export in progress: its settings and what it has accumulated over the episodes so far.
struct Writer<'a> {
    ds: &'a Dataset,
    dir: &'a Path,
    opts: &'a ExportOptions,
    video: Option<&'a (PathBuf, video::Encoder)>,
    fps: f64,
    schema: Arc<arrow_schema::Schema>,
    features: Features,
    tasks: Vec<String>,
    global: Accs,
    ep_stats: format::EpisodeStatsColumns,
    ep_rows: EpisodeRows,
    sidecar: Sidecar,
    data: Option<DataFile>,
    data_files: usize,
    /// Frames written.
    done: usize,
    /// The next frame's global index.
    index: i64,
}

impl Writer<'_> {
    /// Writes episode `e` (its samples `samples`): data rows, videos, statistics, episode row.
    fn episode(
        &mut self,
        e: usize,
        samples: &[usize],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(), LeRobotError> {
        let (ds, fps) = (self.ds, self.fps);
        let entry = &ds.index.episodes[e];
        let episode_index = self.sidecar.episodes.len() as i64;
        let task_index = match self.tasks.iter().position(|t| *t == entry.instruction) {
            Some(p) => p,
            None => {
                self.tasks.push(entry.instruction.clone());
                self.tasks.len() - 1
            }
        };
        let row_bytes = samples.first().map_or(0, |&i| frame_bytes(ds, i, self.video.is_none()));
        let ep_bytes = row_bytes * samples.len();
        let mut df = self.data_file_for(ep_bytes)?;
        let mut acc = Accs::new(ds);
        let mut cols = Columns::new(ds, self.video.is_none());
        let video_from: Vec<usize> = df.videos.iter().map(|v| v.frames).collect();
        let mut t_ns = Vec::with_capacity(samples.len());
        let from = self.index;
        for (frame, &i) in samples.iter().enumerate() {
            let ints = [frame as i64, episode_index, self.index, task_index as i64];
            t_ns.push(self.sample(i, ints, &mut df, &mut cols, &mut acc)?);
            self.index += 1;
            if cols.bytes >= BATCH_BYTES {
                let batch = cols.finish(&self.schema, &df.path)?;
                df.writer.write(&batch).map_err(|e| format::invalid(&df.path, format!("writing parquet: {e}")))?;
            }
            self.done += 1;
            progress(self.done, ds.len());
        }
        let batch = cols.finish(&self.schema, &df.path)?;
        df.writer.write(&batch).map_err(|e| format::invalid(&df.path, format!("writing parquet: {e}")))?;
        // One row group per episode.
        df.writer.flush().map_err(|e| format::invalid(&df.path, format!("writing parquet: {e}")))?;
        df.bytes += ep_bytes;
        self.global.merge_images(&acc);
        self.ep_stats.push(&acc.stats(&self.features));
        let rows = &mut self.ep_rows;
        rows.episode.push(episode_index);
        rows.task.push(entry.instruction.clone());
        rows.length.push(samples.len() as i64);
        for (v, x) in rows.data.iter_mut().zip([df.chunk as i64, df.file as i64, from, self.index]) {
            v.push(x);
        }
        rows.videos.resize_with(df.videos.len(), Default::default);
        for ((cols, v), start) in rows.videos.iter_mut().zip(&df.videos).zip(&video_from) {
            cols.chunk.push(df.chunk as i64);
            cols.file.push(df.file as i64);
            cols.from.push(*start as f64 / fps);
            cols.to.push(v.frames as f64 / fps);
        }
        self.data = Some(df);
        self.sidecar.episodes.push(SidecarEpisode {
            id: entry.id.clone(),
            task: entry.task.clone(),
            outcome: entry.outcome.clone(),
            split: entry.split,
            t_ns,
        });
        Ok(())
    }

    /// The data file an episode of `ep_bytes` goes to: the current one, or a new one when this
    /// episode would take the current one past the size limit (as LeRobot does).
    fn data_file_for(&mut self, ep_bytes: usize) -> Result<DataFile, LeRobotError> {
        let limit = self.opts.data_files_size_in_mb << 20;
        match self.data.take() {
            Some(d) if d.bytes == 0 || d.bytes + ep_bytes < limit => return Ok(d),
            Some(d) => close(d)?,
            None => {}
        }
        let next = if self.data_files == 0 { (0, 0) } else { next_file(self.data_files - 1, self.opts.chunks_size) };
        let path = self.dir.join(format::chunk_file("data", next.0, next.1, "parquet"));
        let mut videos = Vec::new();
        if let Some((ffmpeg, enc)) = self.video {
            for cam in &self.ds.index.cameras {
                let key = format!("videos/observation.images.{}", cam.name);
                let p = self.dir.join(format::chunk_file(&key, next.0, next.1, "mp4"));
                videos.push(video::VideoFile::create(ffmpeg, *enc, &p, cam.width, cam.height, self.fps as u32)?);
            }
        }
        self.data_files += 1;
        let writer = format::create_writer(&path, self.schema.clone())?;
        Ok(DataFile { writer, path, chunk: next.0, file: next.1, bytes: 0, videos })
    }

    /// Appends sample `i` (frame, episode, global and task indices `ints`) to the columns, the
    /// videos and the statistics; returns its time stamp.
    fn sample(
        &mut self,
        i: usize,
        ints: [i64; 4],
        df: &mut DataFile,
        cols: &mut Columns,
        acc: &mut Accs,
    ) -> Result<i64, LeRobotError> {
        let ds = self.ds;
        let (a, c) = (ds.index.action_shape[1], ds.index.sensor_shape[1]);
        let frame = ints[0];
        let s = ds.sample(i)?;
        for (cam, img) in s.images.iter().enumerate() {
            acc.images[cam].add_frame(&img.data);
            match df.videos.get_mut(cam) {
                Some(v) => v.push(&img.data)?,
                None => {
                    let jpeg = ds.jpeg(i, cam)?;
                    cols.images[cam].0.append_value(jpeg);
                    cols.images[cam].1.append_value(format!("frame-{frame:06}.jpg"));
                    cols.bytes += jpeg.len();
                }
            }
        }
        cols.state.values().append_slice(&s.state);
        cols.state.append(true);
        Columns::push_2d(&mut cols.sensor, &s.sensor, c);
        cols.action.values().append_slice(&s.action[..a]);
        cols.action.append(true);
        Columns::push_2d(&mut cols.chunk, &s.action, a);
        let ts = (frame as f64 / self.fps) as f32;
        cols.scalars.0.push(ts);
        for (v, x) in cols.scalars.1.iter_mut().zip(ints) {
            v.push(x);
        }
        cols.bytes += (s.state.len() + s.sensor.len() + s.action.len() + a) * 4 + 36;
        let intf = ints.map(|x| x as f32);
        let row: [&[f32]; 9] =
            [&s.state, &s.sensor, &s.action[..a], &s.action, &[ts], &intf[0..1], &intf[1..2], &intf[2..3], &intf[3..4]];
        acc.add(row);
        self.global.add(row);
        Ok(s.t_ns)
    }

    /// Closes the last data file and writes the metadata: episodes, tasks, statistics, info and
    /// our sidecar.
    fn finish(mut self) -> Result<ExportReport, LeRobotError> {
        if let Some(d) = self.data.take() {
            close(d)?;
        }
        let (dir, ix) = (self.dir, &self.ds.index);
        let video_keys: Vec<String> = match self.video {
            Some(_) => ix.cameras.iter().map(|c| format!("observation.images.{}", c.name)).collect(),
            None => Vec::new(),
        };
        write_episodes(dir, self.ep_rows, &video_keys, self.ep_stats)?;
        write_tasks(dir, &self.tasks)?;
        let stats = self.global.stats(&self.features);
        let stats_json: serde_json::Map<String, serde_json::Value> =
            stats.iter().map(|(k, s)| (k.clone(), s.to_json())).collect();
        write_json(&dir.join(format::STATS_PATH), &serde_json::Value::Object(stats_json))?;
        let episodes = self.sidecar.episodes.len();
        let info = Info {
            codebase_version: format::CODEBASE_VERSION.into(),
            fps: self.fps as u32,
            features: self.features.clone(),
            total_episodes: episodes,
            total_frames: self.index as usize,
            total_tasks: self.tasks.len(),
            chunks_size: self.opts.chunks_size,
            data_files_size_in_mb: self.opts.data_files_size_in_mb,
            video_files_size_in_mb: format::VIDEO_FILES_SIZE_MB,
            data_path: format::DATA_PATH.into(),
            video_path: self.video.map(|_| format::VIDEO_PATH.to_string()),
            robot_type: self.opts.robot_type.clone(),
            splits: [("train".to_string(), format!("0:{episodes}"))].into_iter().collect(),
        };
        write_json(&dir.join(format::INFO_PATH), &info)?;
        write_json(&dir.join(format::SIDECAR_PATH), &self.sidecar)?;
        Ok(ExportReport {
            out: dir.to_path_buf(),
            episodes,
            frames: self.index as usize,
            data_files: self.data_files,
            features: self.features,
        })
    }
}

/// Bytes of one frame of sample `i` in the data file (JPEG sizes with `images`, plus the
/// numbers), to size files.
fn frame_bytes(ds: &Dataset, i: usize, images: bool) -> usize {
    let ix = &ds.index;
    let jpegs: usize =
        if images { (0..ix.cameras.len()).filter_map(|c| ds.jpeg(i, c).ok()).map(|j| j.len()).sum() } else { 0 };
    jpegs
        + (ix.state_names.len()
            + ix.sensor_shape[0] * ix.sensor_shape[1]
            + ix.action_shape[0] * ix.action_shape[1]
            + ix.action_shape[1])
            * 4
        + 36
}

/// The (chunk, file) after the `n`-th file (0-based) of a chunked folder.
fn next_file(n: usize, chunks_size: usize) -> (usize, usize) {
    let n = n + 1;
    (n / chunks_size, n % chunks_size)
}

fn close(d: DataFile) -> Result<(), LeRobotError> {
    for v in d.videos {
        v.finish()?;
    }
    let f = d.writer.into_inner().map_err(|e| format::invalid(&d.path, format!("closing parquet: {e}")))?;
    f.sync_all().map_err(|source| LeRobotError::Io { path: d.path.clone(), source })
}

fn write_json<T: serde::Serialize>(path: &Path, v: &T) -> Result<(), LeRobotError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| LeRobotError::Io { path: dir.to_path_buf(), source })?;
    }
    let mut bytes = serde_json::to_vec_pretty(v).map_err(|e| format::invalid(path, format!("serializing: {e}")))?;
    bytes.push(b'\n');
    crate::dataset::store::write_synced(path, &bytes)?;
    Ok(())
}

/// The columns of `meta/episodes` besides the statistics.
#[derive(Default)]
struct EpisodeRows {
    episode: Vec<i64>,
    task: Vec<String>,
    length: Vec<i64>,
    /// data chunk, data file, first and end frame index.
    data: [Vec<i64>; 4],
    /// Per camera in video mode.
    videos: Vec<VideoColumns>,
}

/// Where each episode is in one camera's videos.
#[derive(Default)]
struct VideoColumns {
    chunk: Vec<i64>,
    file: Vec<i64>,
    from: Vec<f64>,
    to: Vec<f64>,
}

/// `meta/episodes/chunk-000/file-000.parquet`: one row per episode, LeRobot's columns.
fn write_episodes(
    dir: &Path,
    rows: EpisodeRows,
    video_keys: &[String],
    stats: format::EpisodeStatsColumns,
) -> Result<(), LeRobotError> {
    let path = dir.join(format::chunk_file(format::EPISODES_DIR, 0, 0, "parquet"));
    let n = rows.episode.len();
    let mut tasks = ListBuilder::new(StringBuilder::new()).with_field(Arc::new(Field::new(
        "element",
        arrow_schema::DataType::Utf8,
        true,
    )));
    for t in &rows.task {
        tasks.values().append_value(t);
        tasks.append(true);
    }
    let [chunk, file, from, to] = rows.data;
    let mut cols: Vec<(String, ArrayRef)> = vec![
        ("episode_index".into(), Arc::new(Int64Array::from(rows.episode))),
        ("tasks".into(), Arc::new(tasks.finish())),
        ("length".into(), Arc::new(Int64Array::from(rows.length))),
        ("data/chunk_index".into(), Arc::new(Int64Array::from(chunk))),
        ("data/file_index".into(), Arc::new(Int64Array::from(file))),
        ("dataset_from_index".into(), Arc::new(Int64Array::from(from))),
        ("dataset_to_index".into(), Arc::new(Int64Array::from(to))),
    ];
    for (key, v) in video_keys.iter().zip(rows.videos) {
        cols.push((format!("videos/{key}/chunk_index"), Arc::new(Int64Array::from(v.chunk))));
        cols.push((format!("videos/{key}/file_index"), Arc::new(Int64Array::from(v.file))));
        cols.push((format!("videos/{key}/from_timestamp"), Arc::new(Float64Array::from(v.from))));
        cols.push((format!("videos/{key}/to_timestamp"), Arc::new(Float64Array::from(v.to))));
    }
    cols.extend(stats.finish());
    cols.push(("meta/episodes/chunk_index".into(), Arc::new(Int64Array::from(vec![0i64; n]))));
    cols.push(("meta/episodes/file_index".into(), Arc::new(Int64Array::from(vec![0i64; n]))));
    format::write_parquet(&path, &format::batch_of(cols, Vec::new(), &path)?)
}

/// `meta/tasks.parquet`: `task_index` and `task`, the task being the pandas index (LeRobot
/// reads it with pandas and looks tasks up by index).
fn write_tasks(dir: &Path, tasks: &[String]) -> Result<(), LeRobotError> {
    let path = dir.join(format::TASKS_PATH);
    let pandas = serde_json::json!({
        "index_columns": ["task"],
        "column_indexes": [{"name": null, "field_name": null, "pandas_type": "unicode", "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64", "metadata": null},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": null}
        ],
        "attributes": {},
        "creator": {"library": "vla_finetune", "version": env!("CARGO_PKG_VERSION")},
        "pandas_version": "2.2.0"
    });
    let cols: Vec<(String, ArrayRef)> = vec![
        ("task_index".into(), Arc::new(Int64Array::from((0..tasks.len() as i64).collect::<Vec<_>>()))),
        ("task".into(), Arc::new(StringArray::from(tasks.to_vec()))),
    ];
    format::write_parquet(&path, &format::batch_of(cols, vec![("pandas".into(), pandas.to_string())], &path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_roll_over_into_the_next_chunk_folder() {
        assert_eq!(next_file(0, 1000), (0, 1));
        assert_eq!(next_file(998, 1000), (0, 999));
        assert_eq!(next_file(999, 1000), (1, 0));
        assert_eq!(next_file(2, 2), (1, 1));
    }
}
