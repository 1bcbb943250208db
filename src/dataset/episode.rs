//! The decoded view of one recorded episode that alignment works on, independent of storage.
//!
//! The recorder's MCAP reader implements [`EpisodeSource`] over a file; tests implement it over
//! synthetic streams ([`MemoryEpisode`]). Stamps are nanoseconds: `stamp_ns` from the message
//! header (the time the data describes), `recv_ns` when the recorder received it.

use serde::{Deserialize, Serialize};

/// Episode-level metadata, stored with the recording.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EpisodeMeta {
    /// Unique episode id (also the folder name).
    pub id: String,
    /// Language instruction given to the policy.
    pub instruction: String,
    /// Task name (groups episodes).
    pub task: String,
    /// Who demonstrated.
    pub operator: String,
    /// `success`, `failure`, `aborted`, or empty while recording.
    pub outcome: String,
    /// Wall-clock start and stop, nanoseconds since the Unix epoch.
    pub start_ns: i64,
    /// See `start_ns`; 0 while recording.
    pub stop_ns: i64,
    /// True when the episode was recovered after a crash instead of stopped cleanly.
    pub recovered: bool,
    /// Messages dropped per topic (queue full, invalid input), by topic name.
    pub drops: std::collections::BTreeMap<String, u64>,
    /// Set when the episode was discarded after recording: it no longer trains (its files stay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discarded: Option<Discard>,
}

/// Why and when an episode was discarded.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Discard {
    /// The reason given (may be empty).
    pub reason: String,
    /// When, nanoseconds since the Unix epoch.
    pub time_unix_ns: i64,
}

/// An RGB8 image, row-major, `width * height * 3` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Pixel bytes, RGB interleaved.
    pub data: Vec<u8>,
}

/// A camera message that does not decode to an [`RgbImage`], or a frame that does not encode.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The message bytes are not the type's CDR.
    #[error(transparent)]
    Cdr(#[from] super::cdr::CdrError),
    /// A raw image in an encoding that is not read.
    #[error("unsupported image encoding `{0}` (expected rgb8, bgr8, mono8, rgba8, bgra8)")]
    Encoding(String),
    /// A raw image whose data does not fill its size.
    #[error("image {width}x{height} {encoding} with step {step} needs {need} bytes, has {have}")]
    RawSize {
        /// Columns.
        width: u32,
        /// Rows.
        height: u32,
        /// Pixel encoding.
        encoding: String,
        /// Bytes per row.
        step: u32,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A compressed image that the codec rejects.
    #[error("compressed image ({format}) does not decode: {source}")]
    Compressed {
        /// The message's `format`.
        format: String,
        /// The codec's error.
        source: image::ImageError,
    },
    /// The message type holds no image.
    #[error("{0} is not an image type")]
    NotImage(&'static str),
    /// An [`RgbImage`] whose data does not match its size.
    #[error("frame {width}x{height} has {bytes} bytes; expected width*height*3")]
    FrameSize {
        /// Columns.
        width: u32,
        /// Rows.
        height: u32,
        /// Bytes present.
        bytes: usize,
    },
    /// JPEG encoding failed.
    #[error("JPEG encoding: {0}")]
    Jpeg(#[source] image::ImageError),
}

/// Receive/header stamps of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// Header stamp (time the data describes), ns.
    pub stamp_ns: i64,
    /// Time the recorder received it, ns.
    pub recv_ns: i64,
}

/// A multi-channel sensor stream (tactile/OCT, force): `values[i * channels .. (i+1) * channels]`
/// is the sample at `stamps[i]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SensorSeries {
    /// One stamp per sample.
    pub stamps: Vec<Stamp>,
    /// Channels per sample (1026 for force + A-scan).
    pub channels: usize,
    /// Row-major samples.
    pub values: Vec<f32>,
}

/// A robot state stream: `values[i]` at `stamps[i]`, each of `names.len()` values.
/// Poses are `[x, y, z]` in mm and `[roll, pitch, yaw]` in degrees; joints keep their units.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateSeries {
    /// Name of each value (`x`, `y`, `z`, `roll`, `pitch`, `yaw`, or joint names).
    pub names: Vec<String>,
    /// Which values are angles in degrees (wrapped to (-180, 180] when differenced).
    pub is_angle_deg: Vec<bool>,
    /// One stamp per state.
    pub stamps: Vec<Stamp>,
    /// One vector per state.
    pub values: Vec<Vec<f64>>,
}

