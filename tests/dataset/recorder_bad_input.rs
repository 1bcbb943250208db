//! Bad input: truncated or garbage MCAP, unknown types, image step/size mismatch, NaN in a sensor,
//! non-monotonic stamps, wrong channel counts, undecodable CDR, empty episodes. Each gives a clear
//! error or a counted skip; nothing else is lost and nothing panics.

use std::collections::BTreeMap;
use std::path::Path;

use vla_finetune::dataset::cdr::{Header, Image, PoseStamped, RosMessage, SensorFrame, Time};
use vla_finetune::dataset::episode::{EpisodeMeta, EpisodeSource};
use vla_finetune::dataset::mcap_episode::{EpisodeError, EpisodeWriter, McapEpisode, WriterOptions};
use vla_finetune::dataset::streams::StreamConfig;

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");

fn streams() -> StreamConfig {
    StreamConfig::from_yaml(
        "cameras:\n  - {name: cam, topic: /cam, type: sensor_msgs/Image}\nsensors:\n  - {name: oct, topic: /oct, type: vla_finetune_msgs/SensorFrame, channels: 4}\nstate: {name: pose, topic: /pose, type: geometry_msgs/PoseStamped}\n",
        "test",
    )
    .unwrap()
}

fn hdr(ns: i64) -> Header {
    Header { stamp: Time::from_ns(ns), frame_id: String::new() }
}

fn image(ns: i64, w: u32, h: u32, step: u32, len: usize, encoding: &str) -> Vec<u8> {
    Image {
        header: hdr(ns),
        height: h,
        width: w,
        encoding: encoding.into(),
        is_bigendian: 0,
        step,
        data: (0..len).map(|i| i as u8).collect(),
    }
    .encode()
}

fn frame(ns: i64, values: Vec<f32>, channels: u32) -> Vec<u8> {
    SensorFrame { header: hdr(ns), values, channels, layout: String::new() }.encode()
}

fn pose(ns: i64, x: f64) -> Vec<u8> {
    PoseStamped { header: hdr(ns), position: [x, 0.0, 0.0], orientation: [0.0, 0.0, 0.0, 1.0] }.encode()
}

fn writer(root: &Path, id: &str) -> EpisodeWriter {
    EpisodeWriter::create(
        root,
        EpisodeMeta { id: id.into(), ..Default::default() },
        &streams(),
        WriterOptions::default(),
    )
    .unwrap()
}

