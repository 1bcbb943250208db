//! Stage 2 on CPU with the tiny random Qwen2.5-VL (tests/fixtures/vlm/tiny_a), on a small dataset
//! recorded from the simulated robot and compiled in the test, starting from a stage-1
//! checkpoint trained here with `heads_job`.

use std::path::Path;

use crate::support::rng_lock;
use crate::support::stage2::{config, ctx, fixture, fixture_under_lock, stage1_training, tiny_heads, without_key_bias};
use tch::{Device, Tensor};
use vla_finetune::checkpoint::deploy::{DeployInfo, DEPLOY_FILE, HEADS_FILE};
use vla_finetune::checkpoint::publish::Publisher;
use vla_finetune::dataset::reader::Dataset;
use vla_finetune::dataset::store::Split;
use vla_finetune::oom_injection::{self, Point};
use vla_finetune::policy::heads::PolicyHeads;
use vla_finetune::train::action_error::ActionAxes;
use vla_finetune::train::cache::{cache_key, FeatureCache, KeyInput};
use vla_finetune::train::config::{ResolvedMemory, TrainConfig};
use vla_finetune::train::controller::{JobController, JobStatus, StartResponse};
use vla_finetune::train::heads_job::{self, HeadsJob, HeadsTrainConfig};
use vla_finetune::train::optim::Accumulation;
use vla_finetune::train::progress::ProgressHub;
use vla_finetune::train::runner::{self, RunnerConfig, TrainTask};
use vla_finetune::train::service::{ServiceConfig, StartRequest};
use vla_finetune::train::stage2::{self, Stage2Job, Stage2Result, Stage2Task};
use vla_finetune::train::state::read_state_meta;
use vla_finetune::train::tensor_io::read_safetensors;
use vla_finetune::vlm::{Pooling, Qwen25VL, VlProcessor};

fn run(cfg: &TrainConfig) -> Stage2Result {
    stage2::run(&Stage2Job { config: cfg.clone(), resume: false, group: None }, &ctx(), &mut |_| {}).unwrap()
}

/// Every tensor of the latest published checkpoint (adapter and heads), by name.
fn published_tensors(cfg: &TrainConfig) -> Vec<(String, Tensor)> {
    let dir = vla_finetune::checkpoint::publish::Publisher::new(&cfg.checkpoint.publish_dir)
        .unwrap()
        .latest_dir()
        .unwrap()
        .unwrap();
    let mut out = read_safetensors(&dir.join("adapter/adapter_model.safetensors")).unwrap().tensors;
    out.extend(read_safetensors(&dir.join("heads.safetensors")).unwrap().tensors);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn assert_close(a: &[(String, Tensor)], b: &[(String, Tensor)], tol: f64) {
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let d = (ta - tb).abs().max().double_value(&[]);
        assert!(d <= tol, "{na}: max abs difference {d} > {tol}");
    }
}

#[test]
fn vision_mode_equals_off_mode_builds_the_vision_cache_once_and_beats_stage1() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let common = ["run.epochs=3", "lora.dropout=0.0"];
    let vcfg = config(
        &dir.path().join("v"),
        &[&common[..], &["cache.mode=vision", "model.gradient_checkpointing=true"]].concat(),
    );
    let v = run(&vcfg);
    let ocfg = config(
        &dir.path().join("o"),
        &[&common[..], &["cache.mode=off", "model.gradient_checkpointing=false"]].concat(),
    );
    let o = run(&ocfg);
    let entries = FeatureCache::open(&vcfg.cache.dir, vcfg.cache_config()).unwrap().stats().entries;
    assert!(entries > 0);
    assert_eq!(v.vision_entries_built, entries, "each distinct image's vision embeddings computed once");
    assert!(v.lora_params_changed && o.lora_params_changed);
    // Cached vision embeddings + checkpointed decoder == live full forward without checkpointing.
    assert_close(&published_tensors(&vcfg), &published_tensors(&ocfg), 2e-5);
    assert!((v.val_action_error.unwrap() - o.val_action_error.unwrap()).abs() < 1e-4);
    assert!(
        v.val_action_error.unwrap() < v.val_action_error_before,
        "stage 2 {:?} should beat stage 1 {}",
        v.val_action_error,
        v.val_action_error_before
    );
    // A second run on the same cache folder computes nothing.
    let again = config(&dir.path().join("v"), &["run.epochs=1", "cache.mode=vision"]);
    assert_eq!(run(&again).vision_entries_built, 0);
}

fn features_run(out: &Path, epochs: u64) -> (Stage2Task, runner::RunSummary, TrainConfig) {
    features_run_with(out, epochs, &[])
}

/// A features-mode run (refresh every 2 cached epochs) with `sets` applied last.
fn features_run_with(out: &Path, epochs: u64, sets: &[&str]) -> (Stage2Task, runner::RunSummary, TrainConfig) {
    task_run(out, epochs, &[&["cache.mode=features", "cache.rebuild_interval_epochs=2"][..], sets].concat())
}

/// A run of the loop over a [`Stage2Task`] kept for inspection, with `sets` applied last.
fn task_run(out: &Path, epochs: u64, sets: &[&str]) -> (Stage2Task, runner::RunSummary, TrainConfig) {
    let epochs_set = format!("run.epochs={epochs}");
    let all: Vec<&str> = [&[epochs_set.as_str()][..], sets].concat();
    let cfg = config(out, &all);
    let memory = stage2::resolve_memory(&cfg).unwrap();
    let mut task = Stage2Task::new(&cfg, &memory).unwrap();
    let rc = RunnerConfig {
        epochs,
        accumulation: Accumulation::new(memory.micro_batch, memory.accum_steps).unwrap(),
        adamw: cfg.adamw(),
        groups: cfg.param_groups(),
        warmup_ratio: 0.0,
        min_lr_ratio: 0.1,
        grad_clip_norm: 1.0,
        seed: 5,
        best_metric: stage2::BEST_METRIC.into(),
        val_every_epochs: 1,
        state_dir: cfg.checkpoint.state_dir.clone(),
        resume: false,
        publish_dir: None,
        allow_worse_latest: false,
        base_model_id: task.base_model_id().into(),
        plot_file: None,
        group: None,
    };
    let s = runner::run(&mut task, &rc, &ctx(), &mut |_| {}).unwrap();
    (task, s, cfg)
}

