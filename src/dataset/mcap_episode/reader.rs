//! [`McapEpisode`]: a recorded episode read back as an [`EpisodeSource`](crate::dataset::episode::EpisodeSource).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mcap::records::Record;

use crate::dataset::cdr::{self, MsgType, RosMessage};
use crate::dataset::episode::{
    Damage, EpisodeMeta, EpisodeSource, RgbImage, SensorSeries, Signals, SourceError, Stamp, StateSeries,
};
use crate::dataset::streams::{Role, StreamConfig, StreamSpec};

use super::camera::check_camera_message;
use super::scan::decode_chunk;
use super::*;

/// Where a camera frame lives in the file.
#[derive(Debug, Clone, Copy)]
struct FrameRef {
    stamp: Stamp,
    chunk: Option<usize>,
    ordinal: usize,
}

/// A message met while indexing: topic, type, header stamp, chunk (if any), ordinal, CDR bytes.
type IndexedMessage = (String, MsgType, Stamp, Option<usize>, usize, Vec<u8>);

/// A recorded episode read back from disk.
pub struct McapEpisode {
    dir: PathBuf,
    mcap_path: PathBuf,
    meta: EpisodeMeta,
    streams: StreamConfig,
    /// The whole MCAP file, read into memory: a map would turn a file truncated under the reader
    /// into SIGBUS.
    map: Vec<u8>,
    chunk_offsets: Vec<usize>,
    frames: Vec<(StreamSpec, Vec<FrameRef>)>,
    signals: Signals,
    skipped: BTreeMap<String, BTreeMap<String, u64>>,
    counts: BTreeMap<String, u64>,
    scan: ScanEnd,
    /// The last decompressed chunk: (chunk index, message payloads in order).
    cache: Mutex<Option<(usize, Vec<Vec<u8>>)>>,
}

impl McapEpisode {
    /// Opens `<dir>` (an episode folder) and indexes every stream of its mapping. Messages that
    /// cannot be used (undecodable, wrong channel count, non-finite sensor values, step/size
    /// mismatch, stamps not increasing) are skipped and counted per topic and reason in
    /// [`McapEpisode::skipped`]. A file truncated by a crash is read up to its last good chunk
    /// ([`McapEpisode::complete`] is then false); a damaged chunk is skipped; both are reported by
    /// [`EpisodeSource::damage`]. The file is read into memory, not mapped.
    pub fn open(dir: &Path) -> Result<McapEpisode, EpisodeError> {
        let meta = read_episode_json(dir)?;
        let sp = dir.join(STREAMS_YAML);
        let streams =
            StreamConfig::load(&sp).map_err(|e| EpisodeError::Meta { path: sp.clone(), message: e.to_string() })?;
        let mcap_path = dir.join(mcap_file_name(&meta.id));
        let map = std::fs::read(&mcap_path).map_err(io_err(&mcap_path))?;
        let mut ep = McapEpisode {
            dir: dir.to_path_buf(),
            mcap_path,
            meta,
            streams: streams.clone(),
            map,
            chunk_offsets: Vec::new(),
            frames: streams.cameras.iter().map(|c| (c.clone(), Vec::new())).collect(),
            signals: Signals {
                sensors: streams
                    .sensors
                    .iter()
                    .map(|s| (s.name.clone(), SensorSeries { channels: s.channels.unwrap_or(0), ..Default::default() }))
                    .collect(),
                state: StateSeries::default(),
                commands: streams.command.as_ref().map(|_| StateSeries::default()),
            },
            skipped: BTreeMap::new(),
            counts: BTreeMap::new(),
            scan: ScanEnd::default(),
            cache: Mutex::new(None),
        };
        ep.index()?;
        Ok(ep)
    }

