//! The simulated robot: deterministic from the seed, the configured rates, a scene whose pixels
//! show the target named by the instruction, a sensor that reacts to contact, and a tool that
//! reaches the target.

use std::collections::BTreeMap;
use std::path::Path;

use vla_finetune::dataset::cdr::{Image, PoseStamped, RosMessage, SensorFrame};
use vla_finetune::dataset::episode::EpisodeSource;
use vla_finetune::dataset::mcap_episode::McapEpisode;
use vla_finetune::dataset::streams::StreamConfig;
use vla_finetune::sim::{SimConfig, SimMessage, COLORS, POSE_TOPIC, SENSOR_TOPIC};

const T0: i64 = 1_000_000_000_000;

fn cfg(seed: u64) -> SimConfig {
    SimConfig { seed, cameras: 2, width: 96, height: 72, camera_hz: 10.0, ..Default::default() }
}

#[test]
fn same_seed_same_messages_other_seed_other_scene() {
    let a: Vec<SimMessage> = cfg(1).episode(0, T0, 1.0).collect();
    let b: Vec<SimMessage> = cfg(1).episode(0, T0, 1.0).collect();
    assert_eq!(a, b);
    let c: Vec<SimMessage> = cfg(2).episode(0, T0, 1.0).collect();
    assert_ne!(a, c);
    assert_ne!(cfg(1).scene(0), cfg(2).scene(0));
    assert_ne!(cfg(1).scene(0), cfg(1).scene(1));
    // Over a few seeds every colour shows up as a target.
    let colours: std::collections::BTreeSet<&str> = (0..40).map(|i| cfg(i).scene(0).target_color).collect();
    assert_eq!(colours.len(), COLORS.len());
}

#[test]
fn rates_and_stamps_follow_the_configuration() {
    let msgs: Vec<SimMessage> = cfg(3).episode(0, T0, 2.0).collect();
    let mut per: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for m in &msgs {
        per.entry(m.topic.as_str()).or_default().push(m.stamp_ns);
        assert!(m.recv_ns > m.stamp_ns && m.recv_ns - m.stamp_ns < 20_000_000);
    }
    assert_eq!(per["/sim/camera0/image_raw"].len(), 20);
    assert_eq!(per["/sim/camera1/image_raw"].len(), 20);
    assert_eq!(per[SENSOR_TOPIC].len(), 1300);
    assert_eq!(per[POSE_TOPIC].len(), 200);
    // Hand-computed: sample n of a 650 Hz stream is at round(n * 1e9 / 650) ns.
    assert_eq!(per[SENSOR_TOPIC][1] - T0, 1_538_462);
    assert_eq!(per[SENSOR_TOPIC][650] - T0, 1_000_000_000);
    assert_eq!(per[POSE_TOPIC][7] - T0, 70_000_000);
    // Global order is by stamp.
    assert!(msgs.windows(2).all(|w| w[0].stamp_ns <= w[1].stamp_ns));
    let img = Image::decode(&msgs.iter().find(|m| m.topic.contains("camera1")).unwrap().cdr).unwrap();
    assert_eq!(
        (img.width, img.height, img.step, img.encoding.as_str(), img.data.len()),
        (96, 72, 288, "rgb8", 96 * 72 * 3)
    );
    let f = SensorFrame::decode(&msgs.iter().find(|m| m.topic == SENSOR_TOPIC).unwrap().cdr).unwrap();
    assert_eq!((f.channels, f.values.len()), (1026, 1026));
}

#[test]
fn top_view_shows_the_target_its_twin_and_the_distractor_under_the_episode_lighting() {
    let mut relations = std::collections::BTreeSet::new();
    for seed in 0..12 {
        let sim = cfg(seed);
        let scene = sim.scene(0);
        let [twin, distractor] = [&scene.others[0], &scene.others[1]];
        assert_eq!(twin.color, scene.target_color);
        assert_ne!(distractor.color, scene.target_color);
        // The instruction's relation is where the target lies from its twin in the top view.
        let (dx, dy) = (scene.target_mm[0] - twin.mm[0], scene.target_mm[1] - twin.mm[1]);
        let expected = if dx.abs() >= dy.abs() {
            if dx < 0.0 {
                "left"
            } else {
                "right"
            }
        } else if dy < 0.0 {
            "upper"
        } else {
            "lower"
        };
        assert_eq!(scene.instruction(), format!("insert the needle into the {expected} {} target", scene.target_color));
        relations.insert(scene.relation);
        let first = sim.episode(0, T0, 0.05).find(|m| m.topic == "/sim/camera0/image_raw").unwrap();
        let img = Image::decode(&first.cdr).unwrap();
        // Top view: 96 px over 240 mm, centred on the episode's camera offset.
        let off = scene.camera_offset_mm[0];
        assert!(off.iter().all(|v| v.abs() <= 6.0));
        let px = |p: [f64; 3]| {
            ((48.0 + (p[0] + off[0]) * 96.0 / 240.0) as usize, (36.0 + (p[1] + off[1]) * 96.0 / 240.0) as usize)
        };
        let rgb = |(u, v): (usize, usize)| {
            let o = (v * 96 + u) * 3;
            [img.data[o], img.data[o + 1], img.data[o + 2]]
        };
        let lit = |name: &str| {
            let c = COLORS.iter().find(|(n, _)| *n == name).unwrap().1;
            [0, 1, 2].map(|k| vla_finetune::sim::lit(c[k], scene.light[k]))
        };
        let tool = vla_finetune::sim::SimConfig::episode(&sim, 0, T0, 0.0).tool();
        let near = |p: [f64; 3]| (tool.position_mm[0] - p[0]).hypot(tool.position_mm[1] - p[1]) < 20.0;
        for d in [scene.target(), twin.clone(), distractor.clone()] {
            if !near(d.mm) {
                // Just off the centre, away from the notch.
                let a = d.yaw_deg.to_radians();
                let p = [d.mm[0] - 4.0 * a.cos(), d.mm[1] - 4.0 * a.sin(), 0.0];
                assert_eq!(rgb(px(p)), lit(d.color), "seed {seed}");
            }
        }
    }
    assert!(relations.len() >= 3, "{relations:?}");
    // Lighting differs between episodes.
    assert_ne!(cfg(0).scene(0).light, cfg(0).scene(1).light);
}

