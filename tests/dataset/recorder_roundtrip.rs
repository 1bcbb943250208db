//! Records simulated episodes through the recorder core and reads them back three ways: our
//! `McapEpisode` reader, the Python `rosbags` rosbag2 reader (independent CDR deserializer) and
//! the Python `mcap` reader. Values are compared against the simulator's own messages.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use vla_finetune::dataset::cdr::{Image, PoseStamped, RosMessage, SensorFrame};
use vla_finetune::dataset::episode::EpisodeSource;
use vla_finetune::dataset::mcap_episode::{quaternion_to_rpy_deg, McapEpisode, WriterOptions};
use vla_finetune::dataset::recorder::{EpisodeInfo, PushOutcome, Recorder, RecorderConfig};
use vla_finetune::sim::{SimConfig, SimMessage, POSE_TOPIC, SENSOR_TOPIC};

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
const START_NS: i64 = 1_700_000_000_000_000_000;

fn small_sim() -> SimConfig {
    SimConfig { seed: 11, cameras: 2, width: 32, height: 24, camera_hz: 10.0, ..Default::default() }
}

/// A recorder on a fresh `root` for `sim`'s streams; nothing to recover there.
fn open_recorder(root: &Path, sim: &SimConfig, queue_capacity: usize, queue_bytes: usize) -> Recorder {
    let cfg = RecorderConfig {
        root: root.to_path_buf(),
        streams: sim.streams(),
        queue_capacity,
        queue_bytes,
        writer: WriterOptions::default(),
    };
    let (rec, recovered) = Recorder::open(cfg).unwrap();
    assert!(recovered.is_empty());
    rec
}

fn record(
    root: &Path,
    sim: &SimConfig,
    seconds: f64,
) -> (Vec<SimMessage>, vla_finetune::dataset::episode::EpisodeMeta) {
    let rec = open_recorder(root, sim, 256, 64 << 20);
    let ep = sim.episode(0, START_NS, seconds);
    let instruction = ep.scene().instruction();
    rec.start(
        EpisodeInfo { id: Some("ep0".into()), instruction, task: "needle_insertion".into(), operator: "test".into() },
        START_NS,
    )
    .unwrap();
    let msgs: Vec<SimMessage> = ep.collect();
    for m in &msgs {
        assert_eq!(rec.push_wait(&m.topic, m.type_name, m.cdr.clone(), m.stamp_ns, m.recv_ns), PushOutcome::Queued);
    }
    let meta = rec.stop_at("success", START_NS + (seconds * 1e9) as i64).unwrap();
    let st = rec.status();
    for t in &st.topics {
        let n = msgs.iter().filter(|m| m.topic == t.topic).count() as u64;
        assert_eq!((t.received, t.written, t.dropped), (n, n, 0), "{}", t.topic);
    }
    (msgs, meta)
}

#[test]
fn episode_reads_back_exactly_with_our_reader() {
    let dir = tempfile::tempdir().unwrap();
    let sim = small_sim();
    let (msgs, meta) = record(dir.path(), &sim, 2.0);
    assert_eq!(meta.outcome, "success");
    assert!(meta.drops.is_empty());
    let ep = McapEpisode::open(&dir.path().join("episodes/ep0")).unwrap();
    assert!(ep.complete());
    assert!(ep.skipped().is_empty(), "{:?}", ep.skipped());
    assert_eq!(ep.meta().instruction, sim.scene(0).instruction());
    assert_eq!(ep.cameras(), vec!["camera0", "camera1"]);

    // Camera frames: stamps and pixels equal the simulator's.
    let cam0: Vec<&SimMessage> = msgs.iter().filter(|m| m.topic == "/sim/camera0/image_raw").collect();
    assert_eq!(cam0.len(), 20);
    let stamps = ep.camera_stamps("camera0").unwrap();
    assert_eq!(stamps.len(), cam0.len());
    for (i, m) in cam0.iter().enumerate() {
        assert_eq!((stamps[i].stamp_ns, stamps[i].recv_ns), (m.stamp_ns, m.recv_ns));
        let img = Image::decode(&m.cdr).unwrap();
        let got = ep.camera_frame("camera0", i).unwrap();
        assert_eq!((got.width, got.height), (32, 24));
        assert_eq!(got.data, img.data, "frame {i}");
    }
    assert!(ep.camera_frame("camera0", 20).is_err());

    // Sensor: 650 Hz x 2 s, every value.
    let s = ep.sensor("oct").unwrap();
    let frames: Vec<SensorFrame> =
        msgs.iter().filter(|m| m.topic == SENSOR_TOPIC).map(|m| SensorFrame::decode(&m.cdr).unwrap()).collect();
    assert_eq!(frames.len(), 1300);
    assert_eq!(s.channels, 1026);
    assert_eq!(s.stamps.len(), 1300);
    let want: Vec<f32> = frames.iter().flat_map(|f| f.values.iter().copied()).collect();
    assert_eq!(s.values, want);

    // State: metres -> mm, quaternion -> degrees.
    let st = ep.state().unwrap();
    assert_eq!(st.names, vec!["x", "y", "z", "roll", "pitch", "yaw"]);
    let poses: Vec<PoseStamped> =
        msgs.iter().filter(|m| m.topic == POSE_TOPIC).map(|m| PoseStamped::decode(&m.cdr).unwrap()).collect();
    assert_eq!(st.values.len(), poses.len());
    for (v, p) in st.values.iter().zip(&poses) {
        for (got, m) in v.iter().zip(&p.position) {
            assert!((got - m * 1000.0).abs() < 1e-9);
        }
        // The simulator's quaternion is a pure yaw: yaw = 2 atan2(z, w).
        let yaw = 2.0 * p.orientation[2].atan2(p.orientation[3]).to_degrees();
        let d = (v[5] - yaw).rem_euclid(360.0);
        assert!(d.min(360.0 - d) < 1e-6, "{} vs {yaw}", v[5]);
        assert!(v[3].abs() < 1e-9 && v[4].abs() < 1e-9);
    }
    assert!(ep.commands().unwrap().is_none());
    let _ = quaternion_to_rpy_deg;
}