#[test]
fn bad_messages_are_skipped_and_counted_by_reason_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path(), "bad");
    let ms = 1_000_000i64;
    // Camera: good, step/size mismatch, unsupported encoding, good.
    w.write("/cam", "sensor_msgs/msg/Image", &image(10 * ms, 2, 2, 6, 12, "rgb8"), 10 * ms, 11 * ms).unwrap();
    w.write("/cam", "sensor_msgs/msg/Image", &image(20 * ms, 2, 2, 6, 11, "rgb8"), 20 * ms, 21 * ms).unwrap();
    w.write("/cam", "sensor_msgs/msg/Image", &image(30 * ms, 2, 2, 4, 8, "yuv422"), 30 * ms, 31 * ms).unwrap();
    w.write("/cam", "sensor_msgs/msg/Image", &image(40 * ms, 2, 2, 8, 16, "rgb8"), 40 * ms, 41 * ms).unwrap();
    // Sensor: good, NaN, wrong channel count, stamp going back, truncated CDR, good.
    w.write("/oct", "vla_finetune_msgs/msg/SensorFrame", &frame(ms, vec![1.0, 2.0, 3.0, 4.0], 4), ms, ms).unwrap();
    w.write(
        "/oct",
        "vla_finetune_msgs/msg/SensorFrame",
        &frame(2 * ms, vec![1.0, f32::NAN, 3.0, 4.0], 4),
        2 * ms,
        2 * ms,
    )
    .unwrap();
    w.write("/oct", "vla_finetune_msgs/msg/SensorFrame", &frame(3 * ms, vec![1.0, 2.0, 3.0], 3), 3 * ms, 3 * ms)
        .unwrap();
    w.write("/oct", "vla_finetune_msgs/msg/SensorFrame", &frame(ms / 2, vec![9.0; 4], 4), ms / 2, 4 * ms).unwrap();
    let good = frame(5 * ms, vec![5.0; 4], 4);
    w.write("/oct", "vla_finetune_msgs/msg/SensorFrame", &good[..good.len() - 6], 5 * ms, 5 * ms).unwrap();
    w.write("/oct", "vla_finetune_msgs/msg/SensorFrame", &frame(6 * ms, vec![6.0; 4], 4), 6 * ms, 6 * ms).unwrap();
    // Pose: good, same stamp again, NaN position, good.
    w.write("/pose", "geometry_msgs/msg/PoseStamped", &pose(ms, 0.001), ms, ms).unwrap();
    w.write("/pose", "geometry_msgs/msg/PoseStamped", &pose(ms, 0.002), ms, 2 * ms).unwrap();
    w.write("/pose", "geometry_msgs/msg/PoseStamped", &pose(3 * ms, f64::NAN), 3 * ms, 3 * ms).unwrap();
    w.write("/pose", "geometry_msgs/msg/PoseStamped", &pose(4 * ms, 0.004), 4 * ms, 4 * ms).unwrap();
    // Unknown topic / wrong type: refused with the topic named, nothing written.
    let e = w.write("/other", "sensor_msgs/msg/Image", &[], 0, 0).unwrap_err();
    assert!(matches!(&e, EpisodeError::Topic { topic, .. } if topic == "/other"), "{e}");
    let e = w.write("/pose", "foo_msgs/msg/Bar", &[], 0, 0).unwrap_err();
    assert!(e.to_string().contains("/pose") && e.to_string().contains("foo_msgs/msg/Bar"), "{e}");
    w.finish("success", 1, BTreeMap::new()).unwrap();

    let ep = McapEpisode::open(&dir.path().join("episodes/bad")).unwrap();
    let reasons = |t: &str| ep.skipped().get(t).cloned().unwrap_or_default();
    assert_eq!(
        reasons("/cam"),
        BTreeMap::from([("image_size_mismatch".into(), 1), ("unsupported_encoding".into(), 1)])
    );
    assert_eq!(
        reasons("/oct"),
        BTreeMap::from([
            ("non_finite".into(), 1),
            ("channel_mismatch".into(), 1),
            ("non_monotonic_stamp".into(), 1),
            ("decode_error".into(), 1)
        ])
    );
    assert_eq!(reasons("/pose"), BTreeMap::from([("non_monotonic_stamp".into(), 1), ("non_finite".into(), 1)]));

    let stamps = ep.camera_stamps("cam").unwrap();
    assert_eq!(stamps.iter().map(|s| s.stamp_ns).collect::<Vec<_>>(), vec![10 * ms, 40 * ms]);
    assert_eq!(ep.camera_frame("cam", 0).unwrap().data, (0..12).collect::<Vec<u8>>());
    // Row padding (step 8 for 6 bytes of pixels) is removed.
    let f = ep.camera_frame("cam", 1).unwrap();
    assert_eq!(f.data, vec![0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
    let s = ep.sensor("oct").unwrap();
    assert_eq!(s.values, vec![1.0, 2.0, 3.0, 4.0, 6.0, 6.0, 6.0, 6.0]);
    assert_eq!(s.stamps.iter().map(|s| s.stamp_ns).collect::<Vec<_>>(), vec![ms, 6 * ms]);
    let st = ep.state().unwrap();
    assert_eq!(st.values.iter().map(|v| v[0]).collect::<Vec<_>>(), vec![1.0, 4.0]);
    assert!(ep.sensor("nope").is_err());
    assert!(ep.camera_stamps("nope").unwrap_err().to_string().contains("nope"));
}

fn small_episode(root: &Path, id: &str, n: i64) -> std::path::PathBuf {
    let mut w = EpisodeWriter::create(
        root,
        EpisodeMeta { id: id.into(), ..Default::default() },
        &streams(),
        WriterOptions { chunk_bytes: 4096, ..Default::default() },
    )
    .unwrap();
    for i in 1..=n {
        let t = i * 1_000_000;
        w.write("/oct", "vla_finetune_msgs/msg/SensorFrame", &frame(t, vec![i as f32; 4], 4), t, t).unwrap();
        w.write("/pose", "geometry_msgs/msg/PoseStamped", &pose(t, i as f64), t, t).unwrap();
    }
    w.finish("success", 1, BTreeMap::new()).unwrap();
    root.join("episodes").join(id)
}

#[test]
fn truncated_mcap_reads_up_to_the_last_good_chunk_and_garbage_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ep_dir = small_episode(dir.path(), "trunc", 400);
    let f = ep_dir.join("trunc_0.mcap");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len * 6 / 10).unwrap();
    let ep = McapEpisode::open(&ep_dir).unwrap();
    assert!(!ep.complete());
    let s = ep.sensor("oct").unwrap();
    let n = s.stamps.len();
    assert!(n > 0 && n < 400, "{n}");
    // What is left is an exact prefix.
    let want: Vec<f32> = (1..=n).flat_map(|i| vec![i as f32; 4]).collect();
    assert_eq!(s.values, want);

    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(12).unwrap();
    let e = McapEpisode::open(&ep_dir).err().expect("nothing readable");
    assert!(e.to_string().contains("trunc_0.mcap"), "{e}");
    std::fs::write(&f, b"this is not an mcap file at all").unwrap();
    let e = McapEpisode::open(&ep_dir).err().expect("garbage");
    assert!(e.to_string().contains("magic"), "{e}");

    std::fs::write(ep_dir.join("episode.json"), b"{ broken").unwrap();
    let e = McapEpisode::open(&ep_dir).err().expect("bad json");
    assert!(e.to_string().contains("episode.json"), "{e}");
}

