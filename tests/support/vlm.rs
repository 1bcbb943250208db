//! Helpers shared by the Qwen2.5-VL tests (fixtures from scripts/gen_vlm_fixtures.py).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use vla_finetune::vlm::{load_image, Config, VlProcessor, VlSample};

/// tests/fixtures/vlm.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vlm")
}

/// The fixture manifest (cases, processor settings).
pub fn manifest() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap()).unwrap()
}

/// All tensors of a fixture safetensors file, by name.
pub fn read(name: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixtures().join(name)).unwrap().into_iter().collect()
}

/// The case names, in a fixed order.
pub const CASES: [&str; 4] = ["one_image", "two_images", "three_images", "text_only"];

/// A model's processor with the fixtures' min/max pixels.
pub fn processor(model_dir: &Path) -> (Config, VlProcessor) {
    let m = manifest();
    let cfg = Config::from_file(&model_dir.join("config.json")).unwrap();
    let p = VlProcessor::from_model_dir(model_dir, &cfg, m["min_pixels"].as_i64(), m["max_pixels"].as_i64()).unwrap();
    (cfg, p)
}

/// The processed sample of a fixture case.
pub fn case_sample(p: &VlProcessor, case: &str) -> VlSample {
    let m = manifest();
    let c = &m["cases"][case];
    let images: Vec<_> = c["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| load_image(&fixtures().join("images").join(n.as_str().unwrap())).unwrap())
        .collect();
    p.sample(&images, c["text"].as_str().unwrap()).unwrap()
}

/// max |a - b| / max(|b|) (b the reference).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape");
    let a = a.to_device(Device::Cpu).to_kind(Kind::Double);
    let b = b.to_device(Device::Cpu).to_kind(Kind::Double);
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    (a - &b).abs().max().double_value(&[]) / scale
}

/// Asserts exact equality of two integer tensors.
pub fn assert_same(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.size(), b.size(), "{what}: shape");
    if a.numel() == 0 {
        return;
    }
    let diff = (a.to_kind(Kind::Int64) - b.to_kind(Kind::Int64)).abs().max().int64_value(&[]);
    assert_eq!(diff, 0, "{what}: values differ");
}
