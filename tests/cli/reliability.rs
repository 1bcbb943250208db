//! The fault corpus (issue 14): damaged, truncated and unreadable recordings, leftovers of killed
//! writers, a full disk at every byte, closed pipes, bad statistics and configs. Each test builds
//! its inputs, injects the faults and asserts: no panic, a clear error naming the thing, nothing
//! previously good lost. Counts are printed as `corpus <name>: ...` (docs/reliability.md).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vla_finetune::dataset::compile::{compile_lazily, CompileConfig, CompileOutput, CompileReport};
use vla_finetune::dataset::episode::{EpisodeMeta, EpisodeSource};
use vla_finetune::dataset::mcap_episode::{
    mcap_file_name, scan_mcap, scan_mcap_file, EpisodeWriter, McapEpisode, ScannedChannel, ScannedMessage,
    WriterOptions, RECORDING_MARKER,
};
use vla_finetune::dataset::reader::Dataset;
use vla_finetune::sim::SimConfig;

const BIN: &str = env!("CARGO_BIN_EXE_vla_finetune");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const START_NS: i64 = 1_700_000_000_000_000_000;

fn sim(seed: u64) -> SimConfig {
    SimConfig {
        seed,
        cameras: 1,
        width: 16,
        height: 12,
        camera_hz: 10.0,
        sensor_hz: 200.0,
        sensor_channels: 4,
        pose_hz: 50.0,
    }
}

/// Writes `seconds` of simulated episode `id` under `root` in chunks of about 8 KiB; `finish`
/// false leaves it as a crash would (flushed chunks, marker, no footer). Returns its folder.
fn write_episode(root: &Path, id: &str, seed: u64, seconds: f64, finish: bool) -> PathBuf {
    let s = sim(seed);
    let opts = WriterOptions { chunk_bytes: 8 << 10, ..Default::default() };
    let meta =
        EpisodeMeta { id: id.into(), instruction: s.scene(0).instruction(), start_ns: START_NS, ..Default::default() };
    let mut w = EpisodeWriter::create(root, meta, &s.streams(), opts).unwrap();
    for m in s.episode(0, START_NS, seconds) {
        w.write(&m.topic, m.type_name, &m.cdr, m.stamp_ns, m.recv_ns).unwrap();
    }
    let dir = w.dir().to_path_buf();
    if finish {
        w.finish("success", START_NS + (seconds * 1e9) as i64, BTreeMap::new()).unwrap();
    } else {
        w.flush().unwrap();
        drop(w);
    }
    dir
}

fn config() -> CompileConfig {
    let mut c = CompileConfig::default();
    c.align.sensor_window_s = 0.1;
    c.align.sensor_samples = 20;
    c.split.val_fraction = 0.34;
    c.store.encode_threads = 1;
    c
}

fn config_file(dir: &Path) -> PathBuf {
    let p = dir.join("compile.yaml");
    std::fs::write(&p, serde_yaml::to_string(&config()).unwrap()).unwrap();
    p
}

fn mcap_of(dir: &Path) -> PathBuf {
    dir.join(mcap_file_name(&dir.file_name().unwrap().to_string_lossy()))
}

/// (offset, op, total record length) of every whole record after the magic, by framing alone.
fn records(bytes: &[u8]) -> Vec<(usize, u8, usize)> {
    let mut out = Vec::new();
    let mut pos = 8;
    while pos + 9 <= bytes.len() {
        let len = u64::from_le_bytes(bytes[pos + 1..pos + 9].try_into().unwrap()) as usize;
        if pos + 9 + len > bytes.len() {
            break;
        }
        out.push((pos, bytes[pos], 9 + len));
        if bytes[pos] == 0x0F {
            break; // data end
        }
        pos += 9 + len;
    }
    out
}

const CHUNK: u8 = 0x06;

fn compile_dir(root: &Path, out: &Path) -> CompileOutput {
    let eps = vla_finetune::cli::open_recorded_episodes(root).unwrap();
    compile_lazily(&eps, &config(), out, true).unwrap()
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// The CLI run in `dir` (relative paths of config/train.yaml land there).
fn cli_in(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).current_dir(dir).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_no_panic(o: &std::process::Output, what: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked") && o.status.code() != Some(101), "{what}: panicked: {err}");
}

// ---------------------------------------------------------------- item 1, 2

#[test]
fn an_empty_recovered_episode_does_not_decide_the_streams() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rec");
    for (i, id) in ["ep1", "ep2", "ep3"].iter().enumerate() {
        write_episode(&root, id, i as u64, 2.0, true);
    }
    let alone = compile_dir(&root, &dir.path().join("good"));
    // "ep0" sorts first: an episode killed 0.6 s in, before any flush, recovered as 0 messages.
    let ep0 = write_episode(&root, "ep0", 9, 0.0, false);
    std::fs::write(ep0.join(RECORDING_MARKER), "pid 999999999\n").unwrap();
    let out = dir.path().join("ds");
    let o =
        cli(&["dataset", "compile", "--episodes", s(&root), "--config", s(&config_file(dir.path())), "--out", s(&out)]);
    assert_no_panic(&o, "compile");
    let ds = Dataset::open(&out).unwrap();
    let ids: Vec<&str> = ds.index.episodes.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["ep1", "ep2", "ep3"], "every good episode is compiled");
    assert_eq!(ds.len() as u64, alone.report.samples, "the same samples as without the empty episode");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let failed = report["failed_episodes"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["id"], "ep0");
    // Left out, so the exit status says the dataset is incomplete.
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn the_majority_decides_the_streams_not_the_first_episode() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rec");
    let odd = SimConfig { cameras: 2, ..sim(0) };
    let opts = WriterOptions::default();
    let meta = EpisodeMeta { id: "a-odd".into(), start_ns: START_NS, ..Default::default() };
    let mut w = EpisodeWriter::create(&root, meta, &odd.streams(), opts).unwrap();
    for m in odd.episode(0, START_NS, 2.0) {
        w.write(&m.topic, m.type_name, &m.cdr, m.stamp_ns, m.recv_ns).unwrap();
    }
    w.finish("success", START_NS, BTreeMap::new()).unwrap();
    write_episode(&root, "b", 1, 2.0, true);
    write_episode(&root, "c", 2, 2.0, true);
    let r = compile_dir(&root, &dir.path().join("ds")).report;
    assert_eq!(r.episodes.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["b", "c"]);
    assert_eq!(r.failed_episodes.len(), 1);
    assert!(
        r.failed_episodes[0].id == "a-odd" && r.failed_episodes[0].error.contains("expected cameras [\"camera0\"]"),
        "{:?}",
        r.failed_episodes
    );
}