const PY_CHECK: &str = r#"
import json, sys
from rosbags.rosbag2 import Reader
from rosbags.typesys import Stores, get_typestore, get_types_from_msg
from mcap.reader import make_reader
ep = sys.argv[1]
ts = get_typestore(Stores.ROS2_HUMBLE)
ts.register(get_types_from_msg("std_msgs/Header header\nfloat32[] values\nuint32 channels\nstring layout\n", "vla_finetune_msgs/msg/SensorFrame"))
out = {"counts": {}, "types": {}, "first": {}}
with Reader(ep) as r:
    out["message_count"] = r.message_count
    out["start"] = r.start_time
    for conn, t, raw in r.messages():
        m = ts.deserialize_cdr(raw, conn.msgtype)
        out["counts"][conn.topic] = out["counts"].get(conn.topic, 0) + 1
        out["types"][conn.topic] = conn.msgtype
        if conn.topic in out["first"]:
            continue
        stamp = m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec
        if conn.msgtype.endswith("PoseStamped"):
            p, q = m.pose.position, m.pose.orientation
            out["first"][conn.topic] = {"stamp": stamp, "log": t, "v": [repr(x) for x in (p.x, p.y, p.z, q.x, q.y, q.z, q.w)]}
        elif conn.msgtype.endswith("SensorFrame"):
            out["first"][conn.topic] = {"stamp": stamp, "log": t, "channels": m.channels, "layout": m.layout, "sum": float(m.values.astype("float64").sum())}
        else:
            out["first"][conn.topic] = {"stamp": stamp, "log": t, "w": m.width, "h": m.height, "enc": m.encoding, "sum": int(m.data.astype("int64").sum())}
files = [f for f in __import__("os").listdir(ep) if f.endswith(".mcap")]
with open(ep + "/" + files[0], "rb") as f:
    rd = make_reader(f)
    s = rd.get_summary()
    out["mcap"] = {"profile": rd.get_header().profile, "messages": s.statistics.message_count, "chunks": len(s.chunk_indexes),
                   "compression": sorted({c.compression for c in s.chunk_indexes}),
                   "schemas": sorted((x.name, x.encoding) for x in s.schemas.values()),
                   "encodings": sorted({c.message_encoding for c in s.channels.values()}),
                   "iterated": sum(1 for _ in rd.iter_messages())}
print(json.dumps(out))
"#;

