//! Imports the bag written by the Python `rosbags` library (scripts/gen_rosbag_fixtures.py) and
//! checks every value against the generator's `expected.json`; then damaged and mismatched bags.

use std::path::{Path, PathBuf};

use vla_finetune::dataset::episode::EpisodeSource;
use vla_finetune::dataset::import::{import_bag, ImportError, ImportOptions};
use vla_finetune::dataset::mcap_episode::McapEpisode;
use vla_finetune::dataset::streams::StreamConfig;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rosbag")
}

fn streams() -> StreamConfig {
    StreamConfig::load(&fixtures().join("streams.yaml")).unwrap()
}

fn expected() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("expected.json")).unwrap()).unwrap()
}

fn opts() -> ImportOptions {
    ImportOptions {
        id: Some("bag0".into()),
        instruction: "pick".into(),
        task: "t".into(),
        operator: "op".into(),
        outcome: "success".into(),
        ..Default::default()
    }
}

fn msgs<'a>(exp: &'a serde_json::Value, topic: &str) -> &'a Vec<serde_json::Value> {
    exp["topics"][topic]["messages"].as_array().unwrap()
}

#[test]
fn imports_every_type_with_exact_values_from_mcap() {
    check_import("all_types");
}

#[test]
fn imports_every_type_with_exact_values_from_sqlite3() {
    check_import("all_types_sqlite3");
}

fn check_import(bag: &str) {
    let out = tempfile::tempdir().unwrap();
    let r = import_bag(&fixtures().join(bag), &streams(), out.path(), &opts()).unwrap();
    assert_eq!(r.unmapped.get("/chatter"), Some(&5));
    assert!(r.skipped.is_empty());
    assert_eq!(r.meta.outcome, "success");
    let exp = expected();
    let ep = McapEpisode::open(&r.dir).unwrap();
    assert!(ep.skipped().is_empty(), "{:?}", ep.skipped());
    assert_eq!(ep.meta().instruction, "pick");

    for (cam, topic) in [("rgb", "/cam/rgb"), ("bgr", "/cam/bgr"), ("mono", "/cam/mono"), ("rgba", "/cam/rgba")] {
        let m = msgs(&exp, topic);
        let stamps = ep.camera_stamps(cam).unwrap();
        assert_eq!(stamps.len(), m.len(), "{cam}");
        for (i, e) in m.iter().enumerate() {
            assert_eq!(stamps[i].stamp_ns, e["stamp_ns"].as_i64().unwrap());
            assert_eq!(stamps[i].recv_ns, e["recv_ns"].as_i64().unwrap());
            let img = ep.camera_frame(cam, i).unwrap();
            assert_eq!((img.width, img.height), (4, 3));
            let want: Vec<u8> = serde_json::from_value(e["value"].clone()).unwrap();
            assert_eq!(img.data, want, "{cam} frame {i}");
        }
    }
    for (cam, tol) in [("png", 0i32), ("jpeg", 3)] {
        let m = msgs(&exp, &format!("/cam/{cam}"));
        assert_eq!(ep.camera_stamps(cam).unwrap().len(), 3);
        for (i, e) in m.iter().enumerate() {
            let img = ep.camera_frame(cam, i).unwrap();
            assert_eq!((img.width, img.height), (32, 24));
            let want: Vec<u8> = serde_json::from_value(e["value"]["rgb"].clone()).unwrap();
            // PNG is lossless; JPEG decoders (PIL's libjpeg vs the image crate) may differ by a few levels.
            let worst = img.data.iter().zip(&want).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
            assert!(worst <= tol, "{cam} frame {i}: max difference {worst}");
        }
    }

    for (name, topic) in [("oct", "/oct"), ("array", "/array"), ("wrench", "/wrench")] {
        let s = ep.sensor(name).unwrap();
        let m = msgs(&exp, topic);
        assert_eq!(s.stamps.len(), m.len(), "{name}");
        let mut want = Vec::new();
        for (i, e) in m.iter().enumerate() {
            assert_eq!(s.stamps[i].stamp_ns, e["stamp_ns"].as_i64().unwrap(), "{name}");
            assert_eq!(s.stamps[i].recv_ns, e["recv_ns"].as_i64().unwrap(), "{name}");
            let v: Vec<f64> = serde_json::from_value(e["value"].clone()).unwrap();
            want.extend(v.into_iter().map(|x| x as f32));
        }
        assert_eq!(s.values, want, "{name}");
        assert_eq!(s.channels, want.len() / m.len());
    }

    let st = ep.state().unwrap();
    let m = msgs(&exp, "/pose");
    assert_eq!(st.values.len(), 5);
    assert_eq!(st.is_angle_deg, vec![false, false, false, true, true, true]);
    for (i, e) in m.iter().enumerate() {
        let want: Vec<f64> = serde_json::from_value(e["value"].clone()).unwrap();
        assert_eq!((st.values[i].len(), want.len()), (6, 6));
        for (k, (got, want)) in st.values[i].iter().zip(&want).enumerate() {
            let d = (got - want).abs();
            let d = if k >= 3 { d.min((360.0 - d).abs()) } else { d };
            assert!(d < 1e-6, "pose {i} value {k}: {got} vs {want}");
        }
        assert!(st.values[i][5] > -180.0 && st.values[i][5] <= 180.0);
        assert_eq!(st.stamps[i].stamp_ns, e["stamp_ns"].as_i64().unwrap());
    }

    let cmd = ep.commands().unwrap().expect("command stream configured");
    let m = msgs(&exp, "/joints");
    assert_eq!(cmd.names, vec!["j1", "j2", "j3"]);
    for (i, e) in m.iter().enumerate() {
        let want: Vec<f64> = serde_json::from_value(e["value"]["position"].clone()).unwrap();
        assert_eq!(cmd.values[i], want);
    }
}