    fn index(&mut self) -> Result<(), EpisodeError> {
        let map: &[u8] = &self.map;
        let mut channels = HashMap::new();
        let mut msgs: Vec<IndexedMessage> = Vec::new();
        let mut skipped: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let mut skip = |topic: &str, reason: &str| {
            *skipped.entry(topic.to_string()).or_default().entry(reason.to_string()).or_default() += 1
        };
        let roles: HashMap<String, (Role, MsgType)> =
            self.streams.all().into_iter().map(|(r, s)| (s.topic.clone(), (r, s.kind()))).collect();
        let scan = scan_mcap(map, &mut channels, |chs, m| {
            let Some(ch) = chs.get(&m.channel) else { return };
            let Some(&(role, t)) = roles.get(&ch.topic) else { return };
            if MsgType::parse(&ch.type_name).ok() != Some(t) {
                skip(&ch.topic, "type_mismatch");
                return;
            }
            let stamp_ns = match t.header_stamp(&m.data) {
                Ok(Some(s)) => s,
                Ok(None) => m.log_time as i64,
                Err(_) => {
                    skip(&ch.topic, "decode_error");
                    return;
                }
            };
            let stamp = Stamp { stamp_ns, recv_ns: m.log_time as i64 };
            // Camera payloads stay in the file; the rest is decoded now.
            if role == Role::Camera {
                if let Err(reason) = check_camera_message(t, &m.data) {
                    skip(&ch.topic, reason);
                    return;
                }
            }
            let data = if role == Role::Camera { Vec::new() } else { m.data.into_owned() };
            msgs.push((ch.topic.clone(), t, stamp, m.chunk, m.ordinal, data));
        });
        if scan.chunks == 0 && (!scan.complete || !scan.lost.is_empty()) {
            let why = scan.lost.iter().chain(&scan.stopped).cloned().collect::<Vec<_>>().join("; ");
            return Err(EpisodeError::Corrupt {
                path: self.mcap_path.clone(),
                message: format!("no readable chunk: {}", if why.is_empty() { "no data" } else { &why }),
            });
        }
        let mut last_stamp: HashMap<String, i64> = HashMap::new();
        for (topic, t, stamp, chunk, ordinal, data) in msgs {
            if let Some(prev) = last_stamp.get(&topic) {
                if stamp.stamp_ns <= *prev {
                    skip(&topic, "non_monotonic_stamp");
                    continue;
                }
            }
            let (role, spec) = self.streams.find_topic(&topic).expect("filtered above");
            let ok = match role {
                Role::Camera => {
                    let f = self.frames.iter_mut().find(|(s, _)| s.topic == topic).expect("camera in mapping");
                    f.1.push(FrameRef { stamp, chunk, ordinal });
                    Ok(())
                }
                Role::Sensor => {
                    let s = self.signals.sensors.iter_mut().find(|(n, _)| *n == spec.name).expect("sensor in mapping");
                    push_sensor(&mut s.1, t, spec.channels, stamp, &data)
                }
                Role::State => push_state(&mut self.signals.state, t, stamp, &data),
                Role::Command => {
                    push_state(self.signals.commands.as_mut().expect("command configured"), t, stamp, &data)
                }
            };
            match ok {
                Ok(()) => {
                    last_stamp.insert(topic.clone(), stamp.stamp_ns);
                    *self.counts.entry(topic).or_default() += 1;
                }
                Err(reason) => skip(&topic, reason),
            }
        }
        self.skipped = skipped;
        self.chunk_offsets = scan.chunk_offsets.clone();
        self.scan = scan;
        Ok(())
    }

    /// The episode folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The stream mapping the episode was recorded with.
    pub fn streams(&self) -> &StreamConfig {
        &self.streams
    }

    /// Messages skipped while indexing, by topic then reason.
    pub fn skipped(&self) -> &BTreeMap<String, BTreeMap<String, u64>> {
        &self.skipped
    }

    /// Usable messages per topic.
    pub fn counts(&self) -> &BTreeMap<String, u64> {
        &self.counts
    }

    /// True when the MCAP data section is complete (not a truncated file).
    pub fn complete(&self) -> bool {
        self.scan.complete
    }