#[test]
fn zero_samples_is_an_error_and_never_replaces_a_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rec");
    write_episode(&root, "ep1", 1, 2.0, true);
    write_episode(&root, "ep2", 2, 2.0, true);
    let out = dir.path().join("ds");
    compile_dir(&root, &out);
    let before = std::fs::read(out.join("index.json")).unwrap();
    let cfg = config_file(dir.path());
    // A mistyped --episodes path; then every episode unusable (a sensor window longer than them).
    let typo = dir.path().join("recc");
    let o = cli(&["dataset", "compile", "--episodes", s(&typo), "--config", s(&cfg), "--out", s(&out), "--overwrite"]);
    assert_no_panic(&o, "compile");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(1) && err.contains("no usable sample from 0 episode(s)") && err.contains("kept"),
        "{err}"
    );
    let mut long = config();
    long.align.sensor_window_s = 30.0;
    std::fs::write(&cfg, serde_yaml::to_string(&long).unwrap()).unwrap();
    let o = cli(&["dataset", "compile", "--episodes", s(&root), "--config", s(&cfg), "--out", s(&out), "--overwrite"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(1) && err.contains("no usable sample from 2 episode(s)"), "{err}");
    assert!(err.contains("they gave no sample time: none is longer than align.sensor_window_s"), "{err}");
    assert_eq!(std::fs::read(out.join("index.json")).unwrap(), before, "the good dataset is untouched");
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.contains("staging")), "{names:?}");
}

// ---------------------------------------------------------------- item 3, 4, 12

/// Damages a copy of a good episode: truncation at several fractions, a flipped byte in the
/// middle of each chunk. Every variant is compiled beside two good episodes; a variant either
/// compiles with its damage reported (hand-computed from the record framing) or is listed as
/// left out, and the good episodes are always compiled whole.
#[test]
fn damaged_recordings_report_what_was_read_and_lost() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rec");
    write_episode(&root, "good1", 1, 2.0, true);
    write_episode(&root, "good2", 2, 2.0, true);
    let bad = write_episode(&root, "bad", 3, 3.0, true);
    let path = mcap_of(&bad);
    let intact = std::fs::read(&path).unwrap();
    let recs = records(&intact);
    let chunks: Vec<(usize, usize)> = recs.iter().filter(|r| r.1 == CHUNK).map(|r| (r.0, r.2)).collect();
    assert!(chunks.len() >= 4, "the episode has {} chunks", chunks.len());
    let good_samples = samples_without(&root, &bad, dir.path());
    let faults = damaged_copies(&intact, &chunks);
    let (mut compiled_damaged, mut left_out) = (0, 0);
    for (i, (what, bytes)) in faults.iter().enumerate() {
        std::fs::write(&path, bytes).unwrap();
        let r = compile_dir(&root, &dir.path().join(format!("ds{i}"))).report;
        if compiled_with_its_damage(&r, what, bytes, &path, &chunks, good_samples) {
            compiled_damaged += 1;
        } else {
            left_out += 1;
        }
    }
    assert!(compiled_damaged >= chunks.len(), "{compiled_damaged} compiled with damage, {left_out} left out");
    // The CLI: exit status 3 unless --allow-losses, and `dataset info` names the damage.
    the_cli_reports_a_damaged_episode(&root, dir.path(), &path, &intact);
    println!("corpus damaged_mcap: {} inputs, {} faults injected ({compiled_damaged} compiled with the damage reported, {left_out} left out), panics 0, good samples lost 0", faults.len() + 2, faults.len());
}

/// Samples compiled from `root` with the episode folder `bad` moved aside (into `dir`) meanwhile.
fn samples_without(root: &Path, bad: &Path, dir: &Path) -> u64 {
    std::fs::rename(bad, dir.join("aside")).unwrap();
    let n = compile_dir(root, &dir.join("ref")).report.samples;
    std::fs::rename(dir.join("aside"), bad).unwrap();
    n
}

/// Named damaged copies of `intact`: cut at several fractions, a flipped byte in each chunk.
fn damaged_copies(intact: &[u8], chunks: &[(usize, usize)]) -> Vec<(String, Vec<u8>)> {
    let mut faults: Vec<(String, Vec<u8>)> = Vec::new();
    for pct in [10, 25, 50, 75, 90, 99] {
        faults.push((format!("cut at {pct} %"), intact[..intact.len() * pct / 100].to_vec()));
    }
    for (k, &(off, len)) in chunks.iter().enumerate() {
        let mut b = intact.to_vec();
        b[off + len / 2] ^= 0x5A;
        faults.push((format!("flipped byte in chunk {k}"), b));
    }
    faults
}