#[test]
fn cli_import_bag_writes_an_episode() {
    let out = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vla_finetune"))
        .args(["import-bag"])
        .arg(fixtures().join("all_types"))
        .arg("--streams")
        .arg(fixtures().join("streams.yaml"))
        .arg("--out")
        .arg(out.path())
        .args(["--instruction", "insert", "--outcome", "failure"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["episode"], "all_types");
    assert_eq!(v["imported"]["/oct"], 5);
    let ep = McapEpisode::open(&out.path().join("episodes/all_types")).unwrap();
    assert_eq!(ep.meta().outcome, "failure");
    assert_eq!(ep.meta().instruction, "insert");
    assert!(out.path().join("episodes/all_types/metadata.yaml").exists());
}

fn copy_bag(to: &Path) -> PathBuf {
    let bag = to.join("bag");
    std::fs::create_dir_all(&bag).unwrap();
    for f in ["metadata.yaml", "all_types.mcap"] {
        std::fs::copy(fixtures().join("all_types").join(f), bag.join(f)).unwrap();
    }
    bag
}

#[test]
fn truncated_bag_is_a_clear_error_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let bag = copy_bag(tmp.path());
    let f = bag.join("all_types.mcap");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
    let out = tmp.path().join("ds");
    let e = import_bag(&bag, &streams(), &out, &opts()).unwrap_err();
    assert!(matches!(e, ImportError::Damaged { .. }), "{e}");
    assert!(e.to_string().contains("all_types.mcap"), "{e}");
    assert!(!out.join("episodes/bag0").exists());
}

#[test]
fn wrong_storage_type_mismatch_and_missing_topic_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let bag = copy_bag(tmp.path());
    let out = tmp.path().join("ds");

    let mut s = streams();
    s.state.msg_type = "sensor_msgs/msg/JointState".into();
    let e = import_bag(&bag, &s, &out, &opts()).unwrap_err();
    assert!(matches!(&e, ImportError::TypeMismatch { topic, .. } if topic == "/pose"), "{e}");

    let mut s = streams();
    s.sensors[0].topic = "/not_there".into();
    let e = import_bag(&bag, &s, &out, &opts()).unwrap_err();
    assert!(e.to_string().contains("/not_there"), "{e}");

    let md = bag.join("metadata.yaml");
    let orig = std::fs::read_to_string(&md).unwrap();
    std::fs::write(&md, orig.replace("storage_identifier: mcap", "storage_identifier: rosbag_v1")).unwrap();
    let e = import_bag(&bag, &streams(), &out, &opts()).unwrap_err();
    assert!(matches!(&e, ImportError::Storage { storage, .. } if storage == "rosbag_v1"), "{e}");
    // Metadata saying sqlite3 over an MCAP file: the database layer's error, naming the file.
    std::fs::write(&md, orig.replace("storage_identifier: mcap", "storage_identifier: sqlite3")).unwrap();
    let e = import_bag(&bag, &streams(), &out, &opts()).unwrap_err();
    assert!(matches!(&e, ImportError::Damaged { .. }) && e.to_string().contains("all_types.mcap"), "{e}");

    std::fs::write(&md, "not: [a bag").unwrap();
    let e = import_bag(&bag, &streams(), &out, &opts()).unwrap_err();
    assert!(e.to_string().contains("metadata.yaml"), "{e}");
}
