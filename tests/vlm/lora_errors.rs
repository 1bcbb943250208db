//! Bad input: adapters for another base, broken configs and files, targets matching nothing.
//! Every error must name the thing and what was expected, and leave the model untouched.

use std::path::Path;

use crate::support::lora::*;
use crate::support::rng_lock;
use serde_json::Value;
use tch::{Device, Kind, Tensor};
use vla_finetune::vlm::lora::{inject_lora, LoraConfig, LoraError, TargetModules};
use vla_finetune::vlm::peft::{load_adapter, PeftError};

/// Copies a fixture adapter into a temp dir, letting `edit` change its config JSON.
fn adapter_copy(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("peft_list");
    std::fs::copy(src.join("adapter_model.safetensors"), dir.path().join("adapter_model.safetensors")).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(dir.path().join("adapter_config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    dir
}

fn rewrite_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = dir.join("adapter_model.safetensors");
    let mut t = Tensor::read_safetensors(&path).unwrap();
    edit(&mut t);
    Tensor::write_safetensors(&t, &path).unwrap();
}

fn load_err(dir: &Path) -> (PeftError, LinearModel) {
    let mut model = base_model();
    let vs = var_store();
    let err = load_adapter(&mut model, dir, &vs.root()).expect_err("load must fail");
    assert!(model.linears.iter().all(|l| l.adapter.is_none()), "failed load modified the model");
    (err, model)
}

#[test]
fn adapter_for_another_base_is_a_shape_error_naming_key_and_shapes() {
    let _rng = rng_lock();
    // Same module names, hidden size 40 instead of 32 (another base model).
    let mut model = base_model();
    for l in &mut model.linears {
        if l.path.contains("language_model") {
            let out = if l.path.ends_with("k_proj") || l.path.ends_with("v_proj") { 20 } else { 40 };
            l.weight = Tensor::zeros([out, 40], (Kind::Float, Device::Cpu));
        }
    }
    let vs = var_store();
    let err = load_adapter(&mut model, &fixtures().join("peft_list"), &vs.root()).unwrap_err();
    let msg = err.to_string();
    match err {
        PeftError::Shape { key, expected, found, .. } => {
            assert!(key.starts_with("base_model.model.model.language_model.layers."), "{key}");
            assert!(key.ends_with(".lora_A.weight") || key.ends_with(".lora_B.weight"), "{key}");
            assert!(expected != found);
            assert!(expected == vec![4, 40] || expected[0] == 40 || expected[0] == 20, "{expected:?}");
        }
        other => panic!("expected a shape error, got {other}"),
    }
    assert!(msg.contains("adapter_model.safetensors") && msg.contains("expected"), "{msg}");
    assert!(model.linears.iter().all(|l| l.adapter.is_none()));
}

#[test]
fn missing_config_keys_are_named() {
    let _rng = rng_lock();
    for key in ["r", "lora_alpha", "target_modules", "peft_type"] {
        let dir = adapter_copy(|c| {
            c.remove(key);
        });
        let (err, _) = load_err(dir.path());
        assert!(matches!(&err, PeftError::MissingKey { key: k, .. } if *k == key), "{key}: {err}");
        assert!(err.to_string().contains("adapter_config.json") && err.to_string().contains(key));
    }
    let dir = tempfile::tempdir().unwrap();
    let (err, _) = load_err(dir.path());
    assert!(matches!(err, PeftError::Io { .. }), "{err}");
}

#[test]
fn bad_config_values_and_unsupported_features_are_errors() {
    let _rng = rng_lock();
    let cases: Vec<(&str, Value)> = vec![
        ("r", Value::from(0)),
        ("r", Value::from("eight")),
        ("peft_type", Value::from("IA3")),
        ("use_dora", Value::from(true)),
        ("bias", Value::from("all")),
        ("rank_pattern", serde_json::json!({"q_proj": 8})),
        ("lora_dropout", Value::from(1.5)),
        ("target_modules", Value::from(3)),
        ("target_modules", Value::from("(unclosed")),
    ];
    for (key, value) in cases {
        let dir = adapter_copy(|c| {
            c.insert(key.to_string(), value.clone());
        });
        let (err, _) = load_err(dir.path());
        let msg = err.to_string();
        assert!(msg.contains(key), "{key}={value}: {msg}");
    }
    let dir = adapter_copy(|_| {});
    std::fs::write(dir.path().join("adapter_config.json"), "{\"r\": 4,").unwrap();
    let (err, _) = load_err(dir.path());
    assert!(matches!(err, PeftError::Json { .. }), "{err}");
}

#[test]
fn targets_matching_nothing_are_an_error() {
    let _rng = rng_lock();
    let mut model = base_model();
    let vs = var_store();
    let cfg =
        LoraConfig { target_modules: TargetModules::Suffixes(vec!["attn_proj_typo".into()]), ..LoraConfig::default() };
    let err = inject_lora(&mut model, &cfg, &vs.root()).unwrap_err();
    assert!(matches!(err, LoraError::NoMatch { count: 27, .. }), "{err}");
    assert!(err.to_string().contains("attn_proj_typo"), "{err}");

    // A suffix must match whole name components: "_proj" is not "q_proj".
    let cfg = LoraConfig { target_modules: TargetModules::Suffixes(vec!["_proj".into()]), ..LoraConfig::default() };
    let err = inject_lora(&mut model, &cfg, &vs.root()).unwrap_err();
    assert!(matches!(err, LoraError::NoMatch { .. }), "{err}");

    let dir = adapter_copy(|c| {
        c.insert("target_modules".into(), serde_json::json!(["nonexistent"]));
    });
    let (err, _) = load_err(dir.path());
    assert!(matches!(err, PeftError::Lora(LoraError::NoMatch { .. })), "{err}");
}

#[test]
fn unknown_missing_and_non_finite_tensors_are_named() {
    let _rng = rng_lock();
    let dir = adapter_copy(|_| {});
    rewrite_tensors(dir.path(), |t| {
        t.push((
            "base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight".into(),
            Tensor::zeros([4, 16], (Kind::Float, Device::Cpu)),
        ))
    });
    let (err, _) = load_err(dir.path());
    assert!(matches!(&err, PeftError::UnknownKey { key, .. } if key.contains("visual.blocks.0.attn.qkv")), "{err}");

    let dir = adapter_copy(|_| {});
    rewrite_tensors(dir.path(), |t| {
        t.push((
            "base_model.model.lm_head.modules_to_save.weight".into(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        ))
    });
    let (err, _) = load_err(dir.path());
    assert!(matches!(&err, PeftError::UnknownKey { key, .. } if key.contains("lm_head")), "{err}");

    let missing = "base_model.model.model.language_model.layers.1.self_attn.v_proj.lora_B.weight";
    let dir = adapter_copy(|_| {});
    rewrite_tensors(dir.path(), |t| t.retain(|(k, _)| k != missing));
    let (err, _) = load_err(dir.path());
    assert!(matches!(&err, PeftError::MissingTensor { key, .. } if key == missing), "{err}");

    let nan_key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight";
    let dir = adapter_copy(|_| {});
    rewrite_tensors(dir.path(), |t| {
        for (k, v) in t.iter_mut() {
            if k == nan_key {
                *v = v.fill(f64::NAN);
            }
        }
    });
    let (err, _) = load_err(dir.path());
    assert!(matches!(&err, PeftError::BadTensor { key, .. } if key == nan_key), "{err}");
}

#[test]
fn truncated_weights_file_is_an_error() {
    let _rng = rng_lock();
    let dir = adapter_copy(|_| {});
    let path = dir.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let (err, _) = load_err(dir.path());
    assert!(matches!(err, PeftError::Safetensors { .. }), "{err}");
    assert!(err.to_string().contains("adapter_model.safetensors"));
}

#[test]
fn injecting_twice_is_refused() {
    let _rng = rng_lock();
    let mut model = base_model();
    let vs = var_store();
    inject_lora(&mut model, &LoraConfig::default(), &vs.root()).unwrap();
    let err = inject_lora(&mut model, &LoraConfig::default(), &vs.root()).unwrap_err();
    assert!(matches!(err, LoraError::AlreadyAdapted(ref p) if p.contains("q_proj")), "{err}");
}