#[test]
fn episode_is_readable_by_rosbags_and_python_mcap() {
    let dir = tempfile::tempdir().unwrap();
    let sim = small_sim();
    let (msgs, _) = record(dir.path(), &sim, 2.5);
    let ep = dir.path().join("episodes/ep0");
    let out = Command::new(PYTHON).arg("-c").arg(PY_CHECK).arg(&ep).output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for m in &msgs {
        *counts.entry(m.topic.clone()).or_default() += 1;
    }
    let got: BTreeMap<String, u64> = serde_json::from_value(v["counts"].clone()).unwrap();
    assert_eq!(got, counts);
    assert_eq!(v["message_count"].as_u64().unwrap(), msgs.len() as u64);
    assert_eq!(v["start"].as_i64().unwrap(), msgs.iter().map(|m| m.recv_ns).min().unwrap());
    assert_eq!(v["types"][SENSOR_TOPIC], "vla_finetune_msgs/msg/SensorFrame");

    let first = |topic: &str| msgs.iter().find(|m| m.topic == topic).unwrap();
    let p = PoseStamped::decode(&first(POSE_TOPIC).cdr).unwrap();
    // Printed with repr() and parsed with Rust's correctly rounded parser: bit-exact.
    let py: Vec<String> = serde_json::from_value(v["first"][POSE_TOPIC]["v"].clone()).unwrap();
    let py: Vec<f64> = py.iter().map(|s| s.parse().unwrap()).collect();
    let rust: Vec<f64> = p.position.iter().chain(p.orientation.iter()).copied().collect();
    assert_eq!(py, rust);
    assert_eq!(v["first"][POSE_TOPIC]["stamp"].as_i64().unwrap(), first(POSE_TOPIC).stamp_ns);
    assert_eq!(v["first"][POSE_TOPIC]["log"].as_i64().unwrap(), first(POSE_TOPIC).recv_ns);
    let f = SensorFrame::decode(&first(SENSOR_TOPIC).cdr).unwrap();
    let sum: f64 = f.values.iter().map(|&x| x as f64).sum();
    assert!((v["first"][SENSOR_TOPIC]["sum"].as_f64().unwrap() - sum).abs() < 1e-9);
    assert_eq!(v["first"][SENSOR_TOPIC]["channels"], 1026);
    let img = Image::decode(&first("/sim/camera1/image_raw").cdr).unwrap();
    let isum: i64 = img.data.iter().map(|&b| b as i64).sum();
    assert_eq!(v["first"]["/sim/camera1/image_raw"]["sum"].as_i64().unwrap(), isum);
    assert_eq!(v["first"]["/sim/camera1/image_raw"]["enc"], "rgb8");

    let m = &v["mcap"];
    assert_eq!(m["profile"], "ros2");
    assert_eq!(m["messages"].as_u64().unwrap(), msgs.len() as u64);
    assert_eq!(m["iterated"].as_u64().unwrap(), msgs.len() as u64);
    // Flushed about once per second of data: more than one chunk, all zstd.
    assert!(m["chunks"].as_u64().unwrap() >= 3, "{m}");
    assert_eq!(m["compression"], serde_json::json!(["zstd"]));
    assert_eq!(m["encodings"], serde_json::json!(["cdr"]));
    let schemas: Vec<(String, String)> = serde_json::from_value(m["schemas"].clone()).unwrap();
    assert!(schemas.iter().all(|(_, e)| e == "ros2msg"));
    assert_eq!(schemas.len(), 3);
}

#[test]
fn full_queue_drops_are_counted_never_block_and_land_in_the_episode() {
    // Bounded by message count, then by payload bytes.
    burst(2, 64 << 20);
    burst(100_000, 2 << 20);
}

fn burst(queue_capacity: usize, queue_bytes: usize) {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimConfig { seed: 3, cameras: 1, width: 640, height: 360, camera_hz: 200.0, ..Default::default() };
    let rec = open_recorder(dir.path(), &sim, queue_capacity, queue_bytes);
    // Not recording yet: ignored, not counted.
    let m0 = sim.episode(0, START_NS, 0.01).next().unwrap();
    assert_eq!(rec.push(&m0.topic, m0.type_name, m0.cdr.clone(), 0, 0), PushOutcome::NotRecording);
    assert_eq!(rec.push("/not/mapped", "std_msgs/msg/String", vec![], 0, 0), PushOutcome::UnknownTopic);
    rec.start(EpisodeInfo { id: Some("burst".into()), ..Default::default() }, START_NS).unwrap();
    let msgs: Vec<SimMessage> = sim.episode(0, START_NS, 1.0).collect();
    let mut dropped_here = 0;
    for m in &msgs {
        if rec.push(&m.topic, m.type_name, m.cdr.clone(), m.stamp_ns, m.recv_ns) == PushOutcome::Dropped {
            dropped_here += 1;
        }
    }
    // A wrongly typed message is dropped and counted too.
    assert_eq!(rec.push(POSE_TOPIC, "sensor_msgs/msg/Image", vec![0, 1, 0, 0], 1, 1), PushOutcome::Dropped);
    let meta = rec.stop_at("aborted", START_NS + 1_000_000_000).unwrap();
    let st = rec.status();
    let total_dropped: u64 = st.topics.iter().map(|t| t.dropped).sum();
    assert!(dropped_here > 0, "a small queue fed a 640x360 burst must overflow");
    assert!(rec.status().queued_bytes <= queue_bytes as u64);
    assert_eq!(total_dropped, dropped_here + 1);
    assert_eq!(meta.drops.values().sum::<u64>(), total_dropped);
    let ep = McapEpisode::open(&dir.path().join("episodes/burst")).unwrap();
    for t in &st.topics {
        assert_eq!(t.received, t.written + t.dropped, "{}", t.topic);
        assert_eq!(ep.counts().get(&t.topic).copied().unwrap_or(0), t.written, "{}", t.topic);
        assert_eq!(meta.drops.get(&t.topic).copied().unwrap_or(0), t.dropped);
    }
    assert_eq!(st.topics.iter().map(|t| t.received).sum::<u64>(), msgs.len() as u64 + 1);
}