/// Checks the compile `r` of the variant `what` (`bytes`); true if `bad` compiled, false if left out.
fn compiled_with_its_damage(
    r: &CompileReport,
    what: &str,
    bytes: &[u8],
    path: &Path,
    chunks: &[(usize, usize)],
    good_samples: u64,
) -> bool {
    let good: u64 = r.episodes.iter().filter(|e| e.id.starts_with("good")).map(|e| e.samples).sum();
    assert_eq!(good, good_samples, "{what}: the good episodes are compiled whole");
    if let Some(f) = r.failed_episodes.iter().find(|f| f.id == "bad") {
        let unreadable = f.error.contains(&*path.to_string_lossy()) && f.error.contains("no readable chunk");
        assert!(unreadable || f.error.contains("(the recording is damaged: "), "{what}: {}", f.error);
        return false;
    }
    let ep = r.episodes.iter().find(|e| e.id == "bad").unwrap();
    let d = ep.damage.as_ref().unwrap_or_else(|| panic!("{what}: compiled with no damage reported"));
    assert_eq!(d.file_bytes, bytes.len() as u64, "{what}");
    let whole = records(bytes);
    if let Some(k) = what.strip_prefix("flipped byte in chunk ").map(|k| k.parse::<usize>().unwrap()) {
        assert_eq!(
            (d.records_lost, d.bytes_lost, d.chunks_read),
            (1, chunks[k].1 as u64, chunks.len() as u64 - 1),
            "{what}: {d:?}"
        );
        assert!(d.reasons[0].contains(&format!("chunk at byte {}", chunks[k].0)), "{what}: {:?}", d.reasons);
    } else {
        let read_chunks = whole.iter().filter(|r| r.1 == CHUNK).count() as u64;
        let reached_end = whole.last().is_some_and(|r| r.1 == 0x0F);
        let end = whole.last().map_or(8, |r| r.0 + if reached_end { 0 } else { r.2 });
        let lost = if reached_end { 0 } else { bytes.len() - end } as u64;
        assert_eq!((d.chunks_read, d.bytes_lost, d.records_lost), (read_chunks, lost, 0), "{what}: {d:?}");
    }
    true
}

