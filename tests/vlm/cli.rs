//! `vla_finetune vlm-features` end to end on a tiny fixture model, against transformers' outputs.

use std::process::Command;

use crate::support::vlm::*;
use tch::Kind;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vla_finetune"))
}

#[test]
fn vlm_features_writes_inputs_and_features_equal_to_transformers() {
    let m = manifest();
    let case = &m["cases"]["two_images"];
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("features.safetensors");
    let mut cmd = cli();
    cmd.args(["vlm-features", "--model"]).arg(fixtures().join("tiny_b"));
    for img in case["images"].as_array().unwrap() {
        cmd.arg("--image").arg(fixtures().join("images").join(img.as_str().unwrap()));
    }
    cmd.args(["--prompt", case["text"].as_str().unwrap(), "--device", "cpu"]);
    cmd.args(["--min-pixels", &m["min_pixels"].to_string(), "--max-pixels", &m["max_pixels"].to_string()]);
    let res = cmd.arg("--out").arg(&out).output().unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));

    let got: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(&out).unwrap().into_iter().collect();
    let inputs = read("two_images.inputs.safetensors");
    let reference = read("tiny_b.two_images.f32.safetensors");
    assert_same(&got["input_ids"].get(0), &inputs["input_ids"], "input_ids");
    assert_same(&got["image_grid_thw"], &inputs["image_grid_thw"], "image_grid_thw");
    assert_same(&got["position_ids"].select(1, 0), &inputs["position_ids"], "position_ids");
    let n_patches: i64 = (0..2).map(|i| inputs["image_grid_thw"].get(i).prod(Kind::Int64).int64_value(&[])).sum();
    assert_eq!(got["pixel_values"].size(), vec![n_patches, 3 * 2 * 14 * 14]);
    assert!(rel_err(&got["last_hidden_state"].get(0), &reference["last_hidden_state"]) <= 1e-4);
    let want = reference["last_hidden_state"].mean_dim(0, false, Kind::Float).unsqueeze(0);
    assert!(rel_err(&got["pooled"], &want) <= 1e-4);
}

#[test]
fn vlm_features_reports_a_broken_model_directory() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures().join("tiny_a/config.json"), tmp.path().join("config.json")).unwrap();
    std::fs::copy(fixtures().join("tiny_a/tokenizer.json"), tmp.path().join("tokenizer.json")).unwrap();
    let res = cli()
        .args(["vlm-features", "--model"])
        .arg(tmp.path())
        .arg("--image")
        .arg(fixtures().join("images/img_a.png"))
        .args(["--prompt", "hi", "--device", "cpu", "--out"])
        .arg(tmp.path().join("o.safetensors"))
        .output()
        .unwrap();
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("model.safetensors"), "{err}");

    let res = cli()
        .args(["vlm-features", "--model"])
        .arg(fixtures().join("tiny_a"))
        .arg("--image")
        .arg(tmp.path().join("missing.png"))
        .args(["--prompt", "hi", "--out"])
        .arg(tmp.path().join("o.safetensors"))
        .output()
        .unwrap();
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("missing.png"), "{err}");
}