#[test]
fn raw_subscription_entry_point_takes_the_header_stamp() {
    let dir = tempfile::tempdir().unwrap();
    let sim = small_sim();
    let rec = open_recorder(dir.path(), &sim, 64, 64 << 20);
    rec.start(EpisodeInfo { id: Some("raw".into()), ..Default::default() }, START_NS).unwrap();
    let header = vla_finetune::dataset::cdr::Header {
        stamp: vla_finetune::dataset::cdr::Time::from_ns(START_NS + 5),
        frame_id: "base".into(),
    };
    let p = PoseStamped { header, position: [0.001, 0.0, 0.0], orientation: [0.0, 0.0, 0.0, 1.0] };
    assert_eq!(
        rec.push_received(POSE_TOPIC, "geometry_msgs/msg/PoseStamped", p.encode(), START_NS + 9),
        PushOutcome::Queued
    );
    assert_eq!(
        rec.push_received(POSE_TOPIC, "geometry_msgs/msg/PoseStamped", vec![0, 1, 0, 0, 1], START_NS + 10),
        PushOutcome::Dropped
    );
    assert_eq!(rec.push_received("/nope", "geometry_msgs/msg/PoseStamped", vec![], 0), PushOutcome::UnknownTopic);
    let meta = rec.stop_at("success", START_NS + 10).unwrap();
    assert_eq!(meta.drops, BTreeMap::from([(POSE_TOPIC.to_string(), 1)]));
    let ep = McapEpisode::open(&dir.path().join("episodes/raw")).unwrap();
    let s = ep.state().unwrap();
    assert_eq!(s.stamps.len(), 1);
    assert_eq!((s.stamps[0].stamp_ns, s.stamps[0].recv_ns), (START_NS + 5, START_NS + 9));
    assert!((s.values[0][0] - 1.0).abs() < 1e-12);
}

#[test]
fn a_stop_counts_the_messages_rated_streams_still_owed_the_episode() {
    let dir = tempfile::tempdir().unwrap();
    // Camera 10 Hz, sensor 650 Hz, pose 100 Hz (config streams carry these rates).
    let sim = SimConfig { seed: 5, cameras: 2, width: 32, height: 24, camera_hz: 10.0, ..Default::default() };
    let rec = open_recorder(dir.path(), &sim, 4096, 64 << 20);
    let cam0 = "/sim/camera0/image_raw";
    let cam1 = "/sim/camera1/image_raw";
    for (id, start) in [("first", START_NS), ("second", START_NS + 5_000_000_000)] {
        rec.start(EpisodeInfo { id: Some(id.into()), ..Default::default() }, start).unwrap();
        for m in sim.episode(0, start, 1.0) {
            // camera0 goes silent after its frame at +0.5 s; camera1 delivers nothing; the pose
            // is stamped by another clock (before the episode's start).
            let stamp = if m.topic == POSE_TOPIC { m.stamp_ns - 3_000_000_000 } else { m.stamp_ns };
            if (m.topic == cam0 && m.stamp_ns > start + 500_000_000) || m.topic == cam1 {
                continue;
            }
            assert_eq!(rec.push_wait(&m.topic, m.type_name, m.cdr, stamp, m.recv_ns), PushOutcome::Queued);
        }
        // Stopped at +1.0 s: camera0 owes its frames at +0.6 .. +0.9 s; the 650 Hz sensor's next
        // frame is due exactly at the stop (rounded stamps), so it owes none.
        let meta = rec.stop_at("success", start + 1_000_000_000).unwrap();
        assert_eq!(meta.drops, BTreeMap::from([(cam0.to_string(), 4)]), "{id}");
        let ep = McapEpisode::open(&dir.path().join("episodes").join(id)).unwrap();
        assert_eq!(ep.counts().get(cam0).copied(), Some(6), "{id}");
    }
    // The status adds up both episodes.
    let st = rec.status();
    let cam0_status = st.topics.iter().find(|t| t.topic == cam0).unwrap();
    assert_eq!((cam0_status.written, cam0_status.dropped), (12, 8));
}