/// `path` cut in half, compiled by the CLI: exit status 3, then 0 with --allow-losses; `dataset info` names it.
fn the_cli_reports_a_damaged_episode(root: &Path, dir: &Path, path: &Path, intact: &[u8]) {
    std::fs::write(path, &intact[..intact.len() / 2]).unwrap();
    let cfg = config_file(dir);
    let out = dir.join("cli");
    let o = cli(&["dataset", "compile", "--episodes", s(root), "--config", s(&cfg), "--out", s(&out)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(3) && err.contains("episode `bad` is damaged") && err.contains("bytes lost"),
        "{err}"
    );
    let o = cli(&[
        "dataset",
        "compile",
        "--episodes",
        s(root),
        "--config",
        s(&cfg),
        "--out",
        s(&out),
        "--overwrite",
        "--allow-losses",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let info = cli(&["dataset", "info", s(&out)]);
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        text.contains("damaged recordings (compiled from what could be read): 1") && text.contains("damaged `bad`"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_slice(&cli(&["dataset", "info", s(&out), "--json"]).stdout).unwrap();
    assert_eq!(json["episodes"]["damaged"][0]["id"], "bad");
}

/// A fault: its name, what it does to an episode folder, what the error must say.
type Fault = (&'static str, fn(&Path), &'static str);

#[test]
fn one_unreadable_episode_is_listed_and_the_rest_compiled() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rec");
    write_episode(&root, "good1", 1, 2.0, true);
    write_episode(&root, "good2", 2, 2.0, true);
    let faults: [Fault; 5] = [
        (
            "cut inside its first chunk",
            |d| {
                let p = mcap_of(d);
                let b = std::fs::read(&p).unwrap();
                let (off, len) = records(&b).iter().find(|r| r.1 == CHUNK).map(|r| (r.0, r.2)).unwrap();
                std::fs::write(&p, &b[..off + len / 2]).unwrap();
            },
            "no readable chunk",
        ),
        (
            "bad CRC in its only chunk",
            |d| {
                let p = mcap_of(d);
                let mut b = std::fs::read(&p).unwrap();
                let (off, len) = records(&b).iter().find(|r| r.1 == CHUNK).map(|r| (r.0, r.2)).unwrap();
                b[off + len - 3] ^= 0xFF;
                std::fs::write(&p, b).unwrap();
            },
            "no readable chunk",
        ),
        ("garbage episode.json", |d| std::fs::write(d.join("episode.json"), b"{\"id\": 3,,").unwrap(), "episode.json"),
        (
            "the MCAP is a directory",
            |d| {
                let p = mcap_of(d);
                std::fs::remove_file(&p).unwrap();
                std::fs::create_dir(&p).unwrap();
            },
            "_0.mcap",
        ),
        ("no streams.yaml", |d| std::fs::remove_file(d.join("streams.yaml")).unwrap(), "streams.yaml"),
    ];
    for (i, (what, damage, expected)) in faults.iter().enumerate() {
        let id = format!("bad{i}");
        let bad = write_episode(&root, &id, 3, if i == 1 { 0.1 } else { 2.0 }, true);
        damage(&bad);
        let r = compile_dir(&root, &dir.path().join(format!("ds{i}"))).report;
        assert_eq!(r.episodes.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["good1", "good2"], "{what}");
        assert_eq!(r.failed_episodes.len(), 1, "{what}");
        assert!(
            r.failed_episodes[0].id == id && r.failed_episodes[0].error.contains(expected),
            "{what}: {:?}",
            r.failed_episodes[0]
        );
        std::fs::remove_dir_all(&bad).unwrap();
    }
    println!(
        "corpus unreadable_episode: {} inputs, {} faults injected, panics 0, good episodes lost 0",
        faults.len() + 2,
        faults.len()
    );
}

#[test]
fn a_recording_truncated_under_the_reader_does_not_crash_it() {
    let dir = tempfile::tempdir().unwrap();
    let ep = write_episode(dir.path(), "ep", 1, 2.0, true);
    let src = McapEpisode::open(&ep).unwrap();
    let stamps = src.camera_stamps("camera0").unwrap();
    let first: Vec<_> = (0..stamps.len()).map(|i| src.camera_frame("camera0", i).unwrap()).collect();
    // Shrink the file under the open reader (a map of it would raise SIGBUS on the next read).
    std::fs::OpenOptions::new().write(true).open(mcap_of(&ep)).unwrap().set_len(100).unwrap();
    for (i, f) in first.iter().enumerate() {
        assert_eq!(&src.camera_frame("camera0", i).unwrap(), f, "frame {i}");
    }
}

// ---------------------------------------------------------------- item 5, 15

#[test]
fn compile_recovers_a_kill_9_leftover_and_names_a_live_recording() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rec");
    write_episode(&root, "good", 1, 2.0, true);
    let killed = write_episode(&root, "killed", 2, 2.0, false);
    let flushed: usize = {
        let b = std::fs::read(mcap_of(&killed)).unwrap();
        let mut n = 0;
        scan_mcap(&b, &mut HashMap::new(), |_, _| n += 1);
        n
    };
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    std::fs::write(killed.join(RECORDING_MARKER), format!("pid {dead}\n")).unwrap();
    let live = write_episode(&root, "live", 3, 1.0, false); // marker: this test's own pid
    let r = compile_dir(&root, &dir.path().join("ds")).report;
    assert_eq!(r.episodes.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["good", "killed"]);
    assert!(!killed.join(RECORDING_MARKER).exists());
    let ep = McapEpisode::open(&killed).unwrap();
    assert!(ep.meta().recovered && ep.complete());
    assert_eq!(ep.counts().values().sum::<u64>() as usize, flushed, "every flushed message kept");
    let f = &r.failed_episodes[0];
    assert!(
        f.id == "live" && f.error.contains(&format!("still being recorded by pid {}", std::process::id())),
        "{f:?}"
    );
    assert!(live.join(RECORDING_MARKER).exists(), "a live recording is not touched");
}

#[test]
fn leftovers_of_killed_writers_are_removed_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rec");
    write_episode(&root, "good", 1, 2.0, true);
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    // A compile killed mid-write (its staging folder) and one killed after moving its dataset in,
    // before removing the one it replaced (old folder beside the dataset).
    let out = dir.path().join("ds");
    compile_dir(&root, &out);
    let stale = [dir.path().join(format!(".ds.staging-{dead}")), dir.path().join(format!(".ds.old-{dead}"))];
    for p in &stale {
        std::fs::create_dir_all(p.join("x")).unwrap();
    }
    // One of a compile that still runs is left alone.
    let mut running = Command::new("sleep").arg("60").spawn().unwrap();
    let live = dir.path().join(format!(".ds.staging-{}", running.id()));
    std::fs::create_dir(&live).unwrap();
    let o = cli(&[
        "dataset",
        "compile",
        "--episodes",
        s(&root),
        "--config",
        s(&config_file(dir.path())),
        "--out",
        s(&out),
        "--overwrite",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stale.iter().all(|p| !p.exists()), "stale compile folders removed");
    assert!(live.exists(), "a running compile's folder is kept");
    // ... and listed in report.json and on stdout.
    let report: vla_finetune::dataset::compile::CompileReport =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let mut removed = report.removed_leftovers;
    let mut want = stale.to_vec();
    removed.sort();
    want.sort();
    assert_eq!(removed, want);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stale.iter().all(|p| stdout.contains(&format!("removed {} (left by a compile that was killed)", p.display()))),
        "{stdout}"
    );
    running.kill().unwrap();
    running.wait().unwrap();
    // An import killed right after making its folder: only the marker.
    let id_dir = dir.path().join("imp/episodes/bag1");
    std::fs::create_dir_all(&id_dir).unwrap();
    std::fs::write(id_dir.join(RECORDING_MARKER), format!("pid {dead}\n")).unwrap();
    let bag = Path::new(ROOT).join("tests/fixtures/rosbag/all_types");
    let streams = Path::new(ROOT).join("tests/fixtures/rosbag/streams.yaml");
    let o =
        cli(&["import-bag", s(&bag), "--streams", s(&streams), "--out", s(&dir.path().join("imp")), "--id", "bag1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["removed_leftover"], true);
    assert!(!id_dir.join(RECORDING_MARKER).exists() && id_dir.join("episode.json").exists());
}

// ---------------------------------------------------------------- item 10

/// A disk that fills at every byte offset of a small episode: each write that fails is an
/// error, the writer is never used after it, nothing panics, and what was flushed is readable.
#[test]
fn a_full_disk_at_every_byte_is_an_error_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let s = sim(4);
    let msgs: Vec<_> = s.episode(0, START_NS, 0.3).collect();
    let opts = |max_bytes| WriterOptions {
        chunk_bytes: 2 << 10,
        flush_interval_ns: 20_000_000,
        max_bytes,
        ..Default::default()
    };
    let size = {
        let meta = EpisodeMeta { id: "e".into(), start_ns: START_NS, ..Default::default() };
        let mut w = EpisodeWriter::create(&dir.path().join("full"), meta, &s.streams(), opts(None)).unwrap();
        for m in &msgs {
            w.write(&m.topic, m.type_name, &m.cdr, m.stamp_ns, m.recv_ns).unwrap();
        }
        let d = w.dir().to_path_buf();
        w.finish("success", START_NS, BTreeMap::new()).unwrap();
        std::fs::metadata(mcap_of(&d)).unwrap().len()
    };
    let (mut failed, mut finished) = (0u64, 0u64);
    for limit in (0..=size + 16).step_by(7) {
        let root = dir.path().join(format!("q{limit}"));
        let opts = opts(Some(limit));
        let meta = EpisodeMeta { id: "e".into(), start_ns: START_NS, ..Default::default() };
        let mut w = match EpisodeWriter::create(&root, meta, &s.streams(), opts) {
            Ok(w) => w,
            Err(e) => {
                assert!(e.to_string().contains("quota"), "limit {limit}: {e}");
                failed += 1;
                continue;
            }
        };
        let mut err = None;
        for m in &msgs {
            if let Err(e) = w.write(&m.topic, m.type_name, &m.cdr, m.stamp_ns, m.recv_ns) {
                err = Some(e);
                break;
            }
        }
        let dir_e = w.dir().to_path_buf();
        let outcome = match err {
            Some(e) => {
                // After a failed write, another write is refused (not a panic) ...
                let again = w.write(&msgs[0].topic, msgs[0].type_name, &msgs[0].cdr, msgs[0].stamp_ns, msgs[0].recv_ns);
                assert!(again.is_err(), "limit {limit}");
                let _ = e;
                w.abandon("aborted", START_NS, BTreeMap::new());
                Err(())
            }
            None => w.finish("success", START_NS, BTreeMap::new()).map(|_| ()).map_err(|_| ()),
        };
        match outcome {
            Ok(()) => finished += 1,
            Err(()) => {
                failed += 1;
                assert!(
                    dir_e.join(RECORDING_MARKER).exists(),
                    "limit {limit}: a failed episode keeps its marker for recovery"
                );
                let r = vla_finetune::dataset::recovery::recover_episode(&dir_e)
                    .unwrap_or_else(|e| panic!("limit {limit}: {e}"));
                assert!(r.messages as usize <= msgs.len());
            }
        }
    }
    assert!(failed > 10 && finished >= 1, "{failed} failed, {finished} finished");
    println!("corpus full_disk_quota: {} disk sizes tried, {failed} full-disk faults, panics 0", failed + finished);
}

/// `record --sim` into a real 1 MiB tmpfs: the episode stops with an error, no panic, and the
/// next compile reads what reached the disk.
#[test]
fn record_on_a_full_tmpfs_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("tiny");
    std::fs::create_dir(&mnt).unwrap();
    let m = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .output()
        .expect("running mount");
    assert!(
        m.status.success(),
        "this test needs to mount a 1 MiB tmpfs (run as root or with CAP_SYS_ADMIN): {}",
        String::from_utf8_lossy(&m.stderr)
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let root = mnt.join("rec");
    let o = Command::new(BIN)
        .args([
            "record",
            "--sim",
            "--episodes",
            "1",
            "--seconds",
            "30",
            "--cameras",
            "1",
            "--width",
            "64",
            "--height",
            "48",
            "--out",
        ])
        .arg(&root)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_no_panic(&o, "record on a full disk");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("No space left") || err.contains("StorageFull") || err.contains("storage full"), "{err}");
    let eps = vla_finetune::cli::open_recorded_episodes(&root).unwrap();
    assert_eq!(eps.len(), 1);
    // Readable, or (the disk being still full) unreadable for want of space to recover it.
    let why = eps[0].unreadable.clone().or_else(|| (eps[0].open)().unreadable());
    assert!(why.as_ref().is_none_or(|e| e.contains("recovering")), "{why:?}");
}

// ---------------------------------------------------------------- items 6, 7, 9, 15 (train)

fn train_config(dir: &Path) -> (PathBuf, PathBuf) {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    (Path::new(ROOT).join("config/train.yaml"), state)
}

#[test]
fn train_refuses_an_existing_state_without_resume_or_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, state) = train_config(dir.path());
    std::fs::write(state.join("latest.safetensors"), b"state").unwrap();
    std::fs::write(state.join(".latest.safetensors.tmp"), b"half").unwrap();
    let set = format!("checkpoint.state_dir={}", state.display());
    let log = format!("progress.log_file={}", dir.path().join("p.jsonl").display());
    let o = cli_in(dir.path(), &["train", "--config", s(&cfg), "--set", &set, "--set", &log, "--quiet"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("pass --resume to continue it or --fresh"), "{err}");
    assert_eq!(std::fs::read(state.join("latest.safetensors")).unwrap(), b"state", "the state is untouched");
    // --fresh goes on (and fails later on this machine's missing model): the lock was taken and
    // the leftover of a killed state write removed and reported.
    let o = cli_in(dir.path(), &["train", "--config", s(&cfg), "--set", &set, "--set", &log, "--quiet", "--fresh"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_no_panic(&o, "train --fresh");
    assert!(err.contains(".latest.safetensors.tmp (left by an interrupted run)"), "{err}");
    assert!(!state.join(".latest.safetensors.tmp").exists());
    let o = cli_in(dir.path(), &["train", "--config", s(&cfg), "--set", &set, "--resume", "--fresh"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be used with"), "--resume and --fresh conflict");
}

#[test]
fn a_second_training_on_a_state_folder_is_refused_with_the_first_pid() {
    use vla_finetune::train::guard::StateLock;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let first = StateLock::acquire(&state).unwrap();
    let e = StateLock::acquire(&state).unwrap_err().to_string();
    assert!(
        e.contains(&format!("another training (pid {})", std::process::id())) && e.contains(&*state.to_string_lossy()),
        "{e}"
    );
    drop(first);
    drop(StateLock::acquire(&state).unwrap());
    // A holder killed with -9 releases the lock (the kernel drops its flock).
    let py = Path::new(ROOT).join(".venv/bin/python");
    let code = "import fcntl,os,sys,time\nf=open(sys.argv[1],'a+')\nfcntl.flock(f,fcntl.LOCK_EX)\nf.truncate(0); f.write(str(os.getpid())); f.flush()\nprint('held', flush=True)\ntime.sleep(60)";
    let mut child =
        Command::new(py).args(["-c", code]).arg(state.join("train.lock")).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "held");
    let e = StateLock::acquire(&state).unwrap_err().to_string();
    assert!(e.contains(&format!("pid {}", child.id())), "{e}");
    child.kill().unwrap();
    child.wait().unwrap();
    let lock = StateLock::acquire(&state).unwrap();
    assert_eq!(std::fs::read_to_string(state.join("train.lock")).unwrap().trim(), std::process::id().to_string());
    drop(lock);
}

#[test]
fn train_on_a_missing_gpu_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, state) = train_config(dir.path());
    let set = format!("checkpoint.state_dir={}", state.display());
    let o =
        cli_in(dir.path(), &["train", "--config", s(&cfg), "--set", &set, "--set", "run.device=cuda:99", "--quiet"]);
    assert_no_panic(&o, "train on cuda:99");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("run.device: device `cuda:99`: CUDA device 99 is not available"),
        "{err}"
    );
}