#[test]
fn features_mode_trains_lora_only_in_refresh_epochs_and_rewrites_the_cache() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let n = vla_finetune::dataset::reader::Dataset::open(&fixture().dataset).unwrap().len();
    // Two cached epochs: LoRA frozen, heads trained.
    let (mut a, _, acfg) = features_run(&dir.path().join("a"), 2);
    assert!(!a.lora_params_changed());
    assert_eq!(a.refreshes(), 0);
    let h0 = a.adapter_hash();
    let cache = FeatureCache::open(&acfg.cache.dir, acfg.cache_config()).unwrap();
    let distinct: std::collections::BTreeSet<_> = (0..n).map(|i| a.sample_key(i, "features", &h0).unwrap()).collect();
    // The features build ran the vision tower once per sample: its embeddings are kept too.
    let vision: std::collections::BTreeSet<_> = (0..n).map(|i| a.sample_key(i, "vision", "none").unwrap()).collect();
    assert!((0..n).all(|i| cache.contains(&a.sample_key(i, "vision", "none").unwrap())));
    assert_eq!(
        cache.stats().entries,
        (distinct.len() + vision.len()) as u64,
        "one features and one vision entry per distinct sample"
    );
    assert!((0..n).all(|i| cache.contains(&a.sample_key(i, "features", &h0).unwrap())));
    // Another job's features and a shared (unowned) entry in the same cache folder.
    let foreign = |tag: &[u8]| {
        let proc = serde_json::json!({});
        cache_key(&KeyInput {
            kind: "features",
            base_model: "m",
            dtype: "f32",
            adapter: "x",
            processor: &proc,
            prompt: "",
            images: &[tag],
        })
    };
    let (theirs, shared) = (foreign(b"another job"), foreign(b"shared"));
    {
        let mut c = FeatureCache::open(dir.path().join("b/cache"), acfg.cache_config()).unwrap();
        c.put_owned(
            theirs,
            &[("pooled".into(), Tensor::ones([1, 4], (tch::Kind::Float, Device::Cpu)))],
            "features@/elsewhere/state",
        )
        .unwrap();
        c.put(shared, &[("embeds".into(), Tensor::ones([1, 4], (tch::Kind::Float, Device::Cpu)))]).unwrap();
    }
    // Interval 2: epoch 2 is a refresh epoch; LoRA trains and the cache moves to the new adapter.
    let (mut b, _, bcfg) = features_run(&dir.path().join("b"), 3);
    assert!(b.lora_params_changed());
    assert_eq!(b.refreshes(), 1);
    assert_eq!(b.cache_status().refreshes, 1);
    assert!(b.cache_status().drift.unwrap() > 0.0, "drift measured after the refresh");
    let h1 = b.adapter_hash();
    assert_ne!(h0, h1);
    let cache = FeatureCache::open(&bcfg.cache.dir, bcfg.cache_config()).unwrap();
    assert_eq!(cache.stats().entries, (distinct.len() + vision.len()) as u64 + 2, "its old-adapter entries removed");
    assert!(cache.contains(&theirs) && cache.contains(&shared), "another job's and shared entries survive the rebuild");
    assert!((0..n).all(|i| cache.contains(&b.sample_key(i, "features", &h1).unwrap())));
    assert!((0..n).all(|i| !cache.contains(&b.sample_key(i, "features", &h0).unwrap())));
    // Same base, processor and images: the vision key ignores the adapter, the features key does not.
    assert_eq!(b.sample_key(0, "vision", "none").unwrap(), a.sample_key(0, "vision", "none").unwrap());
    assert_ne!(b.sample_key(0, "features", &h0).unwrap(), b.sample_key(1, "features", &h0).unwrap());
}

#[test]
fn features_mode_offloads_the_vl_model_in_cached_epochs_only_on_an_accelerator() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let (device, spec) =
        if tch::Cuda::is_available() { (Device::Cuda(0), "run.device=cuda") } else { (Device::Cpu, "run.device=cpu") };
    // Epochs 0, 1 cached, 2 a refresh (VL model back on the device), 3 cached again.
    let (on, s_on, _) = features_run_with(&dir.path().join("on"), 4, &[spec, "memory.offload_vl_when_cached=true"]);
    let (off, s_off, _) = features_run_with(&dir.path().join("off"), 4, &[spec, "memory.offload_vl_when_cached=false"]);
    assert_eq!(on.refreshes(), 1);
    let offloaded = device != Device::Cpu;
    assert_eq!(on.vl_offloaded(), offloaded, "offload happens only on an accelerator");
    assert_eq!(on.cache_status().vl_offloaded, offloaded);
    assert_eq!(on.vl_weight_devices(), vec![Device::Cpu]);
    assert!(!off.vl_offloaded());
    assert_eq!(off.vl_weight_devices(), vec![device]);
    // Where the weights wait between uses does not change the training.
    assert_eq!(s_on.validation, s_off.validation);
}

#[test]
fn memory_auto_measures_the_accelerator_and_names_the_fix_on_cpu() {
    fixture_under_lock();
    let dir = tempfile::tempdir().unwrap();
    let presets = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/vram_presets.yaml");
    let file = format!("memory.presets_file={:?}", presets.display().to_string());
    let auto = ["memory.preset=auto", "memory.micro_batch=null", "memory.accum_steps=null", "lora.rank=null", &file];
    let cpu = config(dir.path(), &auto);
    let e = stage2::resolve_memory(&cpu).unwrap_err().to_string();
    assert!(e.contains("memory.preset") && e.contains("run.device `cpu`") && e.contains("name a preset"), "{e}");
    // With a measured size: the largest preset whose 95 % fits (37.0 GiB free: 24gb, 2 x 16, rank 8; 38 would be 40gb).
    let m = stage2::resolve_memory_with(&cpu, Some(37.0)).unwrap();
    assert_eq!((m.preset.as_str(), m.micro_batch, m.accum_steps, m.lora_rank), ("24gb", 2, 16, 8));
    let e = stage2::resolve_memory_with(&cpu, Some(8.0)).unwrap_err().to_string();
    assert!(e.contains("8.0 GiB") && e.contains("12gb"), "{e}");
    if tch::Cuda::is_available() {
        let cuda = config(dir.path(), &[&auto[..], &["run.device=cuda"]].concat());
        let free = vla_finetune::memory::accelerator_capacity(0).unwrap().unwrap().free as f64 / (1u64 << 30) as f64;
        assert_eq!(stage2::resolve_memory(&cuda).unwrap(), stage2::resolve_memory_with(&cuda, Some(free)).unwrap());
    }
}