    fn chunk_messages(&self, chunk: usize) -> Result<Vec<Vec<u8>>, EpisodeError> {
        let off = self.chunk_offsets[chunk];
        let buf: &[u8] = &self.map;
        let len = u64::from_le_bytes(buf[off + 1..off + 9].try_into().expect("8 bytes")) as usize;
        let corrupt = |message: String| EpisodeError::Corrupt { path: self.mcap_path.clone(), message };
        let Record::Chunk { header, data } =
            mcap::read::parse_record(buf[off], &buf[off + 9..off + 9 + len]).map_err(|e| corrupt(e.to_string()))?
        else {
            return Err(corrupt(format!("no chunk at byte {off}")));
        };
        let records = decode_chunk(&header, &data).map_err(corrupt)?;
        Ok(records
            .into_iter()
            .filter_map(|r| if let Record::Message { data, .. } = r { Some(data.into_owned()) } else { None })
            .collect())
    }

    fn raw_message(&self, f: &FrameRef) -> Result<Vec<u8>, EpisodeError> {
        match f.chunk {
            Some(c) => {
                let mut cache = self.cache.lock().expect("cache lock");
                if cache.as_ref().map(|(i, _)| *i) != Some(c) {
                    *cache = Some((c, self.chunk_messages(c)?));
                }
                let msgs = &cache.as_ref().expect("filled").1;
                msgs.get(f.ordinal).cloned().ok_or_else(|| EpisodeError::Corrupt {
                    path: self.mcap_path.clone(),
                    message: format!("chunk {c} has no message {}", f.ordinal),
                })
            }
            None => {
                let mut found = None;
                let mut chs = HashMap::new();
                scan_mcap(&self.map, &mut chs, |_, m| {
                    if m.chunk.is_none() && m.ordinal == f.ordinal {
                        found = Some(m.data.into_owned());
                    }
                });
                found.ok_or_else(|| EpisodeError::Corrupt {
                    path: self.mcap_path.clone(),
                    message: format!("unchunked message {} vanished", f.ordinal),
                })
            }
        }
    }
}

fn push_sensor(
    s: &mut SensorSeries,
    t: MsgType,
    expected: Option<usize>,
    stamp: Stamp,
    data: &[u8],
) -> Result<(), &'static str> {
    let values: Vec<f32> = match t {
        MsgType::SensorFrame => {
            let f = cdr::SensorFrame::decode(data).map_err(|_| "decode_error")?;
            if f.values.len() != f.channels as usize {
                return Err("channel_mismatch");
            }
            f.values
        }
        MsgType::Float32MultiArray => cdr::Float32MultiArray::decode(data).map_err(|_| "decode_error")?.data,
        MsgType::WrenchStamped => {
            let w = cdr::WrenchStamped::decode(data).map_err(|_| "decode_error")?;
            w.force.iter().chain(w.torque.iter()).map(|&v| v as f32).collect()
        }
        _ => return Err("type_mismatch"),
    };
    let want = expected.unwrap_or(if s.stamps.is_empty() { values.len() } else { s.channels });
    if values.len() != want || values.is_empty() {
        return Err("channel_mismatch");
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err("non_finite");
    }
    s.channels = want;
    s.stamps.push(stamp);
    s.values.extend_from_slice(&values);
    Ok(())
}

/// State value names of a `geometry_msgs/PoseStamped` stream (position in mm, angles in degrees).
pub const POSE_STATE_NAMES: [&str; 6] = ["x", "y", "z", "roll", "pitch", "yaw"];
/// Units of [`POSE_STATE_NAMES`].
pub const POSE_STATE_UNITS: [&str; 6] = ["mm", "mm", "mm", "deg", "deg", "deg"];

/// Converts a quaternion `[x, y, z, w]` to roll, pitch, yaw in degrees (ZYX convention).
pub fn quaternion_to_rpy_deg(q: [f64; 4]) -> [f64; 3] {
    let uq = nalgebra::UnitQuaternion::from_quaternion(nalgebra::Quaternion::new(q[3], q[0], q[1], q[2]));
    let (r, p, y) = uq.euler_angles();
    [r.to_degrees(), p.to_degrees(), y.to_degrees()]
}