#[test]
fn config_type_errors_name_the_key_and_where_the_value_came_from() {
    use vla_finetune::train::config::TrainConfig;
    let path = Path::new(ROOT).join("config/train.yaml");
    let e = TrainConfig::load(&path, &["run.epochs=abc".parse().unwrap()]).unwrap_err().to_string();
    assert!(e.contains("`run.epochs` (from --set)") && e.contains("invalid type") && !e.contains("train.yaml"), "{e}");
    let text = std::fs::read_to_string(&path).unwrap().replacen("epochs:", "epochs: [1]\n  _was:", 1);
    let e = TrainConfig::from_yaml(&text, "config/train.yaml", &[]).unwrap_err().to_string();
    assert!(e.contains("config/train.yaml") && e.contains("line"), "{e}");
}

#[test]
fn a_checkpoints_root_or_its_latest_means_the_latest_version() {
    use vla_finetune::checkpoint::publish::{resolve_checkpoint_dir, PublishItem, PublishRequest, Publisher, Source};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    let p = Publisher::new(&root).unwrap();
    let req = PublishRequest {
        base_model_id: "m".into(),
        metrics: BTreeMap::new(),
        info: serde_json::json!({}),
        items: vec![PublishItem { dest: "a.txt".into(), source: Source::Bytes(b"x".to_vec()) }],
    };
    p.publish(&req).unwrap();
    let v2 = p.publish(&req).unwrap().dir;
    assert_eq!(resolve_checkpoint_dir(&root).unwrap(), v2);
    assert_eq!(resolve_checkpoint_dir(&root.join("latest")).unwrap(), v2);
    assert_eq!(resolve_checkpoint_dir(&root.join("v0001")).unwrap(), root.join("v0001"));
    std::fs::write(root.join("latest"), "v0009\n").unwrap();
    let e = resolve_checkpoint_dir(&root).unwrap_err().to_string();
    assert!(e.contains("latest") && e.contains("v0009"), "{e}");
    // `train` resolves `model.stage1_checkpoint` the same way before anything starts.
    let (cfg, state) = train_config(dir.path());
    let stage1 = format!("model.stage1_checkpoint={}", root.join("latest").display());
    let set = format!("checkpoint.state_dir={}", state.display());
    let o = cli_in(dir.path(), &["train", "--config", s(&cfg), "--set", &stage1, "--set", &set, "--quiet"]);
    assert_no_panic(&o, "train from a bad latest");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("model.stage1_checkpoint")
            && err.contains("names `v0009`, which is not a published version"),
        "{err}"
    );
}

