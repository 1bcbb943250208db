//! kill -9 of the real CLI at seeded random points of `dataset compile` and of `train-heads`
//! (feature computation, optimizer steps, validation, state saves, publication). After each kill
//! the previously good outputs are intact: the compiled dataset opens with the same samples,
//! `latest` names a verifiable version, every published version verifies, and a saved training
//! state loads. The next uninterrupted run succeeds and removes the leftovers. Counts are printed
//! as `corpus kill9_<name>: ...` (docs/reliability.md).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vla_finetune::checkpoint::publish::{verify, Publisher};
use vla_finetune::dataset::compile::{compile_lazily, CompileConfig, CompileReport};
use vla_finetune::dataset::reader::Dataset;
use vla_finetune::dataset::rng::SplitMix64;
use vla_finetune::train::state::read_state_meta;

const BIN: &str = env!("CARGO_BIN_EXE_vla_finetune");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Records `episodes` simulated episodes of `seconds` (one 56x56 camera) under `dir/rec`.
fn record(dir: &Path, episodes: u64, seconds: f64) -> PathBuf {
    let rec = dir.join("rec");
    vla_finetune::cli::record::run(vla_finetune::cli::record::RecordArgs {
        sim: true,
        episodes,
        seconds,
        out: rec.clone(),
        seed: 3,
        cameras: 1,
        width: 56,
        height: 56,
        camera_hz: 10.0,
        sensor_hz: 650.0,
        pose_hz: 100.0,
        realtime: false,
        queue: 4096,
        queue_mb: 64,
        compression: vla_finetune::dataset::mcap_episode::Compression::Zstd,
        operator: "test".into(),
        json: false,
    })
    .unwrap();
    rec
}

fn compile_config() -> CompileConfig {
    let mut cc = CompileConfig::default();
    cc.align.sensor_window_s = 0.05;
    cc.align.sensor_samples = 16;
    cc.split.val_fraction = 0.34;
    cc.split.seed = 3;
    cc.store.encode_threads = 1;
    cc
}