fn push_state(s: &mut StateSeries, t: MsgType, stamp: Stamp, data: &[u8]) -> Result<(), &'static str> {
    let (names, angles, values): (Vec<String>, Vec<bool>, Vec<f64>) = match t {
        MsgType::PoseStamped => {
            let p = cdr::PoseStamped::decode(data).map_err(|_| "decode_error")?;
            let n = p.orientation.iter().map(|v| v * v).sum::<f64>().sqrt();
            if !(n > 0.5 && n < 1.5) {
                return Err("invalid_quaternion");
            }
            let rpy = quaternion_to_rpy_deg(p.orientation);
            (
                POSE_STATE_NAMES.iter().map(|s| s.to_string()).collect(),
                vec![false, false, false, true, true, true],
                vec![p.position[0] * 1000.0, p.position[1] * 1000.0, p.position[2] * 1000.0, rpy[0], rpy[1], rpy[2]],
            )
        }
        MsgType::JointState => {
            let j = cdr::JointState::decode(data).map_err(|_| "decode_error")?;
            if j.position.len() != j.name.len() {
                return Err("channel_mismatch");
            }
            let n = j.name.len();
            (j.name, vec![false; n], j.position)
        }
        _ => return Err("type_mismatch"),
    };
    if values.iter().any(|v| !v.is_finite()) {
        return Err("non_finite");
    }
    if s.stamps.is_empty() {
        s.names = names;
        s.is_angle_deg = angles;
    } else if s.names != names {
        return Err("channel_mismatch");
    }
    s.stamps.push(stamp);
    s.values.push(values);
    Ok(())
}

impl McapEpisode {
    /// The camera stream named `camera` with its frame references.
    fn camera_stream(&self, camera: &str) -> Result<&(StreamSpec, Vec<FrameRef>), SourceError> {
        self.frames.iter().find(|(s, _)| s.name == camera).ok_or_else(|| SourceError::NoStream {
            episode: self.meta.id.clone(),
            kind: "camera",
            name: camera.into(),
        })
    }

    /// What the file lost: damaged records skipped, a truncated tail, a missing footer.
    fn file_damage(&self) -> Option<Damage> {
        let s = &self.scan;
        let footer = self.map.len() >= 16 && self.map.ends_with(MCAP_MAGIC);
        if s.complete && s.lost.is_empty() && footer {
            return None;
        }
        let tail = if s.complete { 0 } else { self.map.len() - s.end_offset };
        let mut reasons = s.lost.clone();
        reasons.extend(s.stopped.iter().map(|w| format!("{w}; the rest of the file is unreadable")));
        if s.complete && !footer {
            reasons.push("the file has no footer (cut after its data section); no message lost".into());
        }
        Some(Damage {
            file_bytes: self.map.len() as u64,
            bytes_lost: (s.lost_bytes + tail) as u64,
            chunks_read: s.chunks as u64,
            records_lost: s.lost.len() as u64,
            messages_read: self.counts.values().sum(),
            reasons,
        })
    }
}

impl EpisodeSource for McapEpisode {
    fn meta(&self) -> &EpisodeMeta {
        &self.meta
    }
    fn damage(&self) -> Option<Damage> {
        self.file_damage()
    }
    fn cameras(&self) -> Vec<String> {
        self.frames.iter().map(|(s, _)| s.name.clone()).collect()
    }
    fn camera_stamps(&self, camera: &str) -> Result<Vec<Stamp>, SourceError> {
        let (_, f) = self.camera_stream(camera)?;
        Ok(f.iter().map(|r| r.stamp).collect())
    }
    fn camera_frame(&self, camera: &str, index: usize) -> Result<RgbImage, SourceError> {
        let (spec, f) = self.camera_stream(camera)?;
        let episode = || self.meta.id.clone();
        let r = f.get(index).ok_or_else(|| SourceError::NoFrame {
            episode: episode(),
            camera: camera.into(),
            frames: f.len(),
            index,
        })?;
        let what = || format!("camera `{camera}` ({}) frame {index}", spec.topic);
        let raw = self.raw_message(r).map_err(|e| SourceError::Read {
            episode: episode(),
            what: what(),
            source: Box::new(e),
        })?;
        decode_image(spec.kind(), &raw).map_err(|e| SourceError::Read {
            episode: episode(),
            what: what(),
            source: Box::new(e),
        })
    }
    fn signals(&self) -> Result<&Signals, SourceError> {
        Ok(&self.signals)
    }
}