#[test]
fn tool_reaches_the_target_and_the_sensor_feels_the_contact() {
    let sim = cfg(4);
    let scene = sim.scene(0);
    let msgs: Vec<SimMessage> = sim.episode(0, T0, 10.0).collect();
    let poses: Vec<(i64, PoseStamped)> = msgs
        .iter()
        .filter(|m| m.topic == POSE_TOPIC)
        .map(|m| (m.stamp_ns, PoseStamped::decode(&m.cdr).unwrap()))
        .collect();
    let first = &poses[0].1;
    let last = &poses.last().unwrap().1;
    let lateral = |p: &PoseStamped| {
        (p.position[0] * 1000.0 - scene.target_mm[0]).hypot(p.position[1] * 1000.0 - scene.target_mm[1])
    };
    assert!(lateral(first) > 5.0 || first.position[2] * 1000.0 > 30.0);
    assert!(lateral(last) < 1.0, "{}", lateral(last));
    assert!(last.position[2] * 1000.0 < scene.target_mm[2] - 2.0);
    let yaw = 2.0 * last.orientation[2].atan2(last.orientation[3]).to_degrees();
    let d = (yaw - scene.target_yaw_deg).rem_euclid(360.0);
    assert!(d.min(360.0 - d) < 2.5, "yaw {yaw} vs {}", scene.target_yaw_deg);

    // The sensor: no force while the tip is above the surface, force on contact; the A-scan echo
    // sits at 40 + 20 px/mm * gap while approaching and a deeper layer echo appears on contact.
    let z_at = |t: i64| {
        let i = poses.partition_point(|(s, _)| *s <= t).saturating_sub(1);
        poses[i].1.position[2] * 1000.0
    };
    let mut saw_free = false;
    let mut saw_contact = false;
    for m in msgs.iter().filter(|m| m.topic == SENSOR_TOPIC).step_by(13) {
        let f = SensorFrame::decode(&m.cdr).unwrap();
        let z = z_at(m.stamp_ns);
        let ascan = &f.values[1..];
        let peak = ascan.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as f64;
        if z > 1.0 {
            saw_free = true;
            assert!(f.values[0].abs() < 0.02, "force {} at z {z}", f.values[0]);
            if z < 40.0 {
                assert!((peak - (40.0 + 20.0 * z)).abs() < 6.0, "echo at {peak}, z {z}");
            }
        } else if z < -1.0 {
            saw_contact = true;
            assert!(f.values[0] > 0.3, "force {} at z {z}", f.values[0]);
            assert!((peak - 40.0).abs() < 3.0);
            let layer = 100.0 - 20.0 * z;
            let around = ascan[(layer as usize - 3)..(layer as usize + 3)].iter().cloned().fold(f32::MIN, f32::max);
            assert!(around > 0.5, "layer echo {around} at {layer}");
        }
    }
    assert!(saw_free && saw_contact);
}

#[test]
fn example_stream_config_matches_the_simulator() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/streams_sim.yaml");
    assert_eq!(StreamConfig::load(&path).unwrap(), SimConfig::default().streams());
}

#[test]
fn cli_records_sim_episodes_with_metadata_and_no_drops() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vla_finetune"))
        .args([
            "record",
            "--sim",
            "--episodes",
            "2",
            "--seconds",
            "2",
            "--width",
            "48",
            "--height",
            "32",
            "--seed",
            "8",
            "--json",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["episodes"].as_array().unwrap().len(), 2);
    for (i, e) in v["episodes"].as_array().unwrap().iter().enumerate() {
        assert_eq!(e["drops"], serde_json::json!({}));
        let ep = McapEpisode::open(&dir.path().join(format!("episodes/sim_s8_e000{i}"))).unwrap();
        assert_eq!(ep.meta().instruction, cfg(8).scene(i as u64).instruction());
        assert_eq!(ep.meta().task, "needle_insertion");
        assert_eq!(ep.meta().stop_ns - ep.meta().start_ns, 2_000_000_000);
        assert_eq!(ep.sensor("oct").unwrap().stamps.len(), 1300);
        assert_eq!(ep.camera_stamps("camera1").unwrap().len(), 20);
        assert_eq!(ep.camera_frame("camera0", 3).unwrap().width, 48);
    }
    for t in v["status"]["topics"].as_array().unwrap() {
        assert_eq!(t["dropped"], 0);
        assert_eq!(t["received"], t["written"]);
    }
    // Without --sim the command says what it needs.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vla_finetune"))
        .args(["record", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sim"));
}