#[test]
fn memory_auto_resume_reuses_the_saved_plan_whatever_memory_is_free() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let presets = dir.path().join("presets.yaml");
    std::fs::write(
        &presets,
        "presets:\n  - {name: small, vram_gb: 12, micro_batch: 2, accum_steps: 2, lora_rank: 2}\n  - {name: big, vram_gb: 40, micro_batch: 4, accum_steps: 1, lora_rank: 4}\n",
    )
    .unwrap();
    let file = format!("memory.presets_file={:?}", presets.display().to_string());
    let auto = [
        "run.epochs=2",
        "cache.mode=vision",
        "memory.preset=auto",
        "memory.micro_batch=null",
        "memory.accum_steps=null",
        "lora.rank=null",
        &file,
    ];
    let cfg = config(&dir.path().join("run"), &auto);
    let small = ResolvedMemory { preset: "small".into(), micro_batch: 2, accum_steps: 2, lora_rank: 2 };
    let big = ResolvedMemory { preset: "big".into(), micro_batch: 4, accum_steps: 1, lora_rank: 4 };
    assert_eq!(stage2::plan_memory(&cfg, false, &mut || Ok(Some(80.0))).unwrap(), big, "a fresh run measures");

    // Start with 12 GiB free ("small"), cancel after two optimizer steps.
    let c = ctx();
    let mut rx = c.progress.subscribe();
    let cancel = c.cancel.clone();
    let watcher = std::thread::spawn(move || {
        while let Ok(ev) = rx.blocking_recv() {
            if ev.step >= 2 {
                cancel.cancel();
                return;
            }
        }
    });
    let job = |resume| Stage2Job { config: cfg.clone(), resume, group: None };
    let r1 = stage2::run_with_free_memory(&job(false), &c, &mut |_| {}, &mut || Ok(Some(12.0))).unwrap();
    watcher.join().unwrap();
    assert!(r1.run.cancelled);
    let latest = cfg.checkpoint.state_dir.join("latest.safetensors");
    assert_eq!(stage2::saved_memory(&latest).unwrap(), Some(small.clone()));

    // The resume sees 80 GiB free ("big") but keeps the saved plan without measuring.
    assert_eq!(stage2::plan_memory(&cfg, true, &mut || Ok(Some(80.0))).unwrap(), small);
    // An explicit setting that contradicts the saved plan is refused, naming both.
    let asks_rank_4 = config(&dir.path().join("run"), &[&auto[..], &["lora.rank=4"]].concat());
    let e = stage2::plan_memory(&asks_rank_4, true, &mut || Ok(Some(12.0))).unwrap_err().to_string();
    assert!(e.contains("lora.rank 4") && e.contains("LoRA rank 2, micro-batch 2 x 2"), "{e}");
    let mut measured = 0;
    let r2 = stage2::run_with_free_memory(&job(true), &ctx(), &mut |_| {}, &mut || {
        measured += 1;
        Ok(Some(80.0))
    })
    .unwrap();
    assert_eq!(measured, 0, "a resume with a saved plan does not measure");
    assert!(!r2.run.cancelled && r2.run.counters.global_step > r1.run.counters.global_step);
    assert_eq!(r2.accumulation, Accumulation::new(2, 2).unwrap());
    // The published adapter has the saved rank and alpha = scaling (2.0) x rank.
    let ck = vla_finetune::checkpoint::publish::Publisher::new(&cfg.checkpoint.publish_dir)
        .unwrap()
        .latest_dir()
        .unwrap()
        .unwrap();
    let adapter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((adapter["r"].as_u64(), adapter["lora_alpha"].as_f64()), (Some(2), Some(4.0)));
}

#[test]
fn micro_batch_2_by_4_equals_batch_8_by_1() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let common = ["run.epochs=1", "lora.dropout=0.0", "cache.mode=vision"];
    let a = config(&dir.path().join("a"), &[&common[..], &["memory.micro_batch=2", "memory.accum_steps=4"]].concat());
    let b = config(&dir.path().join("b"), &[&common[..], &["memory.micro_batch=8", "memory.accum_steps=1"]].concat());
    let (ra, rb) = (run(&a), run(&b));
    assert_eq!(ra.run.counters.global_step, rb.run.counters.global_step);
    assert!(ra.lora_params_changed);
    assert_close(&without_key_bias(published_tensors(&a)), &without_key_bias(published_tensors(&b)), 1e-5);
}

/// How many times the validation before training reaches the forward injection point, in
/// chunks of `chunk`: once per decoder layer and chunk of the validation split.
fn forward_points_before_training(chunk: usize) -> u64 {
    let layers = vla_finetune::vlm::config::Config::from_file(&fixture().base.join("config.json"))
        .unwrap()
        .text
        .num_hidden_layers as u64;
    let val = vla_finetune::dataset::reader::Dataset::open(&fixture().dataset)
        .unwrap()
        .split_indices(vla_finetune::dataset::store::Split::Val)
        .len();
    layers * val.div_ceil(chunk) as u64
}

/// A real libtorch allocation failure injected in the forward (a panic of a tch op), in the
/// checkpoint recompute (a panic), before the backward (an error) or in the validation before
/// training halves the micro-batch, keeps the effective batch and redoes the step (or the
/// validation): the run ends with the weights of a run that never failed.
#[test]
fn out_of_memory_in_forward_recompute_or_backward_halves_the_micro_batch_and_loses_no_step() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let common =
        ["run.epochs=1", "lora.dropout=0.0", "cache.mode=vision", "memory.micro_batch=4", "memory.accum_steps=2"];
    let reference = config(&dir.path().join("reference"), &common);
    assert!(reference.model.gradient_checkpointing, "the recompute point needs checkpointing");
    let r0 = run(&reference);
    assert_eq!(r0.run.accumulation, Accumulation { micro_batch: 4, accum_steps: 2 });
    // The training forward's 3rd layer comes after the validation before training.
    let before_training = forward_points_before_training(4);
    let cases = [
        ("validation", Point::Forward, 1),
        ("forward", Point::Forward, before_training + 3),
        ("recompute", Point::Recompute, 2),
        ("backward", Point::Backward, 2),
    ];
    for (name, point, nth) in cases {
        let cfg = config(&dir.path().join(name), &common);
        let r = {
            let _oom = oom_injection::inject(point, nth);
            run(&cfg)
        };
        assert_eq!(
            r.run.accumulation,
            Accumulation { micro_batch: 2, accum_steps: 4 },
            "{name}: halved once, same effective batch"
        );
        assert_eq!(r.run.counters, r0.run.counters, "{name}: every step done");
        let rel = (r.val_action_error_before - r0.val_action_error_before).abs() / r0.val_action_error_before;
        assert!(
            rel <= 1e-6,
            "{name}: validation before training {} vs {}",
            r.val_action_error_before,
            r0.val_action_error_before
        );
        assert_close(
            &without_key_bias(published_tensors(&cfg)),
            &without_key_bias(published_tensors(&reference)),
            1e-5,
        );
    }
}

