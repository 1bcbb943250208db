//! The policy runtime with the REAL model loader (runtime::VlaLoader) on the tiny Qwen2.5-VL
//! fixture: Stage 2 checkpoints with a PEFT adapter (features equal a directly loaded
//! Qwen25VL + adapter; the base and the previous version unchanged), adapter compatibility
//! errors, and hot-swap under a 20 Hz control loop on a virtual clock (zero missed ticks by
//! design: loading and VL refresh never run on the control thread) with checkpoints published by
//! the trainer's Publisher and picked up from `latest`; actions equal `VlaPolicy::act` on the
//! same inputs and seed; corrupted and shape-incompatible checkpoints rejected; stale guard.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tch::{nn, Device, Kind, Tensor};
use vla_finetune::checkpoint::deploy::{DeployInfo, ProcessorSettings, DEPLOY_FILE, DEPLOY_FORMAT_VERSION, HEADS_FILE};
use vla_finetune::checkpoint::model_id::base_model_id;
use vla_finetune::checkpoint::publish::{PublishItem, PublishRequest, Publisher, Source};
use vla_finetune::dataset::episode::RgbImage;
use vla_finetune::policy::heads_file::CheckpointStage;
use vla_finetune::policy::{
    ActionExpertConfig, DiffusionConfig, FusionConfig, FusionKind, NormStats, ObservationBatch, PolicyConfig,
    PolicyHeads, SensorEncoderConfig, VlInput, VlaPolicy,
};
use vla_finetune::runtime::*;
use vla_finetune::vlm::{Pooling, Qwen25VL, VlProcessor};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const MS: Duration = Duration::from_millis(1);
const CAM: &str = "wrist";
const CHANNELS: usize = 3;
const WINDOW: usize = 8;
const HORIZON: usize = 4;
const INSTRUCTION: &str = "insert the needle into the red target";

fn base_dir() -> PathBuf {
    Path::new(ROOT).join("tests/fixtures/vlm/tiny_a")
}

fn lora_dir() -> PathBuf {
    Path::new(ROOT).join("tests/fixtures/vlm/lora_a")
}

fn processor() -> VlProcessor {
    let cfg = vla_finetune::vlm::Config::from_file(&base_dir().join("config.json")).unwrap();
    VlProcessor::from_model_dir(&base_dir(), &cfg, None, None).unwrap()
}

/// A 56x56 test image (the processor's minimum size) with a colour gradient.
fn image() -> RgbImage {
    let data = (0..56 * 56).flat_map(|i| [(i % 56 * 4) as u8, (i / 56 * 4) as u8, 120]).collect();
    RgbImage { width: 56, height: 56, data }
}

/// Input and output shapes of a checkpoint.
#[derive(Clone)]
struct Io {
    cameras: Vec<String>,
    channels: usize,
    window: usize,
    horizon: usize,
}

/// The shapes the rig's runtime feeds.
fn rig_io() -> Io {
    Io { cameras: vec![CAM.into()], channels: CHANNELS, window: WINDOW, horizon: HORIZON }
}

/// Tiny heads for the tiny VL model (hidden size 32).
fn heads_config(io: &Io, action_dim: i64) -> PolicyConfig {
    PolicyConfig {
        vl_dim: 32,
        state_dim: 0,
        sensor: SensorEncoderConfig {
            window: io.window as i64,
            in_channels: io.channels as i64,
            conv_channels: vec![8, 16],
            d_model: 16,
            n_heads: 2,
            n_layers: 1,
            ff_dim: 32,
            out_dim: 8,
            dropout: 0.0,
        },
        fusion: FusionConfig { kind: FusionKind::Concat, n_heads: 2 },
        expert: ActionExpertConfig {
            horizon: io.horizon as i64,
            action_dim,
            d_model: 16,
            n_heads: 2,
            n_layers: 1,
            ff_dim: 32,
            dropout: 0.0,
        },
        diffusion: DiffusionConfig { train_steps: 20, default_ddim_steps: 3, ..DiffusionConfig::default() },
    }
}

