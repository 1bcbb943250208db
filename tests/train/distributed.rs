//! Data-parallel Stage 2 (torch.distributed's Gloo over loopback, two ranks, the tiny model on
//! the CPU) against single-process runs of the same binary: `torchrun --no-python` launches,
//! equal parameters, one gradient all-reduce per optimizer step under accumulation, a killed
//! rank named by the survivor, resume on another world size, and features mode's refresh epochs.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::stage2::{config, fixture_under_lock, tiny_heads, without_key_bias};
use tch::Tensor;
use vla_finetune::train::controller::JobContext;
use vla_finetune::train::launch::{run_stage2, Launch};
use vla_finetune::train::progress::ProgressHub;
use vla_finetune::train::stage2::Stage2Job;
use vla_finetune::train::tensor_io::read_safetensors;

const BIN: &str = env!("CARGO_BIN_EXE_vla_finetune");
const TORCHRUN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/torchrun");

/// Settings shared by every run here: f32, no LoRA dropout (it draws per micro-batch, so it
/// depends on the split), 4 epochs.
const COMMON: &[&str] =
    &["run.epochs=4", "lora.dropout=0.0", "distributed.timeout_s=60", "checkpoint.keep_versions=20"];

/// Writes the job's YAML under `out` (micro-batch `micro` x accumulation `accum` per rank).
fn job(out: &Path, micro: usize, accum: usize, sets: &[&str]) -> PathBuf {
    let (m, a) = (format!("memory.micro_batch={micro}"), format!("memory.accum_steps={accum}"));
    let all: Vec<&str> = [COMMON, &[m.as_str(), a.as_str()], sets].concat();
    fixture_under_lock();
    let cfg = config(out, &all);
    std::fs::create_dir_all(out).unwrap();
    let path = out.join("train.yaml");
    std::fs::write(&path, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn train_args(yaml: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec!["train".to_string(), "--config".into(), yaml.display().to_string(), "--quiet".into()];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn check(o: &Output, what: &str) -> serde_json::Value {
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{what} failed: {}\nstdout:\n{out}\nstderr:\n{err}", o.status);
    let start = out.find('{').unwrap_or_else(|| panic!("{what}: no JSON result in\n{out}"));
    serde_json::from_str(&out[start..]).unwrap_or_else(|e| panic!("{what}: {e}\n{out}"))
}

/// One process, no torchrun variables.
fn single(yaml: &Path, extra: &[&str]) -> serde_json::Value {
    let o = Command::new(BIN).args(train_args(yaml, extra)).env_remove("WORLD_SIZE").output().unwrap();
    check(&o, "single-process train")
}

/// `torchrun --nproc_per_node=2 --no-python vla_finetune train ...` on loopback.
fn torchrun(yaml: &Path) -> serde_json::Value {
    let port = free_port().to_string();
    let o = Command::new(TORCHRUN)
        .args([
            "--nnodes=1",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            "--master_port",
            &port,
            "--no-python",
            BIN,
        ])
        .args(train_args(yaml, &[]))
        .output()
        .unwrap();
    check(&o, "torchrun train")
}

/// Rank `rank` of 2 started directly with torchrun's variables (rank 0 hosts the store).
fn spawn_rank(yaml: &Path, rank: usize, port: u16, extra: &[&str]) -> Child {
    Command::new(BIN)
        .args(train_args(yaml, extra))
        .envs([("RANK", rank.to_string()), ("LOCAL_RANK", rank.to_string()), ("WORLD_SIZE", "2".into())])
        .envs([("MASTER_ADDR", "127.0.0.1".to_string()), ("MASTER_PORT", port.to_string())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The trainable parameters in a run's last training state, by name, without the attention key
/// biases (their true gradient is zero, so Adam turns float noise there into lr-sized steps that
/// differ with any change of summation order; see [`without_key_bias`]).
fn state_params(out: &Path) -> Vec<(String, Tensor)> {
    let mut t: Vec<(String, Tensor)> = read_safetensors(&out.join("state/latest.safetensors"))
        .unwrap()
        .tensors
        .into_iter()
        .filter(|(n, _)| n.starts_with("param/"))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    without_key_bias(t)
}

fn assert_close(a: &[(String, Tensor)], b: &[(String, Tensor)], tol: f64) {
    assert_eq!(a.len(), b.len());
    assert!(!a.is_empty());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let d = (ta - tb).abs().max().double_value(&[]);
        assert!(d <= tol, "{na}: max abs difference {d} > {tol}");
    }
}

fn steps(r: &serde_json::Value) -> u64 {
    r["run"]["counters"]["global_step"].as_u64().unwrap()
}

#[test]
fn two_ranks_under_torchrun_equal_one_process_with_the_doubled_micro_batch_and_survive_a_killed_rank() {
    let dir = tempfile::tempdir().unwrap();
    // Reference: one process, micro-batch 4 x accumulation 2 (8 samples per optimizer step).
    let one = dir.path().join("one");
    let r1 = single(&job(&one, 4, 2, &[]), &[]);
    // Two ranks, micro-batch 2 x accumulation 2 each: the same 8 samples per step.
    let two = dir.path().join("two");
    let r2 = torchrun(&job(&two, 2, 2, &[]));
    assert_eq!(steps(&r2), steps(&r1));
    assert!(steps(&r1) >= 8, "{r1}");
    assert_close(&state_params(&two), &state_params(&one), 1e-5);
    let (v1, v2) = (r1["val_action_error"].as_f64().unwrap(), r2["val_action_error"].as_f64().unwrap());
    assert!((v1 - v2).abs() <= 1e-4 * v1.abs().max(1.0), "{v1} vs {v2}");
    // Accumulation over 2 micro-batches, yet one gradient all-reduce per optimizer step; the
    // ranks' parameters were compared (and equal) before every step and at every epoch's ends.
    assert_eq!(r2["run"]["grad_all_reduces"].as_u64().unwrap(), steps(&r2), "{r2}");
    assert_eq!(r2["run"]["replica_checks"].as_u64().unwrap(), steps(&r2) + 2 * 4, "{r2}");
    assert_eq!(r1["run"]["grad_all_reduces"].as_u64().unwrap(), 0);
    // The launcher behind `train --nproc-per-node` and the trainer node's `nproc_per_node`: the
    // same launch, rank 0's progress relayed into the job's hub, each new `latest` announced.
    the_launcher_relays_progress_and_announces_checkpoints(dir.path(), &one, &r1);

    // A rank killed in epoch 1 ends the other with an error naming it, well within the timeout.
    a_killed_rank_1_is_named_and_the_run_resumes_on_one_process(dir.path(), &one, &r1);

    // Rank 0 killed: it hosted the rendezvous store, and the survivor says so.
    a_killed_rank_0_is_named_by_rank_1(dir.path());
}

/// `run_stage2` with a 2-process [`Launch`] under `dir`: equal to the single run `one` (`r1`), progress relayed.
fn the_launcher_relays_progress_and_announces_checkpoints(dir: &Path, one: &Path, r1: &serde_json::Value) {
    let launched = dir.join("launched");
    let hub = ProgressHub::new(4096);
    let mut events = hub.subscribe();
    let ctx = JobContext { job_id: "dp".into(), cancel: Default::default(), progress: hub.clone() };
    let launch = Launch { nproc: 2, torchrun: TORCHRUN.into(), binary: BIN.into() };
    let launched_job = Stage2Job {
        config: config(&launched, &[COMMON, &["memory.micro_batch=2", "memory.accum_steps=2"]].concat()),
        resume: false,
        group: None,
    };
    let mut announced = Vec::new();
    let r3 = run_stage2(&launched_job, &launch, &ctx, &mut |p| announced.push(p.version.clone())).unwrap();
    assert_eq!(r3.run.counters.global_step, steps(r1));
    assert_close(&state_params(&launched), &state_params(one), 1e-5);
    let mut relayed = Vec::new();
    while let Ok(ev) = events.try_recv() {
        relayed.push(ev);
    }
    assert!(relayed.iter().all(|e| e.job_id == "dp" && !e.phase.is_terminal()));
    assert_eq!(relayed.iter().map(|e| e.step).max(), Some(steps(r1)), "{} events relayed", relayed.len());
    assert!(!announced.is_empty());
    assert_eq!(announced.last(), r3.run.published.last());
}

/// Rank 1 of 2 killed in epoch 1: rank 0 stops naming it; resumed on one process, it equals `one` (`r1`).
fn a_killed_rank_1_is_named_and_the_run_resumes_on_one_process(dir: &Path, one: &Path, r1: &serde_json::Value) {
    let killed = dir.join("killed");
    let yaml = job(&killed, 2, 2, &[]);
    let port = free_port();
    let mut r0 = spawn_rank(&yaml, 0, port, &[]);
    let mut r1k = spawn_rank(&yaml, 1, port, &[]);
    wait_for_epoch_1(&killed.join("log.jsonl"), &mut r0);
    r1k.kill().unwrap();
    let _ = r1k.wait();
    let killed_at = Instant::now();
    let o = r0.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "rank 0 finished without rank 1:\n{err}");
    assert!(killed_at.elapsed() < Duration::from_secs(60), "rank 0 took {:?} to stop", killed_at.elapsed());
    assert!(err.contains("rank 1 of 2 stopped"), "rank 0's error does not name rank 1:\n{err}");
    eprintln!(
        "rank 0 stopped {:?} after rank 1 was killed: {}",
        killed_at.elapsed(),
        err.lines().find(|l| l.contains("rank 1 of 2")).unwrap_or_default()
    );
    // Resumed on one process (another world size): the same 8 samples per step, so the same
    // parameters as the uninterrupted runs.
    let r = single(&yaml, &["--resume"]);
    assert_eq!(steps(&r), steps(r1));
    assert_close(&state_params(&killed), &state_params(one), 1e-5);
}

/// Rank 0 of 2 killed in epoch 1: rank 1 stops, naming the rendezvous store rank 0 hosted.
fn a_killed_rank_0_is_named_by_rank_1(dir: &Path) {
    let host = dir.join("host_killed");
    let yaml = job(&host, 2, 2, &[]);
    let port = free_port();
    let (mut r0, r1s) = (spawn_rank(&yaml, 0, port, &[]), spawn_rank(&yaml, 1, port, &[]));
    wait_for_epoch_1(&host.join("log.jsonl"), &mut r0);
    r0.kill().unwrap();
    let _ = r0.wait();
    let killed_at = Instant::now();
    let o = r1s.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "rank 1 finished without rank 0:\n{err}");
    assert!(killed_at.elapsed() < Duration::from_secs(60), "rank 1 took {:?} to stop", killed_at.elapsed());
    assert!(err.contains("the rendezvous store hosted by rank 0"), "rank 1's error does not name rank 0:\n{err}");
}

/// Waits until rank 0's progress log shows epoch 1 training (rank 0 must still run).
fn wait_for_epoch_1(log: &Path, r0: &mut Child) {
    let t0 = Instant::now();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains("\"epoch\":1") && l.contains("\"phase\":\"training\""))
    {
        assert!(t0.elapsed() < Duration::from_secs(120), "rank 0 never reached epoch 1");
        assert!(r0.try_wait().unwrap().is_none(), "rank 0 ended before epoch 1");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn features_mode_with_refresh_epochs_over_two_ranks_equals_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let sets = ["cache.mode=features", "cache.rebuild_interval_epochs=1", "cache.probe_samples=4"];
    let one = dir.path().join("one");
    let r1 = single(&job(&one, 4, 1, &sets), &[]);
    let two = dir.path().join("two");
    let r2 = torchrun(&job(&two, 2, 1, &sets));
    // Epochs: cached (cache built), refresh (LoRA trained live, cache rewritten), cached, refresh.
    assert_eq!(r1["cache_refreshes"].as_u64(), Some(2), "{r1}");
    assert_eq!(r2["cache_refreshes"].as_u64(), r1["cache_refreshes"].as_u64());
    assert_eq!(r2["lora_params_changed"], serde_json::Value::Bool(true));
    // Looser than the live-feature test's 1e-5: the cache's features come from batched forwards
    // of other batch mates and padding (chunks of 4 consecutive samples on one process, of 2 of
    // each rank's share on two), so the heads read inputs that differ in the last float bits.
    // Adam turns that into a fraction of a step where a gradient is near zero: up to 6e-6
    // (cpu-2c) and 1.3e-5 (CI) on the first convolution, whose scale the BatchNorm after it
    // removes; every other tensor stays within 2e-7 on cpu-2c. 1e-4 is a tenth of one step
    // (lr 1e-3), while a wrong shard, a gradient not averaged or a refresh skipped moves
    // parameters by whole steps.
    assert_close(&state_params(&two), &state_params(&one), 1e-4);
    // The shared cache holds each sample's features once, under the last adapter only: the
    // ranks wrote their shares and rank 0 removed the older adapters' entries.
    let count = |out: &Path| entries_owned(&out.join("cache"));
    assert_eq!(count(&two), count(&one));
    assert!(count(&one) > 0);
}

/// Feature-cache entries with a `cache_owner` (the job's features, not the shared vision embeddings).
fn entries_owned(cache: &Path) -> usize {
    let mut n = 0;
    for shard in std::fs::read_dir(cache).unwrap().flatten().filter(|e| e.path().is_dir()) {
        for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
            let loaded = read_safetensors(&f.path()).unwrap();
            n += usize::from(loaded.metadata.contains_key("cache_owner"));
        }
    }
    n
}

/// `train-heads` args for the fixture's dataset and tiny heads (no dropout: it draws per
/// micro-batch), outputs under `out`.
fn heads_args(out: &Path, batch: usize) -> Vec<String> {
    let f = fixture_under_lock();
    std::fs::create_dir_all(out).unwrap();
    let heads = out.join("heads.yaml");
    std::fs::write(&heads, serde_yaml::to_string(&tiny_heads()).unwrap()).unwrap();
    let mut v: Vec<String> = vec![
        "train-heads".into(),
        "--dataset".into(),
        f.dataset.display().to_string(),
        "--base-model".into(),
        f.base.display().to_string(),
    ];
    v.extend([
        "--checkpoints".into(),
        out.join("ck").display().to_string(),
        "--work-dir".into(),
        out.join("work").display().to_string(),
    ]);
    v.extend([
        "--heads-config".into(),
        heads.display().to_string(),
        "--epochs".into(),
        "3".into(),
        "--seed".into(),
        "4".into(),
        "--batch-size".into(),
        batch.to_string(),
    ]);
    v.extend(["--set".into(), "warmup_epochs=0".into(), "--set".into(), "distributed_timeout_s=60".into()]);
    v
}

/// Every tensor of a published stage-1 checkpoint (heads with BatchNorm running statistics)
/// but those with a zero true gradient, where Adam turns float noise into lr-sized steps: the
/// attention key biases ([`without_key_bias`]) and the biases of the convolutions that
/// BatchNorm follows (it removes any per-channel constant), with the running means, which
/// follow those biases.
fn heads_tensors(r: &serde_json::Value) -> Vec<(String, Tensor)> {
    let dir = PathBuf::from(r["checkpoint"].as_str().unwrap());
    let mut t = read_safetensors(&dir.join("heads.safetensors")).unwrap().tensors;
    let conv_layer = |n: &str| n.split('.').nth(2).and_then(|i| i.parse::<usize>().ok());
    t.retain(|(n, _)| {
        !(n.starts_with("sensor_encoder.conv.")
            && (n.ends_with(".running_mean") || (n.ends_with(".bias") && conv_layer(n).is_some_and(|i| i % 3 == 0))))
    });
    assert!(t.iter().any(|(n, _)| n.ends_with("running_var")));
    t.sort_by(|a, b| a.0.cmp(&b.0));
    without_key_bias(t)
}

#[test]
fn stage1_over_three_ranks_with_synchronised_batch_norm_equals_one_process_with_the_tripled_batch() {
    let f = fixture_under_lock();
    let n = vla_finetune::dataset::reader::Dataset::open(&f.dataset)
        .unwrap()
        .split_indices(vla_finetune::dataset::store::Split::Train)
        .len();
    // Steps of n - 1 samples over 3 ranks: the last step of each epoch has one sample, so two
    // ranks have none and join the BatchNorm collectives with idle passes.
    let per_rank = (n - 1) / 3;
    assert!(per_rank > 1 && n % (3 * per_rank) == 1, "{n} training samples");
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args(heads_args(&dir.path().join("one"), 3 * per_rank))
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    let r1 = check(&o, "single-process train-heads");
    let port = free_port().to_string();
    let o = Command::new(TORCHRUN)
        .args([
            "--nnodes=1",
            "--nproc_per_node=3",
            "--master_addr=127.0.0.1",
            "--master_port",
            &port,
            "--no-python",
            BIN,
        ])
        .args(heads_args(&dir.path().join("three"), per_rank))
        .output()
        .unwrap();
    let r2 = check(&o, "torchrun train-heads");
    assert_eq!(r2["global_step"], r1["global_step"]);
    // Parameters and BatchNorm running statistics equal those of one process with the tripled
    // batch: BatchNorm saw every rank's samples at once. Measured (cpu-2c, 2026-12-06): at most
    // 1.2e-5 (one conv weight whose gradient crossed zero, where Adam's normalisation magnifies
    // rounding), 1e-6 or less elsewhere; with each rank's own batch statistics, 6.7e-3.
    assert_close(&heads_tensors(&r2), &heads_tensors(&r1), 5e-5);
    let (v1, v2) = (r1["val_action_error"].as_f64().unwrap(), r2["val_action_error"].as_f64().unwrap());
    assert!((v1 - v2).abs() <= 1e-4 * v1.abs().max(1.0), "{v1} vs {v2}");
}