#[test]
fn resume_after_cancel_equals_an_uninterrupted_run() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let sets = ["run.epochs=2", "cache.mode=vision", "memory.micro_batch=2", "memory.accum_steps=1"];
    let full = config(&dir.path().join("full"), &sets);
    let r_full = run(&full);
    let part = config(&dir.path().join("part"), &sets);
    let c = ctx();
    let mut rx = c.progress.subscribe();
    let cancel = c.cancel.clone();
    let watcher = std::thread::spawn(move || {
        while let Ok(ev) = rx.blocking_recv() {
            if ev.step >= 3 {
                cancel.cancel();
                return;
            }
        }
    });
    let r1 = stage2::run(&Stage2Job { config: part.clone(), resume: false, group: None }, &c, &mut |_| {}).unwrap();
    watcher.join().unwrap();
    assert!(r1.run.cancelled, "cancelled mid-run");
    let meta = read_state_meta(&part.checkpoint.state_dir.join("latest.safetensors")).unwrap();
    assert!(meta.counters.global_step < r_full.run.counters.global_step);
    let r2 = stage2::run(&Stage2Job { config: part.clone(), resume: true, group: None }, &ctx(), &mut |_| {}).unwrap();
    assert!(!r2.run.cancelled);
    assert_eq!(r2.run.counters, r_full.run.counters);
    assert_eq!(r2.val_action_error, r_full.val_action_error);
    assert_close(&published_tensors(&part), &published_tensors(&full), 0.0);
}

#[test]
fn published_adapter_reloads_with_peft_loader() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &["run.epochs=1", "cache.mode=vision"]);
    let r = run(&cfg);
    assert!(r.lora_params_changed);
    let ck = vla_finetune::checkpoint::publish::Publisher::new(&cfg.checkpoint.publish_dir)
        .unwrap()
        .latest_dir()
        .unwrap()
        .unwrap();
    vla_finetune::checkpoint::publish::verify(&ck).unwrap();
    let info = vla_finetune::checkpoint::deploy::DeployInfo::read(&ck).unwrap();
    assert_eq!(info.adapter.as_deref(), Some("adapter"));
    assert_eq!(info.base_model_id, vla_finetune::checkpoint::model_id::base_model_id(&fixture().base).unwrap());
    let mut m = vla_finetune::vlm::Qwen25VL::load(&fixture().base, tch::Kind::Float, Device::Cpu).unwrap();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let loaded = vla_finetune::vlm::peft::load_adapter(&mut m, &ck.join("adapter"), &vs.root()).unwrap();
    assert!(!loaded.layers.is_empty() && loaded.layers.iter().all(|l| l.contains("language_model")));
    let saved = read_safetensors(&ck.join("adapter/adapter_model.safetensors")).unwrap().tensors;
    let now = vla_finetune::vlm::lora::lora_parameters(&mut m);
    assert_eq!(saved.len(), now.len());
    for (name, t) in now {
        let (_, s) = saved.iter().find(|(k, _)| k.ends_with(&name)).unwrap();
        assert!(s.equal(&t), "{name}");
    }
    peft_gives_our_pooled_features(&ck.join("adapter"), &m, loaded.layers.len());
    let (heads, meta) =
        vla_finetune::policy::heads::PolicyHeads::load(&ck.join("heads.safetensors"), Device::Cpu).unwrap();
    assert!(matches!(meta.stage, vla_finetune::policy::heads_file::CheckpointStage::Stage2 { .. }));
    assert_eq!(heads.config().vl_dim, 32);
}

/// Python peft (`PeftModel.from_pretrained` on tiny_a with the published `adapter`) gives the
/// last hidden state and the pooled feature (mean over all tokens) that `adapted` (ours, with
/// the same adapter loaded) computes on a fixture case; the adapter visibly changes the features.
fn peft_gives_our_pooled_features(adapter: &Path, adapted: &vla_finetune::vlm::Qwen25VL, n_layers: usize) {
    let (_, p) = crate::support::vlm::processor(&fixture().base);
    let batch = p.collate(&[crate::support::vlm::case_sample(&p, "two_images")]).unwrap();
    let out = tch::no_grad(|| adapted.forward(&batch, false).unwrap());
    let pooled = out.pooled(Pooling::All).unwrap();
    let base = vla_finetune::vlm::Qwen25VL::load(&fixture().base, tch::Kind::Float, Device::Cpu).unwrap();
    let base_pooled = tch::no_grad(|| base.forward(&batch, false).unwrap()).pooled(Pooling::All).unwrap();
    let change = crate::support::vlm::rel_err(&pooled, &base_pooled);
    assert!(change > 1e-4, "the trained adapter changes pooled features by only {change:e}");
    let tmp = tempfile::tempdir().unwrap();
    let rust = tmp.path().join("rust.safetensors");
    Tensor::write_safetensors(
        &[("input_ids", batch.input_ids), ("last_hidden_state", out.last_hidden_state), ("pooled", pooled)],
        &rust,
    )
    .unwrap();
    let res = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_vlm_peft_forward.py"))
        .arg(&fixture().base)
        .arg(adapter)
        .arg("two_images")
        .arg(&rust)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&res.stderr));
    assert!(stdout.contains(&format!("OK {n_layers} adapted layers")) && stdout.contains("pooled"), "{stdout}");
}