// ---------------------------------------------------------------- item 8

#[test]
fn statistics_shorter_than_the_data_are_an_error_naming_the_list() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rec");
    write_episode(&root, "ep1", 1, 2.0, true);
    write_episode(&root, "ep2", 2, 2.0, true);
    let out = dir.path().join("ds");
    compile_dir(&root, &out);
    let good = std::fs::read_to_string(out.join("stats.json")).unwrap();
    let mut tried = 0;
    for (field, list) in [("sensor", "std"), ("action", "std"), ("state", "q99"), ("sensor", "mean")] {
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        let arr = v[field][list].as_array_mut().unwrap();
        arr.pop();
        std::fs::write(out.join("stats.json"), serde_json::to_vec(&v).unwrap()).unwrap();
        let e = Dataset::open(&out).unwrap_err().to_string();
        assert!(e.contains("stats.json") && e.contains(field) && e.contains("values; expected"), "{field}.{list}: {e}");
        tried += 1;
    }
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["state"]["std"][0] = serde_json::json!(null);
    std::fs::write(out.join("stats.json"), serde_json::to_vec(&v).unwrap()).unwrap();
    assert!(Dataset::open(&out).unwrap_err().to_string().contains("stats.json"));
    println!("corpus stats_lengths: {} inputs, {} faults injected, panics 0", tried + 2, tried + 1);
}

// ---------------------------------------------------------------- item 11

#[test]
fn a_closed_stdout_pipe_ends_the_cli_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rec");
    write_episode(&root, "ep1", 1, 2.0, true);
    write_episode(&root, "ep2", 2, 2.0, true);
    let out = dir.path().join("ds");
    compile_dir(&root, &out);
    for args in [vec!["dataset", "info", s(&out), "--json"], vec!["dataset", "info", s(&out)], vec!["--help"]] {
        let mut child = Command::new(BIN).args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take()); // the reader is gone before anything is written
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{args:?}: {err}");
        assert!(o.status.success() || o.status.signal() == Some(libc_sigpipe()), "{args:?}: {:?}", o.status);
    }
}

fn libc_sigpipe() -> i32 {
    13
}

// ---------------------------------------------------------------- property-based parser tests

mod props {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    use std::cell::Cell;
    use vla_finetune::dataset::cdr::{self, MsgType, RosMessage};

    /// One edit of a byte string: flip a byte, cut, insert a byte, or write a little-endian u64
    /// (a length field gone wild).
    #[derive(Debug, Clone)]
    enum Edit {
        Flip(usize, u8),
        Cut(usize),
        Insert(usize, u8),
        Word(usize, u64),
    }

    fn edits() -> impl Strategy<Value = Vec<Edit>> {
        let edit = prop_oneof![
            (any::<usize>(), 1..=255u8).prop_map(|(p, v)| Edit::Flip(p, v)),
            any::<usize>().prop_map(Edit::Cut),
            (any::<usize>(), any::<u8>()).prop_map(|(p, v)| Edit::Insert(p, v)),
            (any::<usize>(), any::<u64>()).prop_map(|(p, v)| Edit::Word(p, v)),
        ];
        prop::collection::vec(edit, 1..6)
    }