/// What a checkpoint to publish holds.
struct Spec {
    seed: i64,
    action_dim: i64,
    adapter: Option<PathBuf>,
    /// Flip a byte of heads.safetensors after the manifest is written.
    corrupt: bool,
}

/// Publishes a deployable checkpoint with the trainer's Publisher (moves `latest`).
fn publish(root: &Path, work: &Path, spec: &Spec) -> String {
    publish_io(root, work, spec, &rig_io())
}

/// [`publish`] for other shapes.
fn publish_io(root: &Path, work: &Path, spec: &Spec, io: &Io) -> String {
    tch::manual_seed(spec.seed);
    let heads = PolicyHeads::new(
        heads_config(io, spec.action_dim),
        NormStats::identity(io.channels, 0, spec.action_dim as usize),
        Device::Cpu,
    )
    .unwrap();
    let heads_path = work.join(format!("heads_{}.safetensors", spec.seed));
    let stage = match spec.adapter {
        Some(_) => CheckpointStage::Stage2 {
            adapter_dir: "adapter".into(),
            base_model_id: base_model_id(&base_dir()).unwrap(),
        },
        None => CheckpointStage::Stage1,
    };
    heads.save(&heads_path, stage, BTreeMap::new()).unwrap();
    let image = processor().image;
    let deploy = DeployInfo {
        format_version: DEPLOY_FORMAT_VERSION,
        base_model_id: base_model_id(&base_dir()).unwrap(),
        adapter: spec.adapter.as_ref().map(|_| "adapter".to_string()),
        cameras: io.cameras.clone(),
        processor: ProcessorSettings { min_pixels: image.min_pixels, max_pixels: image.max_pixels },
        pooling: "all".into(),
        sensor_channels: io.channels,
        sensor_window: io.window,
        sensor_window_s: 0.1,
        state_dim: 0,
        horizon: io.horizon,
        action_dim: spec.action_dim as usize,
        step_period_s: 0.05,
        ddim_steps: 3,
        dtype: "f32".into(),
    };
    let mut items = vec![
        PublishItem { dest: HEADS_FILE.into(), source: Source::File(heads_path) },
        PublishItem { dest: DEPLOY_FILE.into(), source: Source::Bytes(deploy.to_json().into_bytes()) },
    ];
    if let Some(a) = &spec.adapter {
        items.push(PublishItem { dest: "adapter".into(), source: Source::Dir(a.clone()) });
    }
    let publisher = Publisher::new(root).unwrap();
    let staged = publisher
        .stage(&PublishRequest {
            base_model_id: deploy.base_model_id.clone(),
            metrics: BTreeMap::new(),
            info: json!({"stage": 2}),
            items,
        })
        .unwrap();
    if spec.corrupt {
        let p = staged.tmp_dir.join(HEADS_FILE);
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x10;
        std::fs::write(&p, bytes).unwrap();
    }
    publisher.commit(staged).unwrap().version
}

/// Reference VL features: Qwen25VL loaded directly (plus the adapter via vlm::peft), pooled over
/// all tokens of the prompt with `img`.
fn reference_features(adapter: Option<&Path>, img: &RgbImage) -> Tensor {
    let mut m = Qwen25VL::load(&base_dir(), Kind::Float, Device::Cpu).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    if let Some(a) = adapter {
        vla_finetune::vlm::peft::load_adapter(&mut m, a, &vs.root()).unwrap();
    }
    let p = processor();
    let batch = p.collate(&[p.sample(std::slice::from_ref(img), INSTRUCTION).unwrap()]).unwrap();
    tch::no_grad(|| m.forward(&batch, false)).unwrap().pooled(Pooling::All).unwrap()
}

