//! Crash safety: `kill -9` of a real recording process, then recovery on the next start keeps
//! every flushed message; a full disk (episode quota) stops the episode cleanly and keeps what
//! was written.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vla_finetune::dataset::episode::EpisodeSource;
use vla_finetune::dataset::mcap_episode::{scan_mcap, McapEpisode, WriterOptions, RECORDING_MARKER};
use vla_finetune::dataset::recorder::{EpisodeInfo, PushOutcome, Recorder, RecorderConfig, RecorderError};
use vla_finetune::sim::SimConfig;

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");

/// (topic, cdr, stamp from publish_time, log time) of every message in the file's good chunks.
fn scan_file(path: &Path) -> (Vec<(String, Vec<u8>, u64)>, usize) {
    let buf = std::fs::read(path).unwrap();
    let mut chs = HashMap::new();
    let mut out = Vec::new();
    let end =
        scan_mcap(&buf, &mut chs, |chs, m| out.push((chs[&m.channel].topic.clone(), m.data.into_owned(), m.log_time)));
    (out, end.chunks)
}

/// Per topic, the recorded messages must be exactly the first N messages the simulator produced.
fn assert_prefix_of_sim(sim: &SimConfig, seconds: f64, got: &[(String, Vec<u8>, u64)]) {
    let start = got
        .iter()
        .map(|(t, cdr, _)| {
            vla_finetune::dataset::cdr::MsgType::parse(match t.as_str() {
                t if t.contains("camera") => "sensor_msgs/msg/Image",
                t if t.contains("oct") => "vla_finetune_msgs/msg/SensorFrame",
                _ => "geometry_msgs/msg/PoseStamped",
            })
            .unwrap()
            .header_stamp(cdr)
            .unwrap()
            .unwrap()
        })
        .min()
        .unwrap();
    let mut want: BTreeMap<String, Vec<(Vec<u8>, u64)>> = BTreeMap::new();
    for m in sim.episode(0, start, seconds) {
        want.entry(m.topic).or_default().push((m.cdr, m.recv_ns as u64));
    }
    let mut have: BTreeMap<String, Vec<(Vec<u8>, u64)>> = BTreeMap::new();
    for (t, cdr, log) in got {
        have.entry(t.clone()).or_default().push((cdr.clone(), *log));
    }
    assert_eq!(have.len(), sim.cameras + 2, "every stream has messages");
    for (t, h) in &have {
        let w = &want[t];
        assert!(h.len() <= w.len());
        for (i, (a, b)) in h.iter().zip(w).enumerate() {
            assert!(a == b, "{t}: message {i} differs from the simulator's");
        }
    }
}

#[test]
fn kill_9_during_recording_then_recovery_keeps_every_flushed_message() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ds");
    let sim = SimConfig { seed: 5, cameras: 2, width: 32, height: 24, ..Default::default() };
    let seconds = 60.0;
    let mut child = spawn_realtime_recording(&root);
    let ep_dir = root.join("episodes/sim_s5_e0000");
    let mcap = ep_dir.join("sim_s5_e0000_0.mcap");
    // Wait (not a timing assertion) until at least two chunks have been flushed.
    wait_for_two_flushed_chunks(&mcap);
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(ep_dir.join(RECORDING_MARKER).exists());
    assert!(!ep_dir.join("metadata.yaml").exists());
    let (before, chunks) = scan_file(&mcap);
    assert!(chunks >= 2 && !before.is_empty());

    // The next start finds and recovers it.
    let cfg = RecorderConfig {
        root: root.clone(),
        streams: sim.streams(),
        queue_capacity: 64,
        queue_bytes: 64 << 20,
        writer: WriterOptions::default(),
    };
    let (_rec, recovered) = Recorder::open(cfg).unwrap();
    assert_eq!(recovered.len(), 1);
    let r = recovered.into_iter().next().unwrap().unwrap();
    assert_eq!(r.id, "sim_s5_e0000");
    assert_eq!(r.messages, before.len() as u64);
    assert!(!ep_dir.join(RECORDING_MARKER).exists());

    let (after, _) = scan_file(&mcap);
    assert_eq!(after, before, "recovery keeps exactly the flushed messages");
    assert_prefix_of_sim(&sim, seconds, &after);

    let ep = McapEpisode::open(&ep_dir).unwrap();
    assert!(ep.complete());
    assert!(ep.meta().recovered);
    assert_eq!(ep.meta().outcome, "aborted");
    assert_eq!(ep.meta().instruction, sim.scene(0).instruction());
    assert_eq!(ep.counts().values().sum::<u64>(), before.len() as u64);

    // The rebuilt episode is a valid rosbag2 bag for an independent reader.
    assert_rosbags_reads_every_message(&ep_dir, before.len());
}