    fn apply(base: &[u8], edits: &[Edit]) -> Vec<u8> {
        let mut b = base.to_vec();
        for e in edits {
            let n = b.len().max(1);
            match *e {
                Edit::Flip(p, v) if !b.is_empty() => b[p % n] ^= v,
                Edit::Cut(p) => b.truncate(p % n),
                Edit::Insert(p, v) => b.insert(p % (b.len() + 1), v),
                Edit::Word(p, v) if b.len() >= 8 => {
                    let at = p % (b.len() - 7);
                    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
                _ => {}
            }
        }
        b
    }

    /// Runs `cases` mutations of `base` through `check` (true: accepted, false: an error) on a
    /// thread with a deadline, so a hang fails the test; a panic fails it through proptest.
    fn fuzz(name: &str, base: Vec<u8>, cases: u32, check: impl Fn(&[u8]) -> bool + Send + 'static) {
        let (tx, rx) = std::sync::mpsc::channel();
        let name = name.to_string();
        std::thread::spawn(move || {
            // A fixed seed: the same inputs every run, so the counts in docs/reliability.md hold.
            let rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
            let mut runner =
                TestRunner::new_with_rng(Config { cases, failure_persistence: None, ..Config::default() }, rng);
            let (ok, err) = (Cell::new(0u64), Cell::new(0u64));
            let r = runner.run(&edits(), |e| {
                let b = apply(&base, &e);
                if check(&b) {
                    ok.set(ok.get() + 1)
                } else {
                    err.set(err.get() + 1)
                }
                Ok(())
            });
            let _ = tx.send(r.map(|()| (ok.get(), err.get())).map_err(|e| e.to_string()));
        });
        let (ok, err) = rx
            .recv_timeout(std::time::Duration::from_secs(600))
            .unwrap_or_else(|_| panic!("{name}: a parser hung (or panicked the runner)"))
            .unwrap();
        assert!(err > 0, "{name}: no mutation was rejected; the parser checks nothing");
        println!(
            "corpus prop_{name}: {} inputs ({ok} accepted, {err} rejected with an error), panics 0, hangs 0",
            ok + err
        );
    }

    /// Every decoder of `t` on `b`; true when the message decodes.
    fn decode(t: MsgType, b: &[u8]) -> bool {
        let _ = t.header_stamp(b);
        let ok = match t {
            MsgType::Image => cdr::Image::decode(b).is_ok() & cdr::ImageView::parse(b).is_ok(),
            MsgType::CompressedImage => cdr::CompressedImage::decode(b).is_ok(),
            MsgType::JointState => cdr::JointState::decode(b).is_ok(),
            MsgType::PoseStamped => cdr::PoseStamped::decode(b).is_ok(),
            MsgType::WrenchStamped => cdr::WrenchStamped::decode(b).is_ok(),
            MsgType::Float32MultiArray => cdr::Float32MultiArray::decode(b).is_ok(),
            MsgType::SensorFrame => cdr::SensorFrame::decode(b).is_ok(),
        };
        if matches!(t, MsgType::Image | MsgType::CompressedImage) {
            let _ = vla_finetune::dataset::mcap_episode::decode_image(t, b);
        }
        ok
    }

    #[test]
    fn cdr_decoders_never_panic() {
        let s = sim(7);
        let mut seen = std::collections::BTreeSet::new();
        for m in s.episode(0, START_NS, 0.2) {
            if seen.insert(m.type_name) {
                let t = MsgType::parse(m.type_name).unwrap();
                fuzz(&format!("cdr_{}", t.name().rsplit('/').next().unwrap()), m.cdr.clone(), 400, move |b| {
                    decode(t, b)
                });
            }
        }
        let others = [
            cdr::JointState { name: vec!["j1".into(), "j2".into()], position: vec![0.5, -1.0], ..Default::default() }
                .encode(),
            cdr::WrenchStamped { force: [1.0, 2.0, 3.0], torque: [0.1, 0.2, 0.3], ..Default::default() }.encode(),
            cdr::Float32MultiArray { data: vec![1.0, 2.0, 3.0], ..Default::default() }.encode(),
            cdr::CompressedImage { format: "jpeg".into(), data: vec![0xFF, 0xD8, 0xFF, 0xD9], ..Default::default() }
                .encode(),
        ];
        for (t, b) in
            [MsgType::JointState, MsgType::WrenchStamped, MsgType::Float32MultiArray, MsgType::CompressedImage]
                .into_iter()
                .zip(others)
        {
            fuzz(&format!("cdr_{}", t.name().rsplit('/').next().unwrap()), b, 400, move |x| decode(t, x));
        }
    }

    #[test]
    fn mcap_reader_and_recovery_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let ep = write_episode(dir.path(), "ep", 5, 1.0, true);
        let base = std::fs::read(mcap_of(&ep)).unwrap();
        let work = dir.path().join("work");
        let (ep2, work2) = (ep.clone(), work.clone());
        fuzz("mcap_reader", base.clone(), 300, move |b| {
            std::fs::write(mcap_of(&ep2), b).unwrap();
            match McapEpisode::open(&ep2) {
                Ok(e) => {
                    let n = e.camera_stamps("camera0").map(|s| s.len()).unwrap_or(0);
                    for i in 0..n {
                        let _ = e.camera_frame("camera0", i);
                    }
                    let _ = (e.sensor("oct"), e.state(), e.damage());
                    e.damage().is_none()
                }
                Err(err) => {
                    assert!(err.to_string().contains("ep_0.mcap"), "{err}");
                    false
                }
            }
        });
        fuzz("mcap_recovery", base, 150, move |b| {
            let _ = std::fs::remove_dir_all(&work2);
            let d = work2.join("episodes/ep");
            std::fs::create_dir_all(&d).unwrap();
            for f in ["episode.json", "streams.yaml"] {
                std::fs::copy(ep.join(f), d.join(f)).unwrap();
            }
            std::fs::write(mcap_of(&d), b).unwrap();
            std::fs::write(d.join(RECORDING_MARKER), "pid 999999999\n").unwrap();
            let r = vla_finetune::dataset::recovery::recover_episode(&d).unwrap();
            let e = McapEpisode::open(&d);
            // A recovered file is complete, whatever it was.
            assert!(e.as_ref().map_or(r.messages == 0, |e| e.complete()), "{:?}", e.err());
            r.stopped.is_none()
        });
    }