fn observation(img: &RgbImage, sensor: Vec<f32>, taken_at: Duration) -> vla_finetune::runtime::Observation {
    vla_finetune::runtime::Observation {
        frames: vec![CameraFrame { name: CAM.into(), image: Arc::new(img.clone()), stamp_ns: 0 }],
        sensor: SensorWindow { channels: CHANNELS, values: sensor, stamps_ns: (0..WINDOW as i64).collect() },
        state: None,
        instruction: INSTRUCTION.into(),
        taken_at,
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn adapter_versions_share_the_base_and_match_a_directly_loaded_adapter() {
    tch::set_num_threads(1);
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let loader = VlaLoader::new(&base_dir(), 0, Device::Cpu, Kind::Float).unwrap();
    let v1 = publish(root.path(), work.path(), &Spec { seed: 1, action_dim: 2, adapter: None, corrupt: false });
    let v2 =
        publish(root.path(), work.path(), &Spec { seed: 2, action_dim: 2, adapter: Some(lora_dir()), corrupt: false });
    let img = image();
    let obs = observation(&img, vec![0.1; WINDOW * CHANNELS], 7 * MS);
    let feats = |enc: &mut Box<dyn VlEncoder>| enc.features(&obs).unwrap().get::<Tensor>().unwrap().shallow_clone();

    let d1 = root.path().join(&v1);
    let m1 = loader.verify(&d1).unwrap();
    let mut l1 = loader.load(&d1, &m1).unwrap();
    let base_before = feats(&mut l1.encoder);
    let base_ref = reference_features(None, &img);
    assert_eq!(base_before.size(), vec![1, 32]);
    assert!(
        max_diff(&base_before, &base_ref) < 1e-6,
        "heads-only version = base model: {}",
        max_diff(&base_before, &base_ref)
    );

    let d2 = root.path().join(&v2);
    let m2 = loader.verify(&d2).unwrap();
    let mut l2 = loader.load(&d2, &m2).unwrap();
    let adapted = feats(&mut l2.encoder);
    let adapted_ref = reference_features(Some(&lora_dir()), &img);
    assert!(
        max_diff(&adapted, &adapted_ref) < 1e-6,
        "adapter version = Qwen25VL + load_adapter: {}",
        max_diff(&adapted, &adapted_ref)
    );
    assert!(max_diff(&adapted, &base_ref) > 1e-3, "the adapter changes the features");

    // The previous version (and the shared base) compute exactly what they did before.
    let base_after = feats(&mut l1.encoder);
    assert_eq!(max_diff(&base_before, &base_after), 0.0);
    // A second adapter version sharing the same base gives the same adapted features.
    let mut l2b = loader.load(&d2, &m2).unwrap();
    assert_eq!(max_diff(&feats(&mut l2b.encoder), &adapted), 0.0);
    drop(l2);
    assert_eq!(max_diff(&feats(&mut l1.encoder), &base_before), 0.0);
}

#[test]
fn a_bf16_loader_runs_the_vl_model_in_bf16_and_acts_like_the_f32_one() {
    tch::set_num_threads(1);
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let v =
        publish(root.path(), work.path(), &Spec { seed: 2, action_dim: 2, adapter: Some(lora_dir()), corrupt: false });
    let dir = root.path().join(&v);
    let img = image();
    let obs = observation(&img, (0..WINDOW * CHANNELS).map(|i| (i as f32 * 0.37).sin()).collect(), 7 * MS);
    let run = |kind: Kind| {
        let loader = VlaLoader::new(&base_dir(), 0, Device::Cpu, kind).unwrap();
        assert_eq!(loader.placement(), (Device::Cpu, kind));
        let meta = loader.verify(&dir).unwrap();
        let mut m = loader.load(&dir, &meta).unwrap();
        let f = m.encoder.features(&obs).unwrap();
        let chunk = m.model.act_with(&f, &obs).unwrap();
        (f.get::<Tensor>().unwrap().shallow_clone(), Tensor::from_slice(&chunk.values))
    };
    let (f32_feats, f32_act) = run(Kind::Float);
    let (bf16_feats, bf16_act) = run(Kind::BFloat16);
    let rel = |a: &Tensor, b: &Tensor| {
        let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
        (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[])
    };
    // bf16 keeps 8 mantissa bits: a few parts in a thousand per op, ~1e-2 after the stack.
    let feat_err = rel(&bf16_feats, &f32_feats);
    // Two f32 runs are bit-identical (one thread), so a difference above float noise shows the
    // weights really ran in bf16.
    assert!(feat_err > 1e-4 && feat_err < 3e-2, "pooled features bf16 vs f32: relative error {feat_err}");
    eprintln!("bf16 vs f32: features {feat_err:.2e}, actions {:.2e}", rel(&bf16_act, &f32_act));
    let feat_ref = rel(&f32_feats, &reference_features(Some(&lora_dir()), &img));
    assert!(feat_ref < 1e-6, "f32 loader = Qwen25VL + load_adapter: {feat_ref}");
    // Same noise seed, heads in f32 on both: the chunks differ only through the features.
    let act_err = rel(&bf16_act, &f32_act);
    assert!(act_err < 1e-2, "action chunk bf16 vs f32: relative error {act_err}");
}

/// Copies lora_a and applies `edit` to its adapter_config.json.
fn edited_adapter(dir: &Path, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let out = dir.join("adapter_src");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(lora_dir().join(f), out.join(f)).unwrap();
    }
    let p = out.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    out
}

#[test]
fn incompatible_adapters_are_refused_naming_file_and_field() {
    tch::set_num_threads(1);
    let loader = VlaLoader::new(&base_dir(), 0, Device::Cpu, Kind::Float).unwrap();
    let root = tempfile::tempdir().unwrap();

    let work = tempfile::tempdir().unwrap();
    let a = edited_adapter(work.path(), |v| v["target_modules"] = json!(["nonexistent_proj"]));
    let v = publish(root.path(), work.path(), &Spec { seed: 3, action_dim: 2, adapter: Some(a), corrupt: false });
    let e = loader.verify(&root.path().join(&v)).unwrap_err().to_string();
    assert!(
        e.contains("adapter_config.json")
            && e.contains("target_modules")
            && e.contains("nonexistent_proj")
            && e.contains("select none"),
        "{e}"
    );

    // Rank 8 in the config, rank-4 tensors in the file: passes verify, the load names the tensor.
    let work = tempfile::tempdir().unwrap();
    let a = edited_adapter(work.path(), |v| v["r"] = json!(8));
    let v = publish(root.path(), work.path(), &Spec { seed: 4, action_dim: 2, adapter: Some(a), corrupt: false });
    let dir = root.path().join(&v);
    let meta = loader.verify(&dir).unwrap();
    let e = loader.load(&dir, &meta).err().expect("rank mismatch").to_string();
    // Whichever LoRA tensor is checked first is named: A is [r, in], B is [out, r].
    let names_rank =
        (e.contains("lora_A") && e.contains("expected [8,")) || (e.contains("lora_B") && e.contains(", 8]"));
    assert!(e.contains("adapter_model.safetensors") && names_rank, "{e}");
}

/// The control loop on a virtual clock, fed by the test.
struct Rig {
    clock: Arc<ManualClock>,
    core: ControlCore,
    handle: RuntimeHandle,
    sched: TickScheduler,
    img: RgbImage,
    stamp: i64,
    feed_sensor: bool,
    /// Sensor window fed before each tick, by tick index.
    windows: HashMap<u64, Vec<f32>>,
    notices: Vec<RuntimeNotice>,
}

impl Rig {
    fn new(root: &Path) -> Rig {
        let clock = Arc::new(ManualClock::new());
        let loader = Arc::new(VlaLoader::new(&base_dir(), 0, Device::Cpu, Kind::Float).unwrap());
        let cfg = RuntimeConfig {
            inputs: InputConfig {
                cameras: vec![CameraInput { name: CAM.into(), max_age: 500 * MS }],
                sensor: SensorInput { name: "oct".into(), channels: CHANNELS, window: WINDOW, max_age: 100 * MS },
                state: None,
                instruction: INSTRUCTION.into(),
            },
            control: ControlConfig {
                period: 50 * MS,
                tick_budget: 50 * MS,
                vl_refresh_ticks: 4,
                stale_behavior: StaleBehavior::Nothing,
                start_enabled: true,
            },
            horizon: HORIZON,
            action_dim: 2,
            base_model_id: Some(loader.base_model_id().to_string()),
            watch: Some(WatchConfig { root: root.to_path_buf(), poll: 5 * MS }),
        };
        let (core, handle) = build(cfg, loader, clock.clone()).unwrap();
        let sched = core.scheduler();
        Rig {
            clock,
            core,
            handle,
            sched,
            img: image(),
            stamp: 0,
            feed_sensor: true,
            windows: HashMap::new(),
            notices: Vec::new(),
        }
    }

    /// One tick on schedule after feeding fresh inputs; returns what it published.
    fn step(&mut self) -> Vec<ActionEvent> {
        let next = self.sched.next_start();
        let tick = (next.as_nanos() / (50 * MS).as_nanos()) as u64;
        self.handle.inputs.push_frame(CAM, self.img.clone(), self.stamp).unwrap();
        if self.feed_sensor {
            let values: Vec<f32> =
                (0..WINDOW * CHANNELS).map(|i| ((tick as usize * 7 + i) % 11) as f32 * 0.1 - 0.5).collect();
            let stamps: Vec<i64> = (0..WINDOW as i64).map(|i| self.stamp + i).collect();
            self.handle.inputs.push_sensor(&values, &stamps).unwrap();
            self.windows.insert(tick, values);
        }
        self.stamp += 100;
        self.clock.sleep_until(next);
        let slot = self.sched.begin(self.clock.now());
        self.core.tick(slot);
        while let Ok(n) = self.handle.notices.try_recv() {
            self.notices.push(n);
        }
        let mut out = Vec::new();
        while let Ok(e) = self.handle.events.try_recv() {
            out.push(e);
        }
        out
    }

    /// Ticks until `cond` holds (loading and VL refresh run in real time on their threads).
    fn step_until(&mut self, what: &str, cond: impl Fn(&PolicyStatus) -> bool) -> Vec<ActionEvent> {
        let t0 = Instant::now();
        let mut events = Vec::new();
        while !cond(self.core.status()) {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "timed out waiting for {what}; status {:?}",
                self.core.status()
            );
            events.extend(self.step());
            std::thread::sleep(5 * MS);
        }
        events
    }
}

