//! The committed trainer config and VRAM presets load, resolve and reject bad values by name.

use std::path::Path;

use vla_finetune::train::config::{
    CacheMode, ConfigError, Override, TrainConfig, VramPresets, GROUP_HEADS, GROUP_SENSOR_ENCODER, GROUP_VL_LORA,
};
use vla_finetune::train::drift::DriftMetric;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn presets() -> VramPresets {
    VramPresets::load(&root().join("config/vram_presets.yaml")).unwrap()
}

fn cfg(overrides: &[&str]) -> Result<TrainConfig, ConfigError> {
    let o = overrides.iter().map(|s| s.parse()).collect::<Result<Vec<Override>, _>>()?;
    TrainConfig::load(&root().join("config/train.yaml"), &o)
}

#[test]
fn presets_are_the_reference_numbers() {
    let p = presets();
    let row = |n: &str| {
        let x = p.get(n).unwrap();
        (x.vram_gb, x.micro_batch, x.accum_steps, x.lora_rank)
    };
    assert_eq!(row("24gb"), (24, 2, 16, 8));
    assert_eq!(row("40gb"), (40, 4, 8, 16));
    assert_eq!(row("80gb"), (80, 8, 4, 16));
    assert_eq!(row("12gb"), (12, 1, 32, 4));
    for x in &p.presets {
        assert_eq!(x.micro_batch * x.accum_steps, 32, "{}: effective batch", x.name);
    }
    // Reported sizes of real cards pick their class.
    assert_eq!(p.best_fit(23.6).unwrap().name, "24gb");
    assert_eq!(p.best_fit(39.4).unwrap().name, "40gb");
    assert_eq!(p.best_fit(79.2).unwrap().name, "80gb");
    assert_eq!(p.best_fit(139.8).unwrap().name, "80gb");
    assert_eq!(p.best_fit(15.7).unwrap().name, "12gb");
    assert!(p.best_fit(8.0).is_none());
}

#[test]
fn presets_file_errors() {
    let dup = "presets:\n  - {name: a, vram_gb: 1, micro_batch: 1, accum_steps: 1, lora_rank: 1}\n  - {name: a, vram_gb: 2, micro_batch: 1, accum_steps: 1, lora_rank: 1}\n";
    assert!(VramPresets::from_yaml(dup, "dup.yaml").unwrap_err().to_string().contains("`a`"));
    let zero = "presets:\n  - {name: z, vram_gb: 8, micro_batch: 0, accum_steps: 1, lora_rank: 1}\n";
    assert!(VramPresets::from_yaml(zero, "z.yaml").unwrap_err().to_string().contains("presets[0] (z)"));
    let unknown = "presets:\n  - {name: z, vram_gb: 8, micro_batch: 1, accum_steps: 1, lora_rank: 1, extra: 3}\n";
    let e = VramPresets::from_yaml(unknown, "u.yaml").unwrap_err().to_string();
    assert!(e.contains("u.yaml") && e.contains("extra"), "{e}");
}

#[test]
fn defaults_load_and_derive_optimizer_settings() {
    let c = cfg(&[]).unwrap();
    assert_eq!(c.cache.mode, CacheMode::Vision);
    assert_eq!(c.cache.rebuild_interval_epochs, 5);
    let g = c.param_groups();
    let lr = |n: &str| g.iter().find(|x| x.name == n).unwrap().lr;
    assert_eq!((lr(GROUP_VL_LORA), lr(GROUP_HEADS), lr(GROUP_SENSOR_ENCODER)), (1e-5, 1e-4, 1e-4));
    assert_eq!(c.optim.grad_clip_norm, 1.0);
    let s = c.schedule(1000);
    assert_eq!((s.warmup_steps, s.total_steps), (50, 1000));
    assert!(c.refresh_policy().is_none(), "vision mode never refreshes");
    assert_eq!(c.cache_config().ram_budget_bytes, 2048 << 20);
    // The default no-decay rules compile into the optimizer config.
    assert_eq!(c.adamw().no_decay, vla_finetune::train::optim::default_no_decay());
    // Memory: auto on a 24 GB card gives the reference preset.
    let m = c.resolve_memory(&presets(), Some(23.6)).unwrap();
    assert_eq!((m.preset.as_str(), m.micro_batch, m.accum_steps, m.lora_rank), ("24gb", 2, 16, 8));
    assert!(c.resolve_memory(&presets(), None).unwrap_err().to_string().contains("memory.preset"));
}

#[test]
fn overrides_apply_and_typos_fail() {
    let c = cfg(&[
        "optim.lr_heads=2e-4",
        "cache.mode=features",
        "cache.drift_threshold=0.05",
        "memory.preset=40gb",
        "lora.rank=4",
    ])
    .unwrap();
    assert_eq!(c.optim.lr_heads, 2e-4);
    let p = c.refresh_policy().unwrap();
    assert_eq!((p.interval_epochs, p.drift_threshold, p.metric), (Some(5), Some(0.05), DriftMetric::RelL2Mean));
    let m = c.resolve_memory(&presets(), None).unwrap();
    assert_eq!((m.preset.as_str(), m.micro_batch, m.accum_steps, m.lora_rank), ("40gb", 4, 8, 4));
    let m = cfg(&["memory.preset=manual", "memory.micro_batch=3", "memory.accum_steps=5", "lora.rank=2"])
        .unwrap()
        .resolve_memory(&presets(), None)
        .unwrap();
    assert_eq!((m.preset.as_str(), m.micro_batch, m.accum_steps, m.lora_rank), ("manual", 3, 5, 2));

    let e = cfg(&["optim.lr_head=2e-4"]).unwrap_err();
    assert!(matches!(&e, ConfigError::Override { .. }) && e.to_string().contains("optim.lr_head"), "{e}");
    let e = cfg(&["optim"]).unwrap_err();
    assert!(e.to_string().contains("section.key=value"), "{e}");
    let e = cfg(&["cache.mode=hybrid"]).unwrap_err();
    assert!(e.to_string().contains("hybrid"), "{e}");
    let e = cfg(&["memory.preset=16gb"]).unwrap().resolve_memory(&presets(), None).unwrap_err();
    assert!(e.to_string().contains("16gb") && e.to_string().contains("24gb"), "{e}");
}

#[test]
fn out_of_range_values_name_their_key() {
    for (ov, key) in [
        ("optim.lr_vl_lora=-1", "optim.lr_vl_lora"),
        ("optim.beta2=1.0", "optim.beta2"),
        ("optim.warmup_ratio=1.5", "optim.warmup_ratio"),
        ("optim.no_decay=['(']", "optim.no_decay"),
        ("run.epochs=0", "run.epochs"),
        ("run.device=tpu", "run.device"),
        ("lora.dropout=1.0", "lora.dropout"),
        ("memory.micro_batch=2", "memory.micro_batch"),
        ("memory.preset=manual", "memory.preset"),
        ("cache.rebuild_interval_epochs=0", "cache.rebuild_interval_epochs"),
        ("cache.drift_threshold=-0.1", "cache.drift_threshold"),
        ("progress.max_hz=0", "progress.max_hz"),
    ] {
        match cfg(&[ov]) {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{ov}"),
            other => panic!("{ov}: expected an invalid-value error, got {other:?}"),
        }
    }
    let e = cfg(&["optim.lr_heads=fast"]).unwrap_err();
    assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
}