#[test]
fn service_runs_stage2_rejects_a_second_start_and_cancels_with_a_consistent_state() {
    let _g = rng_lock();
    use vla_finetune::train::controller::RejectReason;
    use vla_finetune::train::job_record::JobState;
    use vla_finetune::train::service::{controller, job_view, start};
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServiceConfig::new(f.base.clone(), dir.path().join("runs"), dir.path().join("ck"));
    let (tx, _rx) = std::sync::mpsc::channel();
    let c = controller(cfg.clone(), ProgressHub::new(1024), tx);
    let req = stage2_request();
    let bad = StartRequest { overrides: "{cache.mode: sometimes}".into(), ..req.clone() };
    assert!(matches!(c.start(bad), StartResponse::Rejected(RejectReason::ConfigInvalid(m)) if m.contains("sometimes")));
    let missing = StartRequest { stage1_checkpoint: dir.path().join("nope").display().to_string(), ..req.clone() };
    assert!(
        matches!(c.start(missing), StartResponse::Rejected(RejectReason::ModelDirInvalid(m)) if m.contains("nope"))
    );
    let mut rx = c.progress().subscribe();
    let StartResponse::Accepted { job_id } = c.start(req.clone()) else { panic!("not started") };
    assert!(matches!(c.start(req), StartResponse::Rejected(RejectReason::AlreadyRunning { .. })));
    // Wait for the first optimizer step, then cancel.
    while let Ok(ev) = rx.blocking_recv() {
        if ev.step >= 1 {
            break;
        }
    }
    let state = dir.path().join("runs").join(&job_id).join("stage2/state/latest.safetensors");
    let before = cancel_within_a_step(&c, &cfg, &job_id, &state);

    // Resumed under its id, it continues from the saved step.
    let StartResponse::Accepted { job_id: again } =
        start(&c, &cfg, StartRequest { resume_job_id: job_id.clone(), ..Default::default() })
    else {
        panic!("not resumed")
    };
    assert_eq!(again, job_id);
    while let Ok(ev) = rx.blocking_recv() {
        if ev.job_id == job_id && ev.step > before {
            break;
        }
    }
    c.cancel(&job_id);
    c.join();
    let resumed = read_state_meta(&state).unwrap();
    assert!(resumed.counters.global_step > before, "{:?} after {before}", resumed.counters);
    let view = job_view(&c, &cfg, "").unwrap();
    assert_eq!((view.job_id, view.state), (job_id.clone(), JobState::Cancelled));
    resumes_with_overrides_or_of_unknown_jobs_are_rejected(&c, &cfg, &job_id);
}

/// A vision-cache stage-2 start of 50 epochs on the CPU from the fixture's stage-1 `latest`.
fn stage2_request() -> StartRequest {
    let f = fixture();
    StartRequest {
        dataset: f.dataset.display().to_string(),
        // The checkpoints root's `latest` names the stage-1 version.
        stage1_checkpoint: f.stage1.parent().unwrap().join("latest").display().to_string(),
        base_model: String::new(),
        overrides:
            "{run.epochs: 50, cache.mode: vision, model.compute_dtype: f32, run.device: cpu, memory.micro_batch: 1}"
                .into(),
        ..Default::default()
    }
}

/// Cancels the running `job_id`: stopped within a step of epoch 0 and resumable; returns its saved step.
fn cancel_within_a_step(c: &JobController<StartRequest>, cfg: &ServiceConfig, job_id: &str, state: &Path) -> u64 {
    use vla_finetune::train::job_record::JobState;
    use vla_finetune::train::service::job_view;
    c.cancel(job_id);
    let status = c.join();
    assert!(
        matches!(status, JobStatus::Finished { ref outcome, .. } if matches!(outcome, vla_finetune::train::controller::JobOutcome::Cancelled { .. })),
        "{status:?}"
    );
    let meta = read_state_meta(state).unwrap();
    assert!(
        meta.counters.global_step >= 1 && meta.counters.global_step <= 3,
        "stopped within a step: {:?}",
        meta.counters
    );
    assert_eq!(meta.counters.epoch, 0);
    let view = job_view(c, cfg, job_id).unwrap();
    assert!(
        view.state == JobState::Cancelled && view.resumable && view.record.as_ref().unwrap().stage == 2,
        "{view:?}"
    );
    meta.counters.global_step
}

/// A resume of `job_id` that also overrides settings, and a resume of an unknown job, are rejected.
fn resumes_with_overrides_or_of_unknown_jobs_are_rejected(
    c: &JobController<StartRequest>,
    cfg: &ServiceConfig,
    job_id: &str,
) {
    use vla_finetune::train::controller::RejectReason;
    use vla_finetune::train::service::start;
    let mixed = start(
        c,
        cfg,
        StartRequest { resume_job_id: job_id.to_string(), overrides: "{run.epochs: 2}".into(), ..Default::default() },
    );
    assert!(matches!(mixed, StartResponse::Rejected(RejectReason::NotResumable(_))), "{mixed:?}");
    let unknown = start(c, cfg, StartRequest { resume_job_id: "../x".into(), ..Default::default() });
    assert!(matches!(unknown, StartResponse::Rejected(RejectReason::UnknownJob(_))), "{unknown:?}");
}

#[test]
fn validation_in_chunks_of_the_micro_batch_equals_one_chunk() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let metrics = |micro_batch: usize| {
        let cfg = config(dir.path(), &["cache.mode=off"]);
        Stage2Task::new(&cfg, &stage2::resolve_memory(&cfg).unwrap()).unwrap().validation_metrics(micro_batch).unwrap()
    };
    // Chunks of 3 versus the whole validation split (fewer than 1000 samples) in one chunk.
    let (chunked, whole) = (metrics(3), metrics(1000));
    assert_eq!(chunked.keys().collect::<Vec<_>>(), whole.keys().collect::<Vec<_>>());
    assert!(chunked.contains_key("val_loss") && chunked.contains_key(stage2::BEST_METRIC));
    // Within 1e-6 relative: the errors reach ~50 (physical units), where an f32 ulp is 3.8e-6.
    for (k, v) in &chunked {
        assert!((v - whole[k]).abs() <= 1e-6 * v.abs().max(1.0), "{k}: {v} in chunks of 3, {} in one chunk", whole[k]);
    }
}