/// The chunk `VlaPolicy::act` gives for the same VL features, sensor window and seed.
fn reference_chunk(ckpt: &Path, features: &Tensor, window: &[f32], seed: u64) -> Vec<f32> {
    let (heads, _) = PolicyHeads::load(&ckpt.join(HEADS_FILE), Device::Cpu).unwrap();
    let policy = VlaPolicy::new(heads);
    let obs = ObservationBatch {
        vl: Some(VlInput::pooled(features.shallow_clone())),
        vl_inputs: Vec::new(),
        sensor: Tensor::from_slice(window).reshape([1, WINDOW as i64, CHANNELS as i64]),
        state: None,
    };
    Vec::<f32>::try_from(policy.act(&obs, Some(3), seed).unwrap().reshape([-1])).unwrap()
}

fn assert_reference(rig: &Rig, ev: &ActionEvent, ckpt: &Path, features: &Tensor) {
    let window = &rig.windows[&ev.tick];
    let obs = observation(&rig.img, window.clone(), ev.obs_taken_at);
    let expected = reference_chunk(ckpt, features, window, action_seed(&obs));
    assert_eq!(ev.chunk.values.len(), expected.len());
    let diff = ev.chunk.values.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(
        diff < 1e-5,
        "tick {} of {}: runtime {:?} vs VlaPolicy::act {:?}",
        ev.tick,
        ev.chunk.version,
        ev.chunk.values,
        expected
    );
}