#[test]
fn empty_episode_is_valid_and_opens_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let w = writer(dir.path(), "empty");
    let meta = w.finish("aborted", 5, BTreeMap::new()).unwrap();
    assert_eq!(meta.outcome, "aborted");
    let ep_dir = dir.path().join("episodes/empty");
    let ep = McapEpisode::open(&ep_dir).unwrap();
    assert!(ep.complete());
    assert!(ep.camera_stamps("cam").unwrap().is_empty());
    assert!(ep.sensor("oct").unwrap().stamps.is_empty());
    assert!(ep.state().unwrap().values.is_empty());
    let out = std::process::Command::new(PYTHON)
        .args(["-c", "import sys; from rosbags.rosbag2 import Reader\nwith Reader(sys.argv[1]) as r: print(r.message_count, len(list(r.messages())))"])
        .arg(&ep_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0 0");
    // An existing episode is never overwritten.
    let e = EpisodeWriter::create(
        dir.path(),
        EpisodeMeta { id: "empty".into(), ..Default::default() },
        &streams(),
        WriterOptions::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("already exists"), "{e}");
    let e = EpisodeWriter::create(
        dir.path(),
        EpisodeMeta { id: "../x".into(), ..Default::default() },
        &streams(),
        WriterOptions::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("invalid episode id"), "{e}");
    // A mapping built in code is validated too (no panic on an unknown type).
    let mut bad = streams();
    bad.state.msg_type = "nav_msgs/msg/Odometry".into();
    let e = EpisodeWriter::create(
        dir.path(),
        EpisodeMeta { id: "y".into(), ..Default::default() },
        &bad,
        WriterOptions::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("nav_msgs/msg/Odometry"), "{e}");
}
