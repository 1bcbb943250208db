//! PEFT compatibility at layer level, both ways, against Python peft 0.21.2 /
//! transformers 5.23.0 (fixtures from scripts/gen_lora_fixtures.py; reverse check by
//! scripts/check_peft_adapter.py).

use std::collections::HashMap;
use std::process::Command;

use crate::support::lora::*;
use crate::support::rng_lock;
use serde_json::Value;
use tch::Tensor;
use vla_finetune::vlm::lora::{inject_lora, lora_parameters, LoraConfig, TargetModules};
use vla_finetune::vlm::peft::{adapter_config_json, load_adapter, read_adapter_config, save_adapter, AdapterMeta};

/// Loads a Python-written adapter and checks every adapted layer against PEFT's outputs.
fn check_python_adapter(adapter: &str, io: &str) -> Vec<String> {
    let mut model = base_model();
    let vs = var_store();
    let loaded = load_adapter(&mut model, &fixtures().join(adapter), &vs.root()).unwrap();
    let io = read_io(&fixtures().join(io));
    let mut expected: Vec<String> = io.keys().cloned().collect();
    expected.sort();
    let mut layers = loaded.layers.clone();
    layers.sort();
    assert_eq!(layers, expected, "adapted layers must be exactly those PEFT adapted");
    for (path, (x, y)) in &io {
        let out = model.get(path).forward_t(x, false);
        let err = rel_err(&out, y);
        assert!(err <= 1e-5, "{path}: relative error {err:.3e} vs PEFT");
        // The LoRA update matters: without it the output differs clearly.
        let base = x.linear(&model.get(path).weight, model.get(path).bias.as_ref());
        assert!(rel_err(&base, y) > 1e-2, "{path}: adapter has no visible effect");
    }
    loaded.layers
}

#[test]
fn python_list_adapter_loads_and_matches_peft_outputs() {
    let _rng = rng_lock();
    let layers = check_python_adapter("peft_list", "peft_list_io.safetensors");
    assert_eq!(layers.len(), 8, "2 LLM layers x q/k/v/o");
    let (cfg, meta) = read_adapter_config(&fixtures().join("peft_list")).unwrap();
    assert_eq!((cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora), (4, 8.0, 0.05, false));
    assert_eq!(cfg.scaling(), 2.0);
    assert_eq!(meta.task_type, None);
}

#[test]
fn python_regex_rslora_adapter_reaching_the_vision_tower_matches_peft_outputs() {
    let _rng = rng_lock();
    let layers = check_python_adapter("peft_regex", "peft_regex_io.safetensors");
    assert!(layers.iter().any(|p| p.starts_with("model.visual.blocks.0.attn.qkv")));
    let (cfg, _) = read_adapter_config(&fixtures().join("peft_regex")).unwrap();
    assert!(cfg.use_rslora);
    assert!((cfg.scaling() - 5.5 / 2f64.sqrt()).abs() < 1e-12);
    assert!(matches!(cfg.target_modules, TargetModules::Regex(_)));
}

#[test]
fn older_key_layout_loads_to_identical_outputs() {
    let _rng = rng_lock();
    let layers = check_python_adapter("peft_list_old_layout", "peft_list_io.safetensors");
    assert!(layers.iter().all(|p| p.starts_with("model.language_model.layers.")));
}

#[test]
fn config_json_has_exactly_the_fields_and_values_peft_writes() {
    let _rng = rng_lock();
    for name in ["peft_list", "peft_regex"] {
        let dir = fixtures().join(name);
        let written: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
        let (cfg, meta) = read_adapter_config(&dir).unwrap();
        let mut ours = adapter_config_json(&cfg, &meta);
        let mut peft = written.clone();
        for v in [&mut ours, &mut peft] {
            // PEFT stores a target list as a Python set: order is arbitrary.
            if let Some(Value::Array(a)) = v.get_mut("target_modules") {
                a.sort_by_key(|x| x.to_string());
            }
        }
        assert_eq!(ours, peft, "{name}");
    }
}

#[test]
fn rust_adapter_loads_in_python_peft_with_equal_outputs() {
    let _rng = rng_lock();
    let mut model = base_model();
    let vs = var_store();
    let cfg = LoraConfig { r: 3, lora_alpha: 7.0, use_rslora: true, ..LoraConfig::default() };
    let layers = inject_lora(&mut model, &cfg, &vs.root()).unwrap();
    assert_eq!(layers.len(), 8);
    randomize_lora(&lora_parameters(&mut model), 7);
    let dir = tempfile::tempdir().unwrap();
    let base_dir = fixtures().join("base");
    let meta = AdapterMeta { base_model_name_or_path: Some(base_dir.to_str().unwrap().to_string()), task_type: None };
    save_adapter(&mut model, &cfg, &meta, &dir.path().join("adapter")).unwrap();

    tch::manual_seed(3);
    let mut io = Vec::new();
    for path in &layers {
        let l = model.get(path);
        let x = Tensor::randn([2, 5, l.in_features()], (tch::Kind::Float, tch::Device::Cpu));
        let y = l.forward_t(&x, false);
        io.push((format!("{path}.x"), x));
        io.push((format!("{path}.y"), y));
    }
    let io_path = dir.path().join("io.safetensors");
    Tensor::write_safetensors(&io, &io_path).unwrap();
    let out = Command::new(PYTHON)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_peft_adapter.py"))
        .arg(&base_dir)
        .arg(dir.path().join("adapter"))
        .arg(&io_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "peft check failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("OK: 8 LoRA layers"), "{stdout}");

    // And our own loader reads it back to the same outputs.
    let mut again = base_model();
    let vs2 = var_store();
    load_adapter(&mut again, &dir.path().join("adapter"), &vs2.root()).unwrap();
    let io: HashMap<_, _> = io.into_iter().collect();
    for path in &layers {
        let y = again.get(path).forward_t(&io[&format!("{path}.x")], false);
        assert_eq!(rel_err(&y, &io[&format!("{path}.y")]), 0.0, "{path}");
    }
}