/// An out-of-memory while the features cache is built (in the first epoch's preparation) halves
/// the micro-batch and builds it again in smaller chunks: the run ends as one that never failed,
/// up to the float rounding of the other chunking.
#[test]
fn out_of_memory_while_the_features_cache_is_built_halves_the_micro_batch_and_builds_it_again() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let common =
        ["run.epochs=2", "cache.mode=features", "lora.dropout=0.0", "memory.micro_batch=4", "memory.accum_steps=2"];
    let reference = config(&dir.path().join("reference"), &common);
    let r0 = run(&reference);
    // The reach after the validation before training is the first layer of the cache build.
    let cfg = config(&dir.path().join("oom"), &common);
    let r = {
        let _oom = oom_injection::inject(Point::Forward, forward_points_before_training(4) + 1);
        run(&cfg)
    };
    assert_eq!(
        r.run.accumulation,
        Accumulation { micro_batch: 2, accum_steps: 4 },
        "halved once, same effective batch"
    );
    assert_eq!(r.run.counters, r0.run.counters);
    assert_eq!(r.run.validation.len(), r0.run.validation.len());
    for (a, b) in r.run.validation.iter().zip(&r0.run.validation) {
        for (k, v) in a {
            assert!(
                (v - b[k]).abs() <= 1e-5 * b[k].abs().max(1.0),
                "{k}: {v} after the out-of-memory, {} without",
                b[k]
            );
        }
    }
}

/// Vision mode reads every step's image embeddings from its cache: once the cache is built the
/// vision tower waits in host memory on an accelerator (on the CPU there is nowhere to move it).
#[test]
fn vision_mode_moves_the_vision_tower_off_the_accelerator_once_its_cache_is_built() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let (device, spec) =
        if tch::Cuda::is_available() { (Device::Cuda(0), "run.device=cuda") } else { (Device::Cpu, "run.device=cpu") };
    let (task, _, _) = task_run(&dir.path().join("v"), 1, &["cache.mode=vision", spec]);
    let mut devices = task.vl_weight_devices();
    devices.sort_by_key(|d| format!("{d:?}"));
    let mut want = vec![device, Device::Cpu];
    want.sort_by_key(|d| format!("{d:?}"));
    want.dedup();
    assert_eq!(devices, want, "language model on {device:?}, vision tower in host memory");
}

/// The next micro-batch's data prepared on a worker thread (while the current one computes) is
/// the data prepared in place: the same losses and validation, bit for bit.
#[test]
fn prefetching_the_next_micro_batch_on_a_worker_changes_nothing_but_where_data_is_prepared() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    for mode in ["off", "vision"] {
        let m = format!("cache.mode={mode}");
        let sets = [m.as_str(), "memory.micro_batch=2", "memory.accum_steps=2"];
        let (on, s_on, _) =
            task_run(&dir.path().join(format!("{mode}-on")), 2, &[&sets[..], &["data.prefetch=true"]].concat());
        let (off, s_off, _) =
            task_run(&dir.path().join(format!("{mode}-off")), 2, &[&sets[..], &["data.prefetch=false"]].concat());
        assert!(on.prefetched_micro_batches() > 0, "{mode}: the worker prepared micro-batches");
        assert_eq!(off.prefetched_micro_batches(), 0);
        assert_eq!(s_on.train_loss_per_epoch, s_off.train_loss_per_epoch, "{mode}");
        assert_eq!(s_on.validation, s_off.validation, "{mode}");
    }
}

#[test]
fn a_vision_cache_over_the_disk_budget_is_refused_before_it_is_built() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &["cache.mode=vision", "cache.disk_budget_mb=0", "run.epochs=1"]);
    let e = stage2::run(&Stage2Job { config: cfg.clone(), resume: false, group: None }, &ctx(), &mut |_| {})
        .expect_err("refused")
        .to_string();
    assert!(e.contains("cache.mode=vision") && e.contains("needs about") && e.contains("cache.disk_budget_mb"), "{e}");
    let cache = FeatureCache::open(&cfg.cache.dir, cfg.cache_config()).unwrap();
    assert_eq!(cache.stats().entries, 0, "nothing was written");
}

#[test]
fn a_lora_target_that_matches_no_language_model_layer_is_named_not_dropped() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    // `qproj` (a typo) would match nothing while `v_proj` matched: the regex built from the list
    // used to adapt v_proj alone and train on.
    let cfg = config(dir.path(), &["lora.target_modules=[v_proj, qproj]", "run.epochs=1"]);
    let e = stage2::run(&Stage2Job { config: cfg.clone(), resume: false, group: None }, &ctx(), &mut |_| {})
        .expect_err("refused")
        .to_string();
    assert!(e.contains("lora.target_modules") && e.contains("`qproj`") && e.contains("adapted: v_proj"), "{e}");
    assert!(!e.contains("`v_proj`"), "only the entry that matched nothing is named: {e}");
    // A vision-tower layer name is no language-model layer either (`qkv` exists only there).
    let cfg = config(&dir.path().join("b"), &["lora.target_modules=[q_proj, qkv]", "run.epochs=1"]);
    let e = stage2::run(&Stage2Job { config: cfg, resume: false, group: None }, &ctx(), &mut |_| {})
        .expect_err("refused")
        .to_string();
    assert!(e.contains("`qkv`") && e.contains("adapted: q_proj"), "{e}");
}

#[test]
fn cache_keys_for_features_depend_on_adapter_and_prompt_not_for_vision() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &["cache.mode=features"]);
    let task = Stage2Task::new(&cfg, &stage2::resolve_memory(&cfg).unwrap()).unwrap();
    assert_ne!(task.sample_key(0, "features", "a").unwrap(), task.sample_key(0, "features", "b").unwrap());
    assert_ne!(task.sample_key(0, "vision", "none").unwrap(), task.sample_key(0, "features", "none").unwrap());
    let cfg2 = config(dir.path(), &["cache.mode=features"]);
    let again = Stage2Task::new(&cfg2, &stage2::resolve_memory(&cfg2).unwrap()).unwrap();
    assert_eq!(task.sample_key(0, "features", "a").unwrap(), again.sample_key(0, "features", "a").unwrap());
    let _ = task.cache_status();
    // The compute dtype is part of every key: a bf16 value is never served to an f32 run.
    let bf16 = config(dir.path(), &["cache.mode=features", "model.compute_dtype=bf16"]);
    let bf16 = Stage2Task::new(&bf16, &stage2::resolve_memory(&bf16).unwrap()).unwrap();
    for kind in ["vision", "features"] {
        assert_ne!(task.sample_key(0, kind, "a").unwrap(), bf16.sample_key(0, kind, "a").unwrap(), "{kind}");
    }
}

