//! A reference PyTorch checkpoint (written by scripts/reference_heads.py, the re-implementation of
//! the reference heads) converted by scripts/convert_reference_ckpt.py loads in Rust and computes
//! the same sensor features, condition, denoiser epsilon and DDIM samples as PyTorch.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::rng_lock;
use safetensors::SafeTensors;
use tch::{Device, Kind, Tensor};
use vla_finetune::policy::{CheckpointStage, CondInput, NoiseRng, PolicyError, PolicyHeads, VlInput};

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn script(name: &str) -> PathBuf {
    Path::new(ROOT).join("scripts").join(name)
}

fn small_config() -> PathBuf {
    Path::new(ROOT).join("tests/fixtures/policy/small_config.json")
}

/// Runs a Python command on one thread (the CI machine's 2 cores are shared).
fn run(cmd: &mut Command) -> std::process::Output {
    cmd.env("OMP_NUM_THREADS", "1").output().expect("run python")
}

/// Writes the reference checkpoint and its inputs/outputs into `dir`.
fn make_reference(dir: &Path) {
    let out = run(Command::new(PYTHON)
        .arg(script("reference_heads.py"))
        .arg("--config")
        .arg(small_config())
        .arg("--out")
        .arg(dir));
    assert!(out.status.success(), "reference_heads.py failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn convert(src: &Path, dst: &Path, extra: &[&str]) -> std::process::Output {
    run(Command::new(PYTHON).arg(script("convert_reference_ckpt.py")).arg(src).arg(dst).args(extra))
}

fn read_tensors(path: &Path) -> Vec<(String, Tensor)> {
    let buf = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let kind = match v.dtype() {
                safetensors::Dtype::F32 => Kind::Float,
                safetensors::Dtype::I64 => Kind::Int64,
                d => panic!("{n}: unexpected dtype {d:?}"),
            };
            let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
            (n, Tensor::from_data_size(v.data(), &shape, kind))
        })
        .collect()
}

fn get(ts: &[(String, Tensor)], name: &str) -> Tensor {
    ts.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no `{name}`")).1.shallow_clone()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

#[test]
fn converted_reference_checkpoint_matches_pytorch() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    make_reference(dir.path());
    let dst = dir.path().join("heads.safetensors");
    let out = convert(&dir.path().join("reference.pt"), &dst, &["--config", small_config().to_str().unwrap()]);
    assert!(out.status.success(), "convert failed: {}", String::from_utf8_lossy(&out.stderr));

    let (heads, meta) = PolicyHeads::load(&dst, Device::Cpu).unwrap();
    assert_eq!(meta.stage, CheckpointStage::Stage1);
    assert_eq!(meta.config.sensor.conv_channels, vec![16, 32]);
    assert_eq!(meta.extra["reference_epoch"], serde_json::json!(20));

    let io = read_tensors(&dir.path().join("io.safetensors"));
    let vl = VlInput::pooled(get(&io, "vl"));
    let sensor = get(&io, "sensor");
    let c = CondInput { vl: &vl, sensor: &sensor, state: None };
    let _g = tch::no_grad_guard();

    let feat = heads.encode_sensor(&sensor, false);
    let d = max_diff(&feat, &get(&io, "sensor_feature"));
    assert!(d < 1e-4, "sensor feature differs from PyTorch by {d}");

    let cond = heads.condition(&c, false).unwrap();
    let d = max_diff(&cond, &get(&io, "cond"));
    assert!(d < 1e-4, "condition differs from PyTorch by {d}");

    let eps = heads.denoise(&get(&io, "x_t"), &get(&io, "t"), &cond, false);
    let d = max_diff(&eps, &get(&io, "eps"));
    assert!(d < 1e-4, "epsilon differs from PyTorch by {d}");

    // The sampler: same initial noise, deterministic DDIM with 5 trailing steps, x0 clamped to
    // [-1, 1] (the training range under the identity normalization of a converted checkpoint).
    let x = heads.sample_from(&c, get(&io, "noise"), 5, 0.0, &mut NoiseRng::new(0)).unwrap();
    let reference = get(&io, "ddim");
    let scale = reference.abs().max().double_value(&[]).max(1.0);
    let d = max_diff(&x, &reference);
    assert!(d < 1e-4 * scale, "DDIM sample differs from PyTorch by {d} (scale {scale})");
}

#[test]
fn convert_rejects_bad_reference_checkpoints() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    make_reference(dir.path());
    let src = dir.path().join("reference.pt");
    let dst = dir.path().join("heads.safetensors");

    // A config contradicting the weights.
    let cfg = dir.path().join("bad.json");
    std::fs::write(&cfg, r#"{"sensor": {"d_model": 64}}"#).unwrap();
    let out = convert(&src, &dst, &["--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("sensor.d_model = 64, but the weights have 32"), "{err}");

    // A checkpoint without the action expert, and one with a mis-shaped tensor.
    let edit = |code: &str, name: &str| {
        let p = dir.path().join(name);
        let py = format!(
            "import torch; c = torch.load({src:?}, weights_only=True); {code}; torch.save(c, {p:?})",
            src = src.to_str().unwrap(),
            p = p.to_str().unwrap()
        );
        assert!(run(Command::new(PYTHON).arg("-c").arg(py)).status.success());
        p
    };
    let no_expert = edit("del c['action_expert']", "no_expert.pt");
    let out = convert(&no_expert, &dst, &["--config", small_config().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("`sensor_encoder` and `action_expert`"), "{err}");

    let bad_shape = edit("c['action_expert']['output.bias'] = torch.zeros(5)", "bad_shape.pt");
    let out = convert(&bad_shape, &dst, &["--config", small_config().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("`action_expert.output.bias` has shape (5,), expected (3,)"),
        "{err}"
    );
    assert!(!dst.exists(), "nothing is written on error");

    // Our loader refuses a converted file whose pos_embed was dropped (strict loading).
    let out = convert(&src, &dst, &["--config", small_config().to_str().unwrap()]);
    assert!(out.status.success());
    let py = format!(
        "from safetensors import safe_open; from safetensors.torch import save_file\n\
         f = safe_open({p:?}, 'pt'); t = {{k: f.get_tensor(k) for k in f.keys() if k != 'action_expert.pos_embed'}}\n\
         save_file(t, {p:?}, metadata=f.metadata())",
        p = dst.to_str().unwrap()
    );
    assert!(run(Command::new(PYTHON).arg("-c").arg(py)).status.success());
    match PolicyHeads::load(&dst, Device::Cpu) {
        Err(PolicyError::CheckpointTensor { tensor, reason, .. }) => {
            assert_eq!(tensor, "action_expert.pos_embed");
            assert!(reason.contains("missing"), "{reason}");
        }
        other => panic!("expected a missing-tensor error, got {other:?}"),
    }
}