/// `vla_finetune record --sim --realtime` of one 60 s episode (seed 5, 2 cameras 32x24) into `root`.
fn spawn_realtime_recording(root: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vla_finetune"))
        .args([
            "record",
            "--sim",
            "--realtime",
            "--episodes",
            "1",
            "--seconds",
            "60",
            "--seed",
            "5",
            "--cameras",
            "2",
            "--width",
            "32",
            "--height",
            "24",
            "--out",
        ])
        .arg(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Polls `mcap` until at least two of its chunks are flushed, for at most 60 s.
fn wait_for_two_flushed_chunks(mcap: &Path) {
    let t0 = Instant::now();
    loop {
        if mcap.exists() && scan_file(mcap).1 >= 2 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "recorder never flushed two chunks");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `rosbags` reader opens the episode folder `ep_dir` and counts `messages`, in its index and read.
fn assert_rosbags_reads_every_message(ep_dir: &Path, messages: usize) {
    let out = Command::new(PYTHON)
        .args(["-c", "import sys; from rosbags.rosbag2 import Reader\nwith Reader(sys.argv[1]) as r: print(r.message_count, sum(1 for _ in r.messages()))"])
        .arg(ep_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{messages} {messages}"));
}

#[test]
fn full_disk_stops_the_episode_with_an_error_and_keeps_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimConfig { seed: 9, cameras: 1, width: 32, height: 24, ..Default::default() };
    let writer = WriterOptions { max_bytes: Some(600_000), flush_interval_ns: 200_000_000, ..Default::default() };
    let cfg = RecorderConfig {
        root: dir.path().to_path_buf(),
        streams: sim.streams(),
        queue_capacity: 16,
        queue_bytes: 64 << 20,
        writer,
    };
    let (rec, _) = Recorder::open(cfg).unwrap();
    let seconds = 30.0;
    rec.start(EpisodeInfo { id: Some("full".into()), instruction: "x".into(), ..Default::default() }, 0).unwrap();
    let mut stopped = false;
    for m in sim.episode(0, 1_000_000_000, seconds) {
        match rec.push_wait(&m.topic, m.type_name, m.cdr, m.stamp_ns, m.recv_ns) {
            PushOutcome::Queued | PushOutcome::Dropped => {}
            PushOutcome::NotRecording => {
                stopped = true;
                break;
            }
            PushOutcome::UnknownTopic => unreachable!(),
        }
    }
    assert!(stopped, "the quota must stop the episode");
    // Wait for the writer to finish handling the error (status shows it).
    let t0 = Instant::now();
    while rec.status().error.is_none() {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = rec.status();
    assert!(!st.recording);
    assert!(st.error.as_ref().unwrap().contains("quota"), "{:?}", st.error);
    assert!(matches!(rec.stop("success"), Err(RecorderError::NotRecording)));

    let ep_dir = dir.path().join("episodes/full");
    assert!(!ep_dir.join(RECORDING_MARKER).exists(), "rebuilt right away");
    let (kept, _) = scan_file(&ep_dir.join("full_0.mcap"));
    assert!(!kept.is_empty());
    assert_prefix_of_sim(&sim, seconds, &kept);
    let ep = McapEpisode::open(&ep_dir).unwrap();
    assert!(ep.meta().recovered);
    assert_eq!(ep.meta().outcome, "aborted");
    let written: u64 = st.topics.iter().map(|t| t.written).sum();
    assert!(kept.len() as u64 <= written);

    // The recorder keeps working: a new episode records normally.
    rec.start(EpisodeInfo { id: Some("after".into()), ..Default::default() }, 0).unwrap();
    assert_eq!(rec.status().error, None);
    let meta = rec.stop("success").unwrap();
    assert_eq!(meta.id, "after");
    let e = McapEpisode::open(&dir.path().join("episodes/after")).unwrap();
    assert!(e.counts().is_empty());
}

#[test]
fn drop_counters_saved_during_recording_survive_a_crash() {
    use vla_finetune::dataset::episode::EpisodeMeta;
    use vla_finetune::dataset::mcap_episode::EpisodeWriter;
    use vla_finetune::dataset::recovery::recover_episode;
    let dir = tempfile::tempdir().unwrap();
    let sim = SimConfig { seed: 2, cameras: 1, width: 16, height: 12, ..Default::default() };
    let meta = EpisodeMeta { id: "crashy".into(), instruction: "keep me".into(), ..Default::default() };
    let mut w = EpisodeWriter::create(dir.path(), meta, &sim.streams(), WriterOptions::default()).unwrap();
    let msgs: Vec<_> = sim.episode(0, 5_000_000_000, 2.5).collect();
    for m in &msgs {
        w.write(&m.topic, m.type_name, &m.cdr, m.stamp_ns, m.recv_ns).unwrap();
    }
    w.save_progress(BTreeMap::from([("/sim/oct/frame".to_string(), 7)])).unwrap();
    drop(w); // no finish: what a crash leaves (minus the unflushed tail)
    let ep_dir = dir.path().join("episodes/crashy");
    assert!(ep_dir.join(RECORDING_MARKER).exists());
    let r = recover_episode(&ep_dir).unwrap();
    assert!(r.messages > 0 && r.messages <= msgs.len() as u64);
    let ep = McapEpisode::open(&ep_dir).unwrap();
    assert!(ep.meta().recovered);
    assert_eq!(ep.meta().instruction, "keep me");
    assert_eq!(ep.meta().drops, BTreeMap::from([("/sim/oct/frame".to_string(), 7)]));
    let (kept, _) = scan_file(&ep_dir.join("crashy_0.mcap"));
    assert_prefix_of_sim(&sim, 2.5, &kept);
}

#[test]
fn crash_before_the_mcap_existed_recovers_an_empty_episode() {
    use vla_finetune::dataset::recovery::recover_all;
    let dir = tempfile::tempdir().unwrap();
    let ep = dir.path().join("episodes/early");
    std::fs::create_dir_all(&ep).unwrap();
    std::fs::write(ep.join(RECORDING_MARKER), "pid 1\n").unwrap();
    std::fs::write(ep.join("episode.json"), r#"{"id":"early","instruction":"i","task":"","operator":"","outcome":"","start_ns":5,"stop_ns":0,"recovered":false,"drops":{}}"#).unwrap();
    std::fs::write(ep.join("streams.yaml"), SimConfig::default().streams().to_yaml()).unwrap();
    let r = recover_all(dir.path());
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].as_ref().unwrap().messages, 0);
    let e = McapEpisode::open(&ep).unwrap();
    assert!(e.meta().recovered && e.complete());
    assert!(e.sensor("oct").unwrap().stamps.is_empty());
}