/// A base model with the same config, file names and sizes but other weights (a merged or
/// re-fine-tuned one) is another model: another id (so other cache keys), and the stage-1
/// checkpoint trained on the original is refused.
#[test]
fn a_base_model_with_other_weights_of_the_same_size_is_another_model() {
    let _g = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("tiny_a_merged");
    std::fs::create_dir(&copy).unwrap();
    for f in std::fs::read_dir(&fixture().base).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() && !f.file_name().unwrap().to_string_lossy().starts_with('.') {
            std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
        }
    }
    let weights = copy.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&weights, &bytes).unwrap();
    let original = vla_finetune::checkpoint::model_id::base_model_id(&fixture().base).unwrap();
    assert_ne!(vla_finetune::checkpoint::model_id::base_model_id(&copy).unwrap(), original);
    let q = format!("model.base_model_dir={:?}", copy.display().to_string());
    let cfg = config(dir.path(), &["cache.mode=features", &q]);
    let e = Stage2Task::new(&cfg, &stage2::resolve_memory(&cfg).unwrap()).err().expect("refused").to_string();
    assert!(e.contains("was trained with base model") && e.contains(&original), "{e}");
}

/// `train-heads` (stage 1) killed mid-run and started again with `--resume` ends with the same
/// heads, counters and validation as an uninterrupted run, as `train` does.
#[test]
fn train_heads_resumes_after_a_kill_like_train() {
    use std::process::{Command, Stdio};
    let f = fixture_under_lock();
    let dir = tempfile::tempdir().unwrap();
    let cli = |name: &str, resume: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vla_finetune"));
        c.args([
            "train-heads",
            "--size",
            "small",
            "--epochs",
            "4",
            "--batch-size",
            "8",
            "--seed",
            "3",
            "--set",
            "val_every_epochs=2",
        ])
        .arg("--dataset")
        .arg(&f.dataset)
        .arg("--base-model")
        .arg(&f.base)
        .arg("--checkpoints")
        .arg(dir.path().join(name).join("ck"))
        .arg("--work-dir")
        .arg(dir.path().join(name).join("work"));
        if resume {
            c.arg("--resume");
        }
        c
    };
    let json = |o: std::process::Output| -> serde_json::Value {
        assert!(o.status.success(), "train-heads failed: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let full = json(cli("full", false).output().unwrap());

    let mut child = cli("part", false).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let state = dir.path().join("part/work/state/latest.safetensors");
    let t0 = std::time::Instant::now();
    while !state.exists() {
        assert!(child.try_wait().unwrap().is_none(), "train-heads ended before its first saved state");
        assert!(t0.elapsed().as_secs() < 600, "no state after 10 minutes");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL: no chance to save anything more
    child.wait().unwrap();
    let killed_at = read_state_meta(&state).unwrap().counters;
    assert!(killed_at.epoch < 4 && killed_at.global_step > 0, "killed mid-run: {killed_at:?}");

    let resumed = json(cli("part", true).output().unwrap());
    for key in
        ["global_step", "val_action_error", "val_action_error_per_dim", "best_val_action_error", "train_loss_per_epoch"]
    {
        assert_eq!(resumed[key], full[key], "`{key}`");
    }
    let heads = |r: &serde_json::Value| {
        let mut t =
            read_safetensors(&Path::new(r["checkpoint"].as_str().unwrap()).join("heads.safetensors")).unwrap().tensors;
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    assert_close(&heads(&resumed), &heads(&full), 0.0);
}

/// Stage 1 runs on the same guarded runner as Stage 2: a run worse than the version `latest`
/// names, on the same dataset, publishes its version (kept, verified) without moving `latest`
/// or announcing it; with `allow_worse_latest` the same run becomes latest and is announced.
#[test]
fn a_worse_stage1_run_on_the_same_data_is_kept_not_announced_unless_allowed() {
    let _g = rng_lock();
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ck");
    let job = |name: &str, train: HeadsTrainConfig| HeadsJob {
        dataset: f.dataset.clone(),
        base_model: f.base.clone(),
        checkpoints: root.clone(),
        work_dir: dir.path().join(name),
        train,
        heads: tiny_heads(),
        resume: false,
        group: None,
    };
    let metric =
        |v: &str| Publisher::new(&root).unwrap().published(v).unwrap().manifest.metrics[heads_job::BEST_METRIC];
    let mut announced = Vec::new();
    let good =
        heads_job::run(&job("good", stage1_training()), &ctx(), &mut |p| announced.push(p.version.clone())).unwrap();
    let good_version = good.published.unwrap().version;
    assert_eq!(Publisher::new(&root).unwrap().latest().unwrap().as_deref(), Some(good_version.as_str()));
    // The same heads untrained (learning rate 0): the validation error of the initialization.
    let untrained = HeadsTrainConfig { epochs: 1, lr: 0.0, ..stage1_training() };
    let before = announced.len();
    let worse =
        heads_job::run(&job("worse", untrained.clone()), &ctx(), &mut |p| announced.push(p.version.clone())).unwrap();
    let kept = worse.published.expect("a finished run reports its last checkpoint");
    assert!(
        metric(&kept.version) > metric(&good_version),
        "setup: the untrained run must be worse ({} vs {})",
        metric(&kept.version),
        metric(&good_version)
    );
    assert!(!kept.latest, "not made latest");
    assert!(kept.dir.is_dir() && Publisher::new(&root).unwrap().versions().unwrap().contains(&kept.version), "kept");
    assert_eq!(announced.len(), before, "not announced: {announced:?}");
    assert_eq!(
        Publisher::new(&root).unwrap().latest().unwrap().as_deref(),
        Some(good_version.as_str()),
        "latest stays"
    );
    // Allowed: the same worse run becomes latest and is announced.
    let allowed = HeadsTrainConfig { allow_worse_latest: true, ..untrained };
    let r = heads_job::run(&job("allowed", allowed), &ctx(), &mut |p| announced.push(p.version.clone())).unwrap();
    let p = r.published.unwrap();
    assert!(p.latest && metric(&p.version) > metric(&good_version));
    assert_eq!(announced.last(), Some(&p.version));
    assert_eq!(Publisher::new(&root).unwrap().latest().unwrap(), Some(p.version));
}

/// Stage 1 with `vl_pooling: last` records it in deploy.json; Stage 2 (features mode) pools the
/// same way: its error before training, with the stage-1 heads, is stage 1's own last
/// validation error (with `all` features the same heads give another error, even from the same
/// cache folder), and its deploy.json keeps `last` for the policy.
#[test]
fn stage2_pools_vl_features_as_its_stage1_checkpoint_was_trained() {
    let _g = rng_lock();
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let stage1 = |pooling: Pooling, name: &str| {
        let job = HeadsJob {
            dataset: f.dataset.clone(),
            base_model: f.base.clone(),
            checkpoints: dir.path().join(name).join("ck"),
            work_dir: dir.path().join(name).join("work"),
            train: HeadsTrainConfig { vl_pooling: pooling, ..stage1_training() },
            heads: tiny_heads(),
            resume: false,
            group: None,
        };
        heads_job::run(&job, &ctx(), &mut |_| {}).unwrap()
    };
    let last = stage1(Pooling::Last, "last");
    let ck1 = last.published.as_ref().unwrap().dir.clone();
    assert_eq!(DeployInfo::read(&ck1).unwrap().pooling, "last");
    let stage2 = |ck1: &Path, name: &str| {
        let out = dir.path().join(name);
        let ck1 = format!("model.stage1_checkpoint={:?}", ck1.display().to_string());
        // One cache folder for both runs: features pooled otherwise have other keys.
        let cache = format!("cache.dir={:?}", dir.path().join("cache").display().to_string());
        let cfg = config(&out, &["run.epochs=1", "run.seed=3", "cache.mode=features", &ck1, &cache]);
        (run(&cfg), cfg)
    };
    let (r, cfg) = stage2(&ck1, "s2_last");
    let s1_error = last.val_action_error_after.unwrap();
    // Within f32 rounding (1e-6 relative; a clean clone measured 1e-8): stage 1 and Stage 2 run
    // the VL model over differently composed batches, so the same features differ in the last bits.
    let close = |v: f64| (v - s1_error).abs() <= 1e-6 * s1_error.abs().max(1.0);
    assert!(close(r.val_action_error_before), "{} vs stage 1 {s1_error}", r.val_action_error_before);
    let ck2 = Publisher::new(&cfg.checkpoint.publish_dir).unwrap().latest_dir().unwrap().unwrap();
    assert_eq!(DeployInfo::read(&ck2).unwrap().pooling, "last");
    // The same heads read `all` features: another error (the comparison above can fail).
    let all_ck = dir.path().join("all_ck");
    copy_dir(&ck1, &all_ck);
    let mut deploy = DeployInfo::read(&all_ck).unwrap();
    deploy.pooling = "all".into();
    std::fs::write(all_ck.join(DEPLOY_FILE), deploy.to_json()).unwrap();
    let entries = |cfg: &TrainConfig| FeatureCache::open(&cfg.cache.dir, cfg.cache_config()).unwrap().stats().entries;
    let last_entries = entries(&cfg);
    let (r_all, cfg_all) = stage2(&all_ck, "s2_all");
    // The `all` run found no `last` features to reuse: it added entries of its own.
    assert!(entries(&cfg_all) > last_entries, "{} vs {last_entries}", entries(&cfg_all));
    assert!(!close(r_all.val_action_error_before), "{}", r_all.val_action_error_before);
}

#[test]
fn stage1_reports_its_validation_error_with_the_vl_features_of_other_samples() {
    let _g = rng_lock();
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let train = stage1_training();
    let job = HeadsJob {
        dataset: f.dataset.clone(),
        base_model: f.base.clone(),
        checkpoints: dir.path().join("ck"),
        work_dir: dir.path().join("work"),
        train: train.clone(),
        heads: tiny_heads(),
        resume: false,
        group: None,
    };
    let r = heads_job::run(&job, &ctx(), &mut |_| {}).unwrap();
    let swapped = r.val_action_error_conditioning_swapped.expect("a validated run reports it");
    // By hand: the published heads on features computed here, each validation sample's taken
    // from the validation sample half the split further on.
    let ds = Dataset::open(&f.dataset).unwrap();
    let vlm = Qwen25VL::load(&f.base, tch::Kind::Float, Device::Cpu).unwrap();
    let vl_cfg = vla_finetune::vlm::Config::from_file(&f.base.join("config.json")).unwrap();
    let processor = VlProcessor::from_model_dir(&f.base, &vl_cfg, None, None).unwrap();
    let features: Vec<Tensor> = (0..ds.len())
        .map(|i| {
            let s = ds.sample(i).unwrap();
            let batch = processor.collate(&[processor.sample(&s.images, &s.instruction).unwrap()]).unwrap();
            tch::no_grad(|| vlm.forward(&batch, false)).unwrap().pooled(train.vl_pooling).unwrap()
        })
        .collect();
    let val = ds.split_indices(Split::Val);
    let moved = heads_job::swap_conditioning(&features, &val);
    let k = val.len() / 2;
    assert!(moved[val[0]].equal(&features[val[k]]) && moved[val[k]].equal(&features[val[(2 * k) % val.len()]]));
    assert!(
        ds.split_indices(Split::Train).iter().all(|&i| moved[i].equal(&features[i])),
        "training samples keep theirs"
    );
    let heads_file = r.published.as_ref().unwrap().dir.join(HEADS_FILE);
    let (heads, _) = PolicyHeads::load(&heads_file, Device::Cpu).unwrap();
    let by_hand = |feats: &[Tensor]| {
        let e = heads_job::validation_error(&heads, &ds, &val, feats, train.seed, train.batch_size).unwrap();
        ActionAxes::from_dataset(&ds).normalized(&e)
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
    assert!(close(by_hand(&features), r.val_action_error_after.unwrap()), "the unswapped error is the run's");
    assert!(close(by_hand(&moved), swapped), "{} by hand vs {swapped} reported", by_hand(&moved));
    assert_ne!(swapped, r.val_action_error_after.unwrap(), "other features give another error");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}