/// A failed read from an [`EpisodeSource`]; each names the episode and the stream.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The episode has no stream of that name.
    #[error("episode {episode}: no {kind} stream `{name}`")]
    NoStream {
        /// Episode id.
        episode: String,
        /// `camera` or `sensor`.
        kind: &'static str,
        /// The stream asked for.
        name: String,
    },
    /// A frame index past the camera's last frame.
    #[error("episode {episode}: camera `{camera}` has {frames} frames, asked for {index}")]
    NoFrame {
        /// Episode id.
        episode: String,
        /// Camera stream.
        camera: String,
        /// Frames it has.
        frames: usize,
        /// The index asked for.
        index: usize,
    },
    /// Reading or decoding a message failed.
    #[error("episode {episode}: {what}: {source}")]
    Read {
        /// Episode id.
        episode: String,
        /// The stream and message (e.g. camera `front` (/cam/front) frame 3).
        what: String,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// An episode's decoded non-camera streams: sensors by name, robot state, recorded commands.
#[derive(Debug, Clone, Default)]
pub struct Signals {
    /// Sensor name -> samples.
    pub sensors: Vec<(String, SensorSeries)>,
    /// Robot state.
    pub state: StateSeries,
    /// Recorded commands, if a command topic was configured.
    pub commands: Option<StateSeries>,
}

/// What a damaged recording lost: its readable part is used, the rest is reported here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Damage {
    /// Size of the recording file, bytes.
    pub file_bytes: u64,
    /// Bytes that could not be read (damaged records and an unreadable tail).
    pub bytes_lost: u64,
    /// Chunks read.
    pub chunks_read: u64,
    /// Records (chunks) skipped as damaged.
    pub records_lost: u64,
    /// Usable messages read.
    pub messages_read: u64,
    /// Why, one line per damaged record or cut.
    pub reasons: Vec<String>,
}

/// Read access to one episode's streams, as alignment needs them.
pub trait EpisodeSource {
    /// Metadata.
    fn meta(&self) -> &EpisodeMeta;
    /// Why the episode cannot be read at all (it is then listed as left out); `None` when it can.
    fn unreadable(&self) -> Option<String> {
        None
    }
    /// What the recording lost, when it is damaged but partly readable.
    fn damage(&self) -> Option<Damage> {
        None
    }
    /// Camera stream names, in configured order.
    fn cameras(&self) -> Vec<String>;
    /// Stamps of every frame of `camera`, in recorded order.
    fn camera_stamps(&self, camera: &str) -> Result<Vec<Stamp>, SourceError>;
    /// Decodes frame `index` of `camera` to RGB8.
    fn camera_frame(&self, camera: &str, index: usize) -> Result<RgbImage, SourceError>;
    /// The decoded sensor, state and command streams (read by the three methods below).
    fn signals(&self) -> Result<&Signals, SourceError>;
    /// The sensor stream named `name`.
    fn sensor(&self, name: &str) -> Result<SensorSeries, SourceError> {
        let sensors = &self.signals()?.sensors;
        sensors.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone()).ok_or_else(|| SourceError::NoStream {
            episode: self.meta().id.clone(),
            kind: "sensor",
            name: name.into(),
        })
    }
    /// The robot state stream.
    fn state(&self) -> Result<StateSeries, SourceError> {
        Ok(self.signals()?.state.clone())
    }
    /// Recorded commands, if a command topic was configured (same layout as the state).
    fn commands(&self) -> Result<Option<StateSeries>, SourceError> {
        Ok(self.signals()?.commands.clone())
    }
}

/// A borrowed episode reads as the episode itself.
impl<T: EpisodeSource + ?Sized> EpisodeSource for &T {
    fn meta(&self) -> &EpisodeMeta {
        (**self).meta()
    }
    fn unreadable(&self) -> Option<String> {
        (**self).unreadable()
    }
    fn damage(&self) -> Option<Damage> {
        (**self).damage()
    }
    fn cameras(&self) -> Vec<String> {
        (**self).cameras()
    }
    fn camera_stamps(&self, camera: &str) -> Result<Vec<Stamp>, SourceError> {
        (**self).camera_stamps(camera)
    }
    fn camera_frame(&self, camera: &str, index: usize) -> Result<RgbImage, SourceError> {
        (**self).camera_frame(camera, index)
    }
    fn signals(&self) -> Result<&Signals, SourceError> {
        (**self).signals()
    }
    fn sensor(&self, name: &str) -> Result<SensorSeries, SourceError> {
        (**self).sensor(name)
    }
    fn state(&self) -> Result<StateSeries, SourceError> {
        (**self).state()
    }
    fn commands(&self) -> Result<Option<StateSeries>, SourceError> {
        (**self).commands()
    }
}

