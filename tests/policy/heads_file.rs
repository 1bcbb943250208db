//! Stage-1 / stage-2 checkpoints: round trip, header-only metadata, and clear errors for
//! corrupted or mismatched files (each names the file and the tensor or field).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::support::rng_lock;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use tch::{Device, Kind, Tensor};
use vla_finetune::policy::heads_file::META_KEY;
use vla_finetune::policy::{
    ActionExpertConfig, CheckpointStage, CondInput, DiffusionConfig, FeatureStats, HeadsFileMeta, NormMode, NormStats,
    Normalizer, PolicyConfig, PolicyError, PolicyHeads, SensorEncoderConfig, VlInput,
};

const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

fn config() -> PolicyConfig {
    tch::set_num_threads(1);
    PolicyConfig {
        vl_dim: 8,
        state_dim: 0,
        sensor: SensorEncoderConfig {
            window: 12,
            in_channels: 3,
            conv_channels: vec![8, 16],
            d_model: 16,
            n_heads: 2,
            n_layers: 1,
            ff_dim: 32,
            out_dim: 12,
            dropout: 0.1,
        },
        expert: ActionExpertConfig {
            horizon: 4,
            action_dim: 2,
            d_model: 16,
            n_heads: 4,
            n_layers: 2,
            ff_dim: 32,
            dropout: 0.1,
        },
        diffusion: DiffusionConfig { train_steps: 20, ..DiffusionConfig::default() },
        ..PolicyConfig::default()
    }
}

fn trained_heads() -> PolicyHeads {
    tch::manual_seed(3);
    let stats = FeatureStats::from_samples(&[1.0, -4.0, 3.0, 8.0, 2.0, 0.0], 2).unwrap();
    let norm = NormStats { action: Normalizer { mode: NormMode::Quantile, stats }, ..NormStats::identity(3, 0, 2) };
    let h = PolicyHeads::new(config(), norm, Device::Cpu).unwrap();
    // One training-mode pass so the BatchNorm running statistics differ from their init.
    let vl = VlInput::pooled(Tensor::randn([4, 8], CPU));
    let sensor = Tensor::randn([4, 12, 3], CPU) * 3.0 + 1.0;
    let _ = h
        .loss(&CondInput { vl: &vl, sensor: &sensor, state: None }, &Tensor::randn([4, 4, 2], CPU), &[1, 2, 3, 4], true)
        .unwrap();
    h
}

fn act(h: &PolicyHeads) -> Tensor {
    tch::manual_seed(99);
    let vl = VlInput::pooled(Tensor::randn([2, 8], CPU));
    let sensor = Tensor::randn([2, 12, 3], CPU);
    h.sample(&CondInput { vl: &vl, sensor: &sensor, state: None }, 10, 5).unwrap()
}

#[test]
fn save_load_round_trip_stage1_and_stage2() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let h = trained_heads();
    let path = dir.path().join("heads.safetensors");
    let extra = BTreeMap::from([("epoch".to_string(), serde_json::json!(7))]);
    let saved = h.save(&path, CheckpointStage::Stage1, extra).unwrap();
    let (loaded, meta) = PolicyHeads::load(&path, Device::Cpu).unwrap();
    // Everything round-trips to the last bit, the schedule's f64s included (a one-ulp change
    // there changes the sampled actions).
    assert_eq!(meta, saved);
    assert_eq!(meta.schedule, *h.schedule());
    assert_eq!(meta.config, *h.config());
    assert_eq!(meta.normalization, *h.norm());
    assert_eq!(meta.extra["epoch"], 7);
    let (a, b) = (h.var_store().variables(), loaded.var_store().variables());
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} differs after load");
    }
    assert!(
        a.keys().any(|n| n.ends_with("running_var"))
            && !a["sensor_encoder.conv.1.running_var"].equal(&Tensor::ones([8], CPU))
    );
    assert!(act(&h).equal(&act(&loaded)), "same outputs after load");
    assert!(!dir.path().read_dir().unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains(".tmp")));

    let stage2 =
        CheckpointStage::Stage2 { adapter_dir: "adapter".into(), base_model_id: "Qwen/Qwen2.5-VL-3B-Instruct".into() };
    let p2 = dir.path().join("stage2.safetensors");
    h.save(&p2, stage2.clone(), BTreeMap::new()).unwrap();
    assert_eq!(HeadsFileMeta::read(&p2).unwrap().stage, stage2);

    // The file is plain safetensors: the metadata JSON is readable by any safetensors reader.
    let buf = std::fs::read(&p2).unwrap();
    let (_, header) = SafeTensors::read_metadata(&buf).unwrap();
    let json: serde_json::Value = serde_json::from_str(&header.metadata().as_ref().unwrap()[META_KEY]).unwrap();
    assert_eq!(json["stage"]["stage"], "stage2");
    assert_eq!(json["config"]["diffusion"]["train_steps"], 20);
}

