//! LoRA on the whole Qwen2.5-VL model, PEFT round trip in both directions on the tiny fixture
//! model tiny_a (fixtures from scripts/gen_vlm_lora_fixtures.py, peft 0.21.2, transformers
//! 5.23.0): an adapter trained-shape by Python peft loads into ours (library and
//! `vlm-features --adapter`), and an adapter we save with non-zero B gives, through
//! `PeftModel.from_pretrained`, the last hidden state our forward computes.

use std::process::Command;

use crate::support::rng_lock;
use crate::support::vlm::*;
use tch::{nn, Device, Kind, Tensor};
use vla_finetune::vlm::lora::{inject_lora, lora_parameters, LoraConfig, TargetModules};
use vla_finetune::vlm::peft::{load_adapter, save_adapter, AdapterMeta};
use vla_finetune::vlm::Qwen25VL;

/// f32 tolerance of the full forward (same as the backbone's reference tests).
const F32_TOL: f64 = 1e-4;

fn base_dir() -> std::path::PathBuf {
    fixtures().join("tiny_a")
}

fn forward_case(model: &Qwen25VL, case: &str) -> (Tensor, Tensor) {
    let (_, p) = processor(&base_dir());
    let batch = p.collate(&[case_sample(&p, case)]).unwrap();
    let out = tch::no_grad(|| model.forward(&batch, false).unwrap());
    (batch.input_ids, out.last_hidden_state)
}

#[test]
fn python_peft_adapter_loads_and_matches_peft_outputs() {
    let _rng = rng_lock();
    let mut model = Qwen25VL::load(&base_dir(), Kind::Float, Device::Cpu).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let loaded = load_adapter(&mut model, &fixtures().join("lora_a"), &vs.root()).unwrap();
    // 2 LLM layers x (q, k, v, o, gate, down) + 3 vision blocks x (qkv, gate, down).
    assert_eq!(loaded.layers.len(), 2 * 6 + 3 * 3, "{:?}", loaded.layers);
    assert!(loaded.layers.iter().any(|p| p.starts_with("model.visual.blocks.")));
    assert!(loaded.config.use_rslora);
    let base = Qwen25VL::load(&base_dir(), Kind::Float, Device::Cpu).unwrap();
    for case in ["two_images", "one_image"] {
        let want = read(&format!("lora_a/{case}.f32.safetensors"))["last_hidden_state"].shallow_clone();
        let (_, got) = forward_case(&model, case);
        let e = rel_err(&got.get(0), &want);
        assert!(e <= F32_TOL, "{case}: rel err {e} against peft");
        // The adapter matters: the base model is far from peft's output.
        let (_, plain) = forward_case(&base, case);
        assert!(rel_err(&plain.get(0), &want) > 1e-2, "{case}: adapter has no visible effect");
    }
}

#[test]
fn our_adapter_with_nonzero_b_loads_in_peft_with_equal_outputs() {
    let _rng = rng_lock();
    tch::manual_seed(3);
    let mut model = Qwen25VL::load(&base_dir(), Kind::Float, Device::Cpu).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 16.0,
        lora_dropout: 0.0,
        // The default LLM q/k/v/o widened to the vision blocks' attention and the merger (not
        // `visual.patch_embed.proj`: a Conv3d, which PEFT would adapt and we do not).
        target_modules: TargetModules::Regex(
            r".*(language_model.*\.(q|k|v|o)_proj|visual\.blocks\.\d+\.attn\.(qkv|proj)|visual\.merger\.mlp\.0)".into(),
        ),
        exclude_modules: None,
        use_rslora: false,
    };
    let layers = inject_lora(&mut model, &cfg, &vs.root()).unwrap();
    assert!(layers.iter().any(|p| p.ends_with("attn.qkv")) && layers.iter().any(|p| p.ends_with("merger.mlp.0")));
    tch::no_grad(|| {
        for (name, t) in lora_parameters(&mut model) {
            if name.ends_with("lora_B.weight") {
                let mut t = t;
                t.copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    let meta = AdapterMeta { base_model_name_or_path: Some(base_dir().display().to_string()), task_type: None };
    save_adapter(&mut model, &cfg, &meta, &adapter).unwrap();
    let (ids, hidden) = forward_case(&model, "two_images");
    let out = tmp.path().join("rust.safetensors");
    Tensor::write_safetensors(&[("input_ids", ids), ("last_hidden_state", hidden)], &out).unwrap();
    let res = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_vlm_peft_forward.py"))
        .arg(base_dir())
        .arg(&adapter)
        .arg("two_images")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&res.stderr));
    assert!(stdout.contains(&format!("OK {} adapted layers", layers.len())), "{stdout}");
}

#[test]
fn vlm_features_with_adapter_matches_python_peft() {
    let m = manifest();
    let case = &m["cases"]["two_images"];
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("features.safetensors");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vla_finetune"));
    cmd.args(["vlm-features", "--model"]).arg(base_dir()).arg("--adapter").arg(fixtures().join("lora_a"));
    for img in case["images"].as_array().unwrap() {
        cmd.arg("--image").arg(fixtures().join("images").join(img.as_str().unwrap()));
    }
    cmd.args(["--prompt", case["text"].as_str().unwrap(), "--device", "cpu"]);
    cmd.args(["--min-pixels", &m["min_pixels"].to_string(), "--max-pixels", &m["max_pixels"].to_string()]);
    let res = cmd.arg("--out").arg(&out).output().unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let got: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out).unwrap().into_iter().collect();
    let want = read("lora_a/two_images.f32.safetensors");
    let e = rel_err(&got["last_hidden_state"].get(0), &want["last_hidden_state"]);
    assert!(e <= F32_TOL, "vlm-features --adapter: rel err {e} against peft");
}

#[test]
fn vlm_features_rejects_an_adapter_for_another_base() {
    // lora_a was made for tiny_a; tiny_b has other widths.
    let tmp = tempfile::tempdir().unwrap();
    let res = Command::new(env!("CARGO_BIN_EXE_vla_finetune"))
        .args(["vlm-features", "--model"])
        .arg(fixtures().join("tiny_b"))
        .arg("--adapter")
        .arg(fixtures().join("lora_a"))
        .arg("--image")
        .arg(fixtures().join("images/img_a.png"))
        .args(["--prompt", "hi", "--device", "cpu", "--out"])
        .arg(tmp.path().join("o.safetensors"))
        .output()
        .unwrap();
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("lora_a") && err.contains("shape"), "{err}");
}