    /// The file scan (`import-bag`: a record at a time) finds what the in-memory scan finds, on
    /// every mutation: the same channels, messages (chunk, position, times, bytes) and end.
    #[test]
    fn mcap_file_scan_equals_the_in_memory_scan() {
        let dir = tempfile::tempdir().unwrap();
        let ep = write_episode(dir.path(), "ep", 6, 1.0, true);
        let base = std::fs::read(mcap_of(&ep)).unwrap();
        let path = dir.path().join("mutated.mcap");
        /// Channel, log and publish time, bytes, chunk, position in the chunk.
        type Message = (u16, u64, u64, Vec<u8>, Option<usize>, usize);
        type Seen = (HashMap<u16, ScannedChannel>, Vec<Message>);
        fn collect(out: &mut Vec<Message>, m: ScannedMessage<'_>) {
            out.push((m.channel, m.log_time, m.publish_time, m.data.into_owned(), m.chunk, m.ordinal));
        }
        fuzz("mcap_file_scan", base, 300, move |b| {
            let mut memory: Seen = Default::default();
            let end = scan_mcap(b, &mut memory.0, |_, m| collect(&mut memory.1, m));
            std::fs::write(&path, b).unwrap();
            let mut file: Seen = Default::default();
            let file_end =
                scan_mcap_file(&std::fs::File::open(&path).unwrap(), &mut file.0, |_, m| collect(&mut file.1, m))
                    .unwrap();
            assert_eq!(file_end, end);
            assert!(file == memory, "{} messages from the file, {} in memory", file.1.len(), memory.1.len());
            end.complete && end.lost.is_empty()
        });
    }

    #[test]
    fn dataset_files_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rec");
        write_episode(&root, "ep1", 1, 1.0, true);
        write_episode(&root, "ep2", 2, 1.0, true);
        let out = dir.path().join("ds");
        compile_dir(&root, &out);
        let shard = out.join("shard-00000.safetensors");
        let good_shard = std::fs::read(&shard).unwrap();
        // Only the header is mutated: the 8-byte length and the JSON table.
        let n = u64::from_le_bytes(good_shard[..8].try_into().unwrap()) as usize;
        let header = good_shard[..8 + n].to_vec();
        let (body, s2) = (good_shard[8 + n..].to_vec(), shard.clone());
        fuzz("safetensors_header", header, 400, move |h| {
            std::fs::write(&s2, [h, &body[..]].concat()).unwrap();
            match vla_finetune::dataset::store::ShardReader::open(&s2) {
                Ok(r) => {
                    let mut v = Vec::new();
                    let ok = r.f32_row("state", 0, 6, &mut v).is_ok() & r.jpeg("camera0", 0).is_ok();
                    let _ = r.f32_row("sensor", 1, 80, &mut v);
                    ok
                }
                Err(e) => {
                    assert!(e.to_string().contains("shard-00000.safetensors"), "{e}");
                    false
                }
            }
        });
        std::fs::write(&shard, &good_shard).unwrap();
        let stats = std::fs::read(out.join("stats.json")).unwrap();
        let o2 = out.clone();
        fuzz("stats_json", stats, 300, move |b| {
            std::fs::write(o2.join("stats.json"), b).unwrap();
            match Dataset::open(&o2) {
                Ok(d) => d.sample(0).is_ok(),
                Err(e) => {
                    assert!(e.to_string().contains("stats.json"), "{e}");
                    false
                }
            }
        });
        let ep = root.join("episodes/ep1");
        let meta = std::fs::read(ep.join("episode.json")).unwrap();
        fuzz("episode_json", meta, 300, move |b| {
            std::fs::write(ep.join("episode.json"), b).unwrap();
            vla_finetune::dataset::mcap_episode::read_episode_json(&ep).is_ok()
        });
    }

    #[test]
    fn config_parsers_never_panic() {
        use vla_finetune::dataset::streams::StreamConfig;
        use vla_finetune::train::config::TrainConfig;
        let train = std::fs::read(Path::new(ROOT).join("config/train.yaml")).unwrap();
        fuzz("train_yaml", train, 300, |b| {
            TrainConfig::from_yaml(&String::from_utf8_lossy(b), "train.yaml", &["run.epochs=2".parse().unwrap()])
                .is_ok()
        });
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.yaml");
        let compile_yaml = std::fs::read(Path::new(ROOT).join("config/compile.yaml")).unwrap();
        fuzz("compile_yaml", compile_yaml, 300, move |b| {
            std::fs::write(&p, b).unwrap();
            CompileConfig::from_yaml_file(&p).is_ok()
        });
        let streams = sim(0).streams().to_yaml().into_bytes();
        fuzz("streams_yaml", streams, 300, |b| {
            StreamConfig::from_yaml(&String::from_utf8_lossy(b), "streams.yaml").is_ok()
        });
    }
}

#[test]
fn latest_never_moves_to_a_worse_version_on_the_same_data() {
    use vla_finetune::checkpoint::publish::{PublishItem, PublishRequest, Publisher, Source};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    let req = |err: f64, stats: &[u8]| PublishRequest {
        base_model_id: "m".into(),
        metrics: BTreeMap::from([("val_action_error_mm".to_string(), err)]),
        info: serde_json::json!({}),
        items: vec![PublishItem { dest: "stats.json".into(), source: Source::Bytes(stats.to_vec()) }],
    };
    // An earlier training left v0001 (17.9) as latest; a restarted one publishes on the same data.
    let v1 =
        Publisher::new(&root).unwrap().guard_latest("val_action_error_mm").unwrap().publish(&req(17.9, b"A")).unwrap();
    assert!(v1.latest);
    let p = Publisher::new(&root).unwrap().guard_latest("val_action_error_mm").unwrap();
    let cases = [
        (28.3, &b"A"[..], false, "v0001"),
        (10.0, b"A", true, "v0003"),
        (12.0, b"A", true, "v0004"),
        (50.0, b"B", true, "v0005"),
    ];
    for (err, stats, moves, latest) in cases {
        let got = p.publish(&req(err, stats)).unwrap();
        assert_eq!(got.latest, moves, "{err} on {stats:?}");
        assert!(got.dir.is_dir(), "a worse version is kept");
        assert_eq!(p.latest().unwrap().as_deref(), Some(latest), "{err} on {stats:?}");
    }
}