/// Opens an episode (again at each call), so that it is held in memory only while it is read.
pub type OpenEpisode<'a> = Box<dyn Fn() -> Box<dyn EpisodeSource + 'a> + 'a>;

/// An episode known by its metadata and opened only while it is read: a compile holds one
/// recording in memory at a time, however many it compiles.
pub struct LazyEpisode<'a> {
    /// Its metadata (the `meta()` of what `open` gives).
    pub meta: EpisodeMeta,
    /// Why it cannot be read, when that is known without opening it.
    pub unreadable: Option<String>,
    /// Opens it.
    pub open: OpenEpisode<'a>,
}

impl<'a> LazyEpisode<'a> {
    /// An episode already open (held in memory).
    pub fn borrowed(src: &'a dyn EpisodeSource) -> Self {
        LazyEpisode { meta: src.meta().clone(), unreadable: src.unreadable(), open: Box::new(move || Box::new(src)) }
    }
}

/// An episode held in memory (synthetic streams in tests, small recordings).
#[derive(Debug, Clone, Default)]
pub struct MemoryEpisode {
    /// Metadata.
    pub meta: EpisodeMeta,
    /// Camera name -> frames with their stamps.
    pub cameras: Vec<(String, Vec<(Stamp, RgbImage)>)>,
    /// Sensors, robot state and recorded commands.
    pub signals: Signals,
}

impl MemoryEpisode {
    fn camera(&self, camera: &str) -> Result<&Vec<(Stamp, RgbImage)>, SourceError> {
        self.cameras.iter().find(|(n, _)| n == camera).map(|(_, f)| f).ok_or_else(|| SourceError::NoStream {
            episode: self.meta.id.clone(),
            kind: "camera",
            name: camera.into(),
        })
    }
}

impl EpisodeSource for MemoryEpisode {
    fn meta(&self) -> &EpisodeMeta {
        &self.meta
    }
    fn cameras(&self) -> Vec<String> {
        self.cameras.iter().map(|(n, _)| n.clone()).collect()
    }
    fn camera_stamps(&self, camera: &str) -> Result<Vec<Stamp>, SourceError> {
        Ok(self.camera(camera)?.iter().map(|(s, _)| *s).collect())
    }
    fn camera_frame(&self, camera: &str, index: usize) -> Result<RgbImage, SourceError> {
        let frames = self.camera(camera)?;
        frames.get(index).map(|(_, i)| i.clone()).ok_or_else(|| SourceError::NoFrame {
            episode: self.meta.id.clone(),
            camera: camera.into(),
            frames: frames.len(),
            index,
        })
    }
    fn signals(&self) -> Result<&Signals, SourceError> {
        Ok(&self.signals)
    }
}

/// An episode that could not be opened: compile lists it as left out with `error`.
#[derive(Debug, Clone)]
pub struct UnreadableEpisode {
    /// Metadata (the id is the folder name).
    pub meta: EpisodeMeta,
    /// Why it cannot be read, naming the file.
    pub error: String,
}

impl UnreadableEpisode {
    /// An unreadable episode `id` and why.
    pub fn new(id: &str, error: String) -> Self {
        Self { meta: EpisodeMeta { id: id.into(), ..Default::default() }, error }
    }

    fn fail<T>(&self) -> Result<T, SourceError> {
        Err(SourceError::Read {
            episode: self.meta.id.clone(),
            what: "the recording".into(),
            source: self.error.clone().into(),
        })
    }
}

impl EpisodeSource for UnreadableEpisode {
    fn meta(&self) -> &EpisodeMeta {
        &self.meta
    }
    fn unreadable(&self) -> Option<String> {
        Some(self.error.clone())
    }
    fn cameras(&self) -> Vec<String> {
        Vec::new()
    }
    fn camera_stamps(&self, _camera: &str) -> Result<Vec<Stamp>, SourceError> {
        self.fail()
    }
    fn camera_frame(&self, _camera: &str, _index: usize) -> Result<RgbImage, SourceError> {
        self.fail()
    }
    fn signals(&self) -> Result<&Signals, SourceError> {
        self.fail()
    }
}