/// Rewrites a checkpoint: `edit` may change tensors (name -> (dtype, shape, bytes)) and metadata.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>, &mut serde_json::Value),
) {
    let buf = std::fs::read(src).unwrap();
    let (_, header) = SafeTensors::read_metadata(&buf).unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(&header.metadata().as_ref().unwrap()[META_KEY]).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    let mut tensors: BTreeMap<_, _> =
        st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
    edit(&mut tensors, &mut meta);
    let views: Vec<_> =
        tensors.iter().map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let md = Some(HashMap::from([(META_KEY.to_string(), meta.to_string())]));
    std::fs::write(dst, safetensors::tensor::serialize(views, &md).unwrap()).unwrap();
}

fn load_err(path: &Path) -> PolicyError {
    PolicyHeads::load(path, Device::Cpu).expect_err("loading must fail")
}

fn tensor_error(e: PolicyError) -> (String, String) {
    match e {
        PolicyError::CheckpointTensor { tensor, reason, .. } => (tensor, reason),
        other => panic!("expected a tensor error, got {other}"),
    }
}

#[test]
fn corrupted_or_mismatched_checkpoints_fail_loudly() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    trained_heads().save(&good, CheckpointStage::Stage1, BTreeMap::new()).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let bad = dir.path().join("bad.safetensors");

    // Truncated file and garbage header.
    std::fs::write(&bad, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&bad);
    assert!(matches!(e, PolicyError::Checkpoint { .. }) && e.to_string().contains("bad.safetensors"), "{e}");
    let mut garbage = bytes.clone();
    garbage[10] = b'#';
    std::fs::write(&bad, &garbage).unwrap();
    assert!(matches!(load_err(&bad), PolicyError::Checkpoint { .. }));
    assert!(matches!(load_err(&dir.path().join("absent.safetensors")), PolicyError::Io { .. }));

    // A missing, an extra, a mis-shaped, a wrong-dtype and a non-finite tensor.
    rewrite(&good, &bad, |t, _| {
        t.remove("action_expert.transformer.layers.1.linear2.weight");
    });
    assert_eq!(
        tensor_error(load_err(&bad)),
        ("action_expert.transformer.layers.1.linear2.weight".into(), "is missing".into())
    );
    rewrite(&good, &bad, |t, _| {
        t.insert("action_expert.extra_head.weight".into(), (Dtype::F32, vec![1], vec![0; 4]));
    });
    assert_eq!(tensor_error(load_err(&bad)).0, "action_expert.extra_head.weight");
    rewrite(&good, &bad, |t, _| {
        t.insert("sensor_encoder.pos_embed".into(), (Dtype::F32, vec![2, 16], vec![0; 128]));
    });
    let (name, reason) = tensor_error(load_err(&bad));
    assert_eq!(name, "sensor_encoder.pos_embed");
    assert!(reason.contains("shape [2, 16], expected [3, 16]"), "{reason}");
    rewrite(&good, &bad, |t, _| {
        let e = t.get_mut("action_expert.output.bias").unwrap();
        *e = (Dtype::F16, vec![2], vec![0; 4]);
    });
    assert!(tensor_error(load_err(&bad)).1.contains("dtype F16, expected F32"));
    rewrite(&good, &bad, |t, _| {
        let e = t.get_mut("action_expert.output.bias").unwrap();
        e.2[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert_eq!(tensor_error(load_err(&bad)), ("action_expert.output.bias".into(), "has 1 non-finite value(s)".into()));

    // Metadata: a config the weights do not fit, an invalid config, a foreign schedule, stats of
    // the wrong size, a missing or newer-format header.
    rewrite(&good, &bad, |_, m| m["config"]["expert"]["ff_dim"] = 64.into());
    let (name, reason) = tensor_error(load_err(&bad));
    assert!(name.starts_with("action_expert.transformer.layers.0.linear"), "{name}: {reason}");
    rewrite(&good, &bad, |_, m| m["config"]["sensor"]["n_heads"] = 5.into());
    let e = load_err(&bad).to_string();
    assert!(e.contains("sensor.n_heads"), "{e}");
    rewrite(&good, &bad, |_, m| m["schedule"]["betas"][3] = 0.5.into());
    let e = load_err(&bad).to_string();
    assert!(e.contains("schedule") && e.contains("entry 3"), "{e}");
    rewrite(&good, &bad, |_, m| m["normalization"]["action"]["stats"]["std"] = serde_json::json!([1.0]));
    let e = load_err(&bad).to_string();
    assert!(e.contains("action.std") && e.contains("expected 2"), "{e}");
    rewrite(&good, &bad, |_, m| m["format_version"] = 2.into());
    assert!(load_err(&bad).to_string().contains("format version 2"));
    rewrite(&good, &bad, |_, m| {
        m.as_object_mut().unwrap().remove("config");
    });
    assert!(load_err(&bad).to_string().contains("missing field `config`"));
    // The header-only reader applies the same checks.
    assert!(HeadsFileMeta::read(&bad).is_err());
    assert!(HeadsFileMeta::read(&good).is_ok());
}