/// Spawns `args`, SIGKILLs it after `delay` unless it exits first (then successfully); whether
/// it was killed. Its stderr goes to `log`.
fn run_killed_after(args: &[&str], delay: Duration, log: &Path) -> bool {
    let err = std::fs::File::create(log).unwrap();
    let mut child =
        Command::new(BIN).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(err).spawn().unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "{args:?} ended before its kill with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            return false;
        }
        if t0.elapsed() >= delay {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs `args` to the end; its output, asserted successful.
fn run_ok(args: &[&str]) -> (std::process::Output, Duration) {
    let t0 = Instant::now();
    let o = Command::new(BIN).args(args).stdin(Stdio::null()).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    (o, t0.elapsed())
}

/// Names in `dir` starting with `prefix`, sorted.
fn names(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn compile_killed_at_random_points_keeps_the_dataset_and_the_next_compile_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let rec = record(dir.path(), 4, 3.0);
    let cfg = dir.path().join("compile.yaml");
    std::fs::write(&cfg, serde_yaml::to_string(&compile_config()).unwrap()).unwrap();
    let out = dir.path().join("ds");
    let args = ["dataset", "compile", "--episodes", s(&rec), "--config", s(&cfg), "--out", s(&out), "--overwrite"];
    let (_, full) = run_ok(&args);
    let samples = Dataset::open(&out).unwrap().len();
    assert!(samples > 0);
    let mut rng = SplitMix64::new(14);
    let (mut killed, mut left_staging) = (0, 0);
    for seed in 0..6 {
        let delay = Duration::from_millis(rng.below(full.as_millis() as u64 * 3 / 4 + 1));
        killed += run_killed_after(&args, delay, &dir.path().join("killed.log")) as u32;
        let ds = Dataset::open(&out)
            .unwrap_or_else(|e| panic!("seed {seed}, kill after {delay:?}: the dataset does not open: {e}"));
        assert_eq!(ds.len(), samples, "seed {seed}, kill after {delay:?}");
        left_staging += names(dir.path(), ".ds.").len();
    }
    let leftovers: Vec<PathBuf> = names(dir.path(), ".ds.").iter().map(|n| dir.path().join(n)).collect();
    let (o, _) = run_ok(&args);
    let report: CompileReport = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let mut removed = report.removed_leftovers.clone();
    removed.sort();
    assert_eq!(removed, leftovers, "report.json lists what was removed");
    let stdout = String::from_utf8_lossy(&o.stdout);
    for p in &leftovers {
        assert!(stdout.contains(&format!("removed {} (left by a compile that was killed)", p.display())), "{stdout}");
    }
    assert_eq!(names(dir.path(), ".ds."), Vec::<String>::new(), "no leftover after the next compile");
    assert_eq!(Dataset::open(&out).unwrap().len(), samples);
    println!("corpus kill9_compile: 6 runs, {killed} killed with SIGKILL, {left_staging} leftovers seen, panics 0, data lost 0");
}

#[test]
fn a_compile_killed_between_its_two_renames_gets_the_old_dataset_back() {
    let dir = tempfile::tempdir().unwrap();
    let rec = record(dir.path(), 2, 2.0);
    let eps = vla_finetune::cli::open_recorded_episodes(&rec).unwrap();
    let out = dir.path().join("ds");
    let samples = compile_lazily(&eps, &compile_config(), &out, false).unwrap().report.samples as usize;
    // The old dataset moved aside, the new one not yet moved in, by a process that is gone.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let old = dir.path().join(format!(".ds.old-{dead}"));
    std::fs::rename(&out, &old).unwrap();
    std::fs::create_dir(dir.path().join(format!(".ds.staging-{dead}"))).unwrap();
    // A compile that may not overwrite: the old dataset is back, so it refuses to replace it.
    let e = compile_lazily(&eps, &compile_config(), &out, false).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(Dataset::open(&out).unwrap().len(), samples);
    assert_eq!(names(dir.path(), ".ds."), Vec::<String>::new());
}

#[test]
fn train_heads_killed_at_random_points_keeps_latest_and_the_state_and_the_next_run_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let rec = record(dir.path(), 3, 1.6);
    let eps = vla_finetune::cli::open_recorded_episodes(&rec).unwrap();
    let data = dir.path().join("data");
    compile_lazily(&eps, &compile_config(), &data, false).unwrap();
    let base = Path::new(ROOT).join("tests/fixtures/vlm/tiny_a");
    let ck = dir.path().join("ck");
    let work = dir.path().join("work");
    let heads_args = |w: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train-heads",
            "--dataset",
            s(&data),
            "--base-model",
            s(&base),
            "--checkpoints",
            s(&ck),
            "--work-dir",
            s(w),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        v.extend(["--size", "small", "--epochs", "3", "--batch-size", "8"].iter().chain(extra).map(|a| a.to_string()));
        v
    };
    let good = heads_args(&dir.path().join("good"), &[]);
    let (_, full) = run_ok(&good.iter().map(String::as_str).collect::<Vec<_>>());
    let check_outputs = |what: &str| {
        let p = Publisher::new(&ck).unwrap();
        let latest =
            p.latest().unwrap_or_else(|e| panic!("{what}: {e}")).unwrap_or_else(|| panic!("{what}: no latest"));
        verify(&ck.join(&latest)).unwrap_or_else(|e| panic!("{what}: latest {latest}: {e}"));
        for v in p.versions().unwrap() {
            verify(&ck.join(&v)).unwrap_or_else(|e| panic!("{what}: {v}: {e}"));
        }
        let state = work.join("state/latest.safetensors");
        if state.exists() {
            if let Err(e) = read_state_meta(&state) {
                assert!(
                    e.to_string().contains("latest.safetensors"),
                    "{what}: the state is refused without naming it: {e}"
                );
            }
        }
    };
    check_outputs("after the good run");
    // Each killed run starts over in `work` (a whole run to hit); the next run resumes the state
    // the last one left.
    let fresh = heads_args(&work, &[]);
    let args: Vec<&str> = fresh.iter().map(String::as_str).collect();
    let mut rng = SplitMix64::new(14);
    let (mut killed, mut publish_leftovers, mut state_leftovers) = (0, 0, 0);
    for seed in 0..5 {
        let delay = Duration::from_millis(rng.below(full.as_millis() as u64 * 3 / 4 + 1));
        killed += run_killed_after(&args, delay, &dir.path().join("killed.log")) as u32;
        check_outputs(&format!("seed {seed}, kill after {delay:?}"));
        publish_leftovers += names(&ck, ".").iter().filter(|n| publication_leftover(n)).count();
        state_leftovers += names(&work.join("state"), ".").iter().filter(|n| n.ends_with(".tmp")).count();
    }
    let resumed = heads_args(&work, &["--resume"]);
    let (o, _) = run_ok(&resumed.iter().map(String::as_str).collect::<Vec<_>>());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["version"].is_string(), "{v}");
    check_outputs("after the next run");
    let ck_left: Vec<String> = names(&ck, ".").into_iter().filter(|n| publication_leftover(n)).collect();
    assert_eq!(ck_left, Vec::<String>::new(), "no publication leftover");
    let state_left: Vec<String> = names(&work.join("state"), ".").into_iter().filter(|n| n.ends_with(".tmp")).collect();
    assert_eq!(state_left, Vec::<String>::new(), "no state-write leftover");
    println!(
        "corpus kill9_train_heads: 5 runs, {killed} killed with SIGKILL ({publish_leftovers} mid-publication, {state_leftovers} mid-state-write), panics 0, data lost 0"
    );
}

/// A staged version folder (`.tmp-<version>`) or a `latest` pointer's temporary
/// (`.latest.<pid>.tmp`) of an interrupted publication.
fn publication_leftover(name: &str) -> bool {
    name.starts_with(".tmp-") || (name.starts_with(".latest.") && name.ends_with(".tmp"))
}