#[test]
fn hot_swap_under_load_with_the_real_loader() {
    tch::set_num_threads(1);
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let base_feats = reference_features(None, &image());
    let lora_feats = reference_features(Some(&lora_dir()), &image());
    let mut rig = Rig::new(root.path());

    // No checkpoint yet: ticks run, nothing is published.
    for _ in 0..3 {
        assert!(rig.step().is_empty());
    }
    assert_eq!(rig.core.status().active_version, "");

    // Stage 1 (heads-only) version picked up from `latest`.
    let v1 = publish(root.path(), work.path(), &Spec { seed: 11, action_dim: 2, adapter: None, corrupt: false });
    let mut ev = rig.step_until("v1 active", |s| s.active_version == v1);
    for _ in 0..6 {
        ev.extend(rig.step());
    }
    assert!(ev.len() >= 6 && ev.iter().all(|e| e.chunk.version == v1));
    for e in &ev {
        assert_reference(&rig, e, &root.path().join(&v1), &base_feats);
    }

    // Stage 2 version with an adapter: actions switch between two ticks, one per tick throughout.
    let v2 =
        publish(root.path(), work.path(), &Spec { seed: 12, action_dim: 2, adapter: Some(lora_dir()), corrupt: false });
    let ticks_before = rig.core.status().ticks;
    let mut ev = rig.step_until("v2 active", |s| s.active_version == v2);
    for _ in 0..6 {
        ev.extend(rig.step());
    }
    assert_eq!(ev.len() as u64, rig.core.status().ticks - ticks_before, "one chunk per tick across the swap");
    let first_new = ev.iter().position(|e| e.chunk.version == v2).expect("an action of v2");
    assert!(
        ev[..first_new].iter().all(|e| e.chunk.version == v1) && ev[first_new..].iter().all(|e| e.chunk.version == v2)
    );
    for e in &ev[..first_new] {
        assert_reference(&rig, e, &root.path().join(&v1), &base_feats);
    }
    for e in &ev[first_new..] {
        assert_reference(&rig, e, &root.path().join(&v2), &lora_feats);
    }
    assert_eq!(rig.core.status().previous_version, v1);

    let (v3, v4) = rejects_a_corrupt_and_an_incompatible_version(&mut rig, root.path(), work.path(), &v2, &lora_feats);
    stale_sensor_stops_the_actions(&mut rig);

    let st = rig.core.status().clone();
    assert_eq!((st.swaps, st.rejected, st.rollbacks, st.missed_ticks), (2, 2, 0, 0), "{st:?}");
    let rejected: Vec<&str> = rig
        .notices
        .iter()
        .filter_map(|n| match n {
            RuntimeNotice::Rejected { version, .. } => Some(version.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(rejected, vec![v3.as_str(), v4.as_str()]);
    let first: Vec<&str> = rig
        .notices
        .iter()
        .filter_map(|n| match n {
            RuntimeNotice::FirstAction { version, .. } => Some(version.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(first, vec![v1.as_str(), v2.as_str()]);
    assert!(rig
        .notices
        .iter()
        .any(|n| matches!(n, RuntimeNotice::Stale { inputs } if inputs == &vec!["oct".to_string()])));
    rig.handle.shutdown();
}

/// A corrupted version, then one of another action_dim: both rejected while v2 keeps acting.
fn rejects_a_corrupt_and_an_incompatible_version(
    rig: &mut Rig,
    root: &Path,
    work: &Path,
    v2: &str,
    lora_feats: &Tensor,
) -> (String, String) {
    // Corrupted after its manifest was written: rejected, v2 keeps acting.
    let v3 = publish(root, work, &Spec { seed: 13, action_dim: 2, adapter: Some(lora_dir()), corrupt: true });
    let ev = rig.step_until("v3 rejected", |s| s.rejected == 1);
    assert!(ev.iter().all(|e| e.chunk.version == v2));
    let msg = rig.core.status().message.clone();
    assert!(msg.starts_with(&format!("rejected {v3}")) && msg.contains(HEADS_FILE), "{msg}");

    // Another action_dim: rejected before loading, v2 keeps acting.
    let v4 = publish(root, work, &Spec { seed: 14, action_dim: 3, adapter: None, corrupt: false });
    let ev = rig.step_until("v4 rejected", |s| s.rejected == 2);
    assert!(ev.iter().all(|e| e.chunk.version == v2));
    let msg = rig.core.status().message.clone();
    assert!(msg.contains(&v4) && msg.contains("incompatible action_dim: runtime expects 2, checkpoint has 3"), "{msg}");
    let ev: Vec<_> = (0..4).flat_map(|_| rig.step()).collect();
    assert_eq!(ev.len(), 4);
    for e in &ev {
        assert_reference(rig, e, &root.join(v2), lora_feats);
    }
    (v3, v4)
}

fn stale_sensor_stops_the_actions(rig: &mut Rig) {
    // Stale guard: the sensor goes silent past its 100 ms limit, no action; it resumes, actions again.
    rig.feed_sensor = false;
    let ev: Vec<_> = (0..4).flat_map(|_| rig.step()).collect();
    assert!(ev.len() <= 2, "at most the ticks within 100 ms of the last sample act: {}", ev.len());
    assert_eq!(rig.core.status().stale_inputs, vec!["oct".to_string()]);
    assert!(!rig.core.status().acting);
    rig.feed_sensor = true;
    let ev = rig.step();
    assert_eq!(ev.len(), 1);
    assert!(rig.core.status().stale_inputs.is_empty());
}

/// `vla_finetune policy --sim` as its own process beside a publishing "trainer" (this test): it
/// starts without a checkpoint, picks up a Stage 1 and a Stage 2 version from `latest`, rejects a
/// corrupted one, writes its status JSON and exits at --duration-s. Timing numbers are printed
/// (docs/benchmarks.md), not asserted; `POLICY_CLI_SECONDS` lengthens the run.
#[test]
fn policy_cli_process_hot_swaps_published_checkpoints() {
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let status = work.path().join("status.json");
    let seconds: f64 = std::env::var("POLICY_CLI_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(14.0);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vla_finetune"))
        .args(["policy", "--sim", "--rate-hz", "10", "--status-period-s", "0.5"])
        .arg("--base-model")
        .arg(base_dir())
        .arg("--checkpoints")
        .arg(root.path())
        .arg("--status-json")
        .arg(&status)
        .args(["--duration-s", &seconds.to_string()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sim = Io { cameras: vec!["camera0".into(), "camera1".into()], channels: 1026, window: 65, horizon: 8 };
    let t0 = Instant::now();
    let wait_status = |what: &str, cond: &dyn Fn(&serde_json::Value) -> bool| loop {
        assert!(t0.elapsed() < Duration::from_secs_f64(seconds + 60.0), "timed out waiting for {what}");
        if let Some(v) = std::fs::read(&status).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        {
            if cond(&v) {
                return v;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let first = wait_status("the first status", &|v| v["ticks"].as_u64().unwrap_or(0) >= 5);
    assert_eq!(first["active_version"], "", "no checkpoint yet");
    assert_eq!(first["actions"], 0, "no action before the first checkpoint");
    let v1 =
        publish_io(root.path(), work.path(), &Spec { seed: 21, action_dim: 7, adapter: None, corrupt: false }, &sim);
    wait_status("v1 acting", &|v| {
        v["swaps"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["version"] == v1.as_str() && s["hotswap_latency_ms"].is_number()))
    });
    let v2 = publish_io(
        root.path(),
        work.path(),
        &Spec { seed: 22, action_dim: 7, adapter: Some(lora_dir()), corrupt: false },
        &sim,
    );
    wait_status("v2 acting", &|v| {
        v["swaps"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["version"] == v2.as_str() && s["hotswap_latency_ms"].is_number()))
    });
    let v3 = publish_io(
        root.path(),
        work.path(),
        &Spec { seed: 23, action_dim: 7, adapter: Some(lora_dir()), corrupt: true },
        &sim,
    );
    wait_status("v3 rejected", &|v| {
        v["rejected"].as_array().is_some_and(|r| r.iter().any(|r| r["version"] == v3.as_str()))
    });
    // Keep stdin open (wait() would close it, which also stops the policy).
    let _stdin = child.stdin.take();
    let exit = child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    let last: serde_json::Value = serde_json::from_slice(&std::fs::read(&status).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&last).unwrap());
    assert_eq!(last["finished"], true);
    assert_eq!(last["stop_reason"], "duration reached");
    assert_eq!(last["active_version"], v2.as_str());
    let rejected = last["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 1);
    assert!(rejected[0]["reason"].as_str().unwrap().contains(HEADS_FILE), "{}", rejected[0]);
    assert!(last["actions"].as_u64().unwrap() > 0 && last["control_latency"]["p50_ms"].is_number());
    // `--device auto --dtype auto`: f32 on the CPU, bf16 on a GPU.
    let expected = if tch::Cuda::is_available() { ("Cuda(0)", "BFloat16") } else { ("Cpu", "Float") };
    assert_eq!((last["device"].as_str().unwrap(), last["dtype"].as_str().unwrap()), expected);
}

#[test]
fn policy_cli_names_a_missing_device_or_unknown_dtype() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value, expected) in
        [("--device", "cuda:99", "CUDA device 99 is not available"), ("--dtype", "f16", "expected auto, f32 or bf16")]
    {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_vla_finetune"))
            .args(["policy", "--sim", "--duration-s", "1", "--checkpoints"])
            .arg(dir.path().join("checkpoints"))
            .arg("--base-model")
            .arg(base_dir())
            .args([flag, value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(flag) && err.contains(expected), "{flag} {value}: {err}");
    }
    assert!(!dir.path().join("checkpoints").exists(), "arguments are checked before anything is created");
}

/// A checkpoints folder that does not exist is said loudly (stderr, status) and waited for, not
/// created; a status file that cannot be written any more does not stop the control loop; with
/// --require-checkpoint a root without `latest` is refused at startup.
#[test]
fn policy_cli_reports_a_missing_root_and_survives_an_unwritable_status() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-checkpoints");
    let status_dir = dir.path().join("s");
    std::fs::create_dir(&status_dir).unwrap();
    let status = status_dir.join("status.json");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vla_finetune"))
        .args(["policy", "--sim", "--rate-hz", "10", "--status-period-s", "0.2", "--duration-s", "6", "--checkpoints"])
        .arg(&missing)
        .arg("--base-model")
        .arg(base_dir())
        .arg("--status-json")
        .arg(&status)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let first = loop {
        assert!(t0.elapsed() < Duration::from_secs(60), "no status written");
        if let Some(v) = std::fs::read(&status).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        {
            break v;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let warnings = first["warnings"].as_array().unwrap();
    assert!(warnings.iter().any(|w| w.as_str().unwrap().contains("no-such-checkpoints does not exist")), "{first}");
    // The status folder becomes a file: every later write fails.
    std::fs::remove_dir_all(&status_dir).unwrap();
    std::fs::write(&status_dir, b"").unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("status file") && err.contains("not written (control goes on)"), "{err}");
    assert!(err.contains("policy stopped (duration reached)"), "{err}");
    assert!(!missing.exists(), "the folder is not created");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vla_finetune"))
        .args(["policy", "--sim", "--require-checkpoint", "--checkpoints"])
        .arg(&missing)
        .arg("--base-model")
        .arg(base_dir())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no published `latest` and --require-checkpoint was given"), "{err}");
}
