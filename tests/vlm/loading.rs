//! Qwen2.5-VL configs and checkpoints: both config layouts as transformers reads them, both key
//! layouts and sharded checkpoints giving identical outputs, and clear errors on bad files.

use std::path::{Path, PathBuf};

use crate::support::rng_lock;
use crate::support::vlm::*;
use tch::{Device, Kind, Tensor};
use vla_finetune::vlm::linear::VisitLinears;
use vla_finetune::vlm::{Config, Qwen25VL, VlmError};

fn check_parsed(cfg: &Config, want: &serde_json::Value) {
    let t = &cfg.text;
    let v = &cfg.vision;
    let int = |k: &str| want[k].as_i64().unwrap();
    assert_eq!(t.vocab_size, int("vocab_size"));
    assert_eq!(t.hidden_size, int("hidden_size"));
    assert_eq!(t.intermediate_size, int("intermediate_size"));
    assert_eq!(t.num_hidden_layers, int("num_hidden_layers"));
    assert_eq!(t.num_attention_heads, int("num_attention_heads"));
    assert_eq!(t.num_key_value_heads, int("num_key_value_heads"));
    assert_eq!(t.rms_norm_eps, want["rms_norm_eps"].as_f64().unwrap());
    assert_eq!(t.rope_theta, want["rope_theta"].as_f64().unwrap());
    let mrope: Vec<i64> = want["mrope_section"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    assert_eq!(t.mrope_section.to_vec(), mrope);
    assert_eq!(t.tie_word_embeddings, want["tie_word_embeddings"].as_bool().unwrap());
    let w = &want["vision"];
    let vint = |k: &str| w[k].as_i64().unwrap();
    assert_eq!(v.depth, vint("depth"));
    assert_eq!(v.hidden_size, vint("hidden_size"));
    assert_eq!(v.intermediate_size, vint("intermediate_size"));
    assert_eq!(v.num_heads, vint("num_heads"));
    assert_eq!(v.in_channels, vint("in_channels"));
    assert_eq!(v.patch_size, vint("patch_size"));
    assert_eq!(v.spatial_merge_size, vint("spatial_merge_size"));
    assert_eq!(v.temporal_patch_size, vint("temporal_patch_size"));
    assert_eq!(v.window_size, vint("window_size"));
    assert_eq!(v.out_hidden_size, vint("out_hidden_size"));
    assert_eq!(v.tokens_per_second, vint("tokens_per_second"));
    let full: Vec<i64> = w["fullatt_block_indexes"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    assert_eq!(v.fullatt_block_indexes, full);
    assert_eq!(cfg.image_token_id, int("image_token_id"));
    assert_eq!(cfg.video_token_id, int("video_token_id"));
    assert_eq!(cfg.vision_start_token_id, int("vision_start_token_id"));
    assert_eq!(cfg.vision_end_token_id, int("vision_end_token_id"));
}

#[test]
fn flat_3b_and_7b_configs_read_as_transformers_reads_them() {
    for name in ["qwen2_5_vl_3b_instruct", "qwen2_5_vl_7b_instruct"] {
        let dir = fixtures().join("configs");
        let cfg = Config::from_file(&dir.join(format!("{name}.json"))).unwrap();
        let want: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.parsed.json"))).unwrap()).unwrap();
        check_parsed(&cfg, &want);
    }
    assert_eq!(
        Config::from_file(&fixtures().join("configs/qwen2_5_vl_3b_instruct.json")).unwrap(),
        Config::qwen2_5_vl_3b()
    );
}

#[test]
fn nested_config_of_the_fixture_models() {
    let cfg = Config::from_file(&fixtures().join("tiny_b/config.json")).unwrap();
    assert_eq!(cfg.text.num_key_value_heads, 1);
    assert_eq!(cfg.text.mrope_section, [1, 2, 1]);
    assert!(cfg.vision.fullatt_block_indexes.is_empty());
    assert!(!cfg.text.tie_word_embeddings);
}

#[test]
fn config_errors_name_the_field() {
    let p = Path::new("x/config.json");
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("configs/qwen2_5_vl_3b_instruct.json")).unwrap())
            .unwrap();
    let mut missing = base.clone();
    missing.as_object_mut().unwrap().remove("hidden_size");
    let e = Config::from_json(&missing, p).unwrap_err().to_string();
    assert!(e.contains("hidden_size") && e.contains("x/config.json"), "{e}");
    let mut bad = base.clone();
    bad["num_key_value_heads"] = serde_json::json!(3);
    let e = Config::from_json(&bad, p).unwrap_err().to_string();
    assert!(e.contains("num_key_value_heads 3"), "{e}");
    let mut bad = base.clone();
    bad["rope_scaling"]["mrope_section"] = serde_json::json!([16, 24, 8]);
    let e = Config::from_json(&bad, p).unwrap_err().to_string();
    assert!(e.contains("mrope_section"), "{e}");
    let mut bad = base;
    bad["vision_config"]["num_heads"] = serde_json::json!("16");
    let e = Config::from_json(&bad, p).unwrap_err().to_string();
    assert!(e.contains("vision_config.num_heads"), "{e}");
    assert!(Config::from_json_str("{not json", p).is_err());
    // Another model's config is named as such, before its missing fields.
    let llama = serde_json::json!({"model_type": "llama", "hidden_size": 64});
    let e = Config::from_json(&llama, p).unwrap_err().to_string();
    assert!(e.contains("model_type `llama` is not `qwen2_5_vl`"), "{e}");
}

/// Copies a fixture model directory (config, tokenizer) and writes its tensors renamed by
/// `rename`, then kept or changed by `tweak`, into `shards` files (with an index when more than one).
fn rewrite(
    model: &str,
    rename: impl Fn(&str) -> String,
    shards: usize,
    tweak: impl Fn(&str, Tensor) -> Option<Tensor>,
) -> (tempfile::TempDir, PathBuf) {
    let src = fixtures().join(model);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut tensors = Tensor::read_safetensors(src.join("model.safetensors")).unwrap();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let tensors: Vec<(String, Tensor)> = tensors
        .into_iter()
        .filter_map(|(n, t)| {
            let n = rename(&n);
            tweak(&n, t).map(|t| (n, t))
        })
        .collect();
    if shards == 1 {
        Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
    } else {
        let per = tensors.len().div_ceil(shards);
        let mut map = serde_json::Map::new();
        for (i, chunk) in tensors.chunks(per).enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
            Tensor::write_safetensors(chunk, dir.join(&file)).unwrap();
            for (n, _) in chunk {
                map.insert(n.clone(), serde_json::json!(file));
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
    (tmp, dir)
}

/// transformers>=4.52 module names from the on-disk names the fixtures (like the published
/// checkpoints) are saved with.
fn new_layout(n: &str) -> String {
    if let Some(r) = n.strip_prefix("visual.") {
        format!("model.visual.{r}")
    } else if let Some(r) = n.strip_prefix("model.") {
        format!("model.language_model.{r}")
    } else {
        n.to_string()
    }
}

fn stored_names(file: &Path) -> Vec<String> {
    Tensor::read_safetensors(file).unwrap().into_iter().map(|x| x.0).collect()
}

fn hidden(dir: &Path) -> Tensor {
    let (_, p) = processor(&fixtures().join("tiny_b"));
    let model = Qwen25VL::load(dir, Kind::Float, Device::Cpu).unwrap();
    let _g = tch::no_grad_guard();
    let batch = p.collate(&[case_sample(&p, "two_images")]).unwrap();
    model.forward(&batch, false).unwrap().last_hidden_state
}

#[test]
fn key_layouts_and_shards_load_to_identical_outputs() {
    // The fixture is in the on-disk layout transformers saves (`visual.*`, `model.layers.*`).
    let names = stored_names(&fixtures().join("tiny_b/model.safetensors"));
    assert!(
        names.iter().any(|n| n.starts_with("visual.blocks.0."))
            && names.iter().any(|n| n.starts_with("model.layers.0."))
    );
    let reference = hidden(&fixtures().join("tiny_b"));
    let (_t1, new) = rewrite("tiny_b", new_layout, 1, |_, t| Some(t));
    let names = stored_names(&new.join("model.safetensors"));
    assert!(names.iter().any(|n| n.starts_with("model.visual.blocks.0.")));
    assert!(names.iter().any(|n| n.starts_with("model.language_model.layers.0.")));
    let (_t2, sharded_new) = rewrite("tiny_b", new_layout, 3, |_, t| Some(t));
    let (_t3, sharded_old) = rewrite("tiny_b", |n| n.to_string(), 2, |_, t| Some(t));
    assert!(sharded_old.join("model-00002-of-00002.safetensors").exists());
    for dir in [&new, &sharded_new, &sharded_old] {
        let h = hidden(dir);
        assert!(h.equal(&reference), "{} differs", dir.display());
    }
}

fn load_err(dir: &Path) -> VlmError {
    match Qwen25VL::load(dir, Kind::Float, Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_extra_misshaped_and_wrong_dtype_tensors_are_named() {
    let name = "model.language_model.layers.1.mlp.up_proj.weight";
    let (_a, dir) = rewrite("tiny_b", new_layout, 1, |n, t| (n != name).then_some(t));
    let e = load_err(&dir).to_string();
    assert!(e.contains("missing tensor") && e.contains(name) && e.contains("[40, 24]"), "{e}");

    let (_b, dir) = rewrite("tiny_b", new_layout, 1, |n, t| Some(if n == name { t.narrow(0, 0, 39) } else { t }));
    let e = load_err(&dir).to_string();
    assert!(e.contains(name) && e.contains("expected shape [40, 24]") && e.contains("found [39, 24]"), "{e}");

    let (_c, dir) = rewrite("tiny_b", new_layout, 1, |n, t| Some(if n == name { t.to_kind(Kind::Int64) } else { t }));
    let e = load_err(&dir).to_string();
    assert!(e.contains(name) && e.contains("I64"), "{e}");

    // An extra tensor (a deeper model's) is refused.
    let (_d, dir) = rewrite("tiny_b", new_layout, 1, |_, t| Some(t));
    let mut tensors = Tensor::read_safetensors(dir.join("model.safetensors")).unwrap();
    tensors.push((
        "model.language_model.layers.3.mlp.up_proj.weight".into(),
        Tensor::zeros([40, 24], (Kind::BFloat16, Device::Cpu)),
    ));
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
    let e = load_err(&dir).to_string();
    assert!(e.contains("unexpected tensor") && e.contains("layers.3.mlp.up_proj"), "{e}");

    // Untied model without lm_head: named as missing.
    let (_e, dir) = rewrite("tiny_b", |n| n.to_string(), 1, |n, t| (n != "lm_head.weight").then_some(t));
    let e = load_err(&dir).to_string();
    assert!(e.contains("lm_head.weight"), "{e}");
}

#[test]
fn corrupt_and_truncated_files_and_config_mismatch_are_clear_errors() {
    let (_a, dir) = rewrite("tiny_a", |n| n.to_string(), 1, |_, t| Some(t));
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&dir).to_string();
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    std::fs::write(&file, b"garbage").unwrap();
    let e = load_err(&dir).to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::remove_file(&file).unwrap();
    let e = load_err(&dir).to_string();
    assert!(e.contains("model.safetensors"), "{e}");

    // tiny_a's weights under tiny_b's config: the first mismatching tensor is named with both shapes.
    let (_b, dir) = rewrite("tiny_a", |n| n.to_string(), 1, |_, t| Some(t));
    std::fs::copy(fixtures().join("tiny_b/config.json"), dir.join("config.json")).unwrap();
    let e = load_err(&dir);
    assert!(matches!(e, VlmError::ShapeMismatch { .. }), "{e}");
}

fn on_disk(n: &str) -> String {
    if let Some(r) = n.strip_prefix("model.language_model.") {
        format!("model.{r}")
    } else if let Some(r) = n.strip_prefix("model.visual.") {
        format!("visual.{r}")
    } else {
        n.to_string()
    }
}

#[test]
fn every_linear_is_visited_with_its_transformers_path() {
    let dir = fixtures().join("tiny_a");
    let mut model = Qwen25VL::load(&dir, Kind::Float, Device::Cpu).unwrap();
    let stored: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("model.safetensors")).unwrap().into_iter().collect();
    let mut paths = Vec::new();
    model.visit_linears_mut(&mut |l| {
        let w = &stored[&format!("{}.weight", on_disk(&l.path))];
        assert_eq!(w.size(), l.weight.size(), "{}", l.path);
        assert!(!l.weight.requires_grad(), "{} must be frozen", l.path);
        paths.push(l.path.clone());
    });
    // Every 2-D weight but the embeddings is a visited linear.
    let mut linear_weights: Vec<String> = stored
        .iter()
        .filter(|(n, t)| {
            t.dim() == 2 && n.ends_with(".weight") && !n.contains("embed_tokens") && *n != "lm_head.weight"
        })
        .map(|(n, _)| new_layout(n.trim_end_matches(".weight")))
        .collect();
    linear_weights.sort();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(sorted, linear_weights);
    assert_eq!(paths[0], "model.visual.blocks.0.attn.qkv");
    assert_eq!(paths.last().unwrap(), "model.language_model.layers.1.mlp.down_proj");
}

#[test]
fn random_init_runs_any_config_in_both_dtypes() {
    let _rng = rng_lock();
    let mut cfg = Config::from_file(&fixtures().join("tiny_a/config.json")).unwrap();
    cfg.text.num_hidden_layers = 1;
    cfg.vision.depth = 2;
    cfg.vision.fullatt_block_indexes = vec![1];
    let (_, p) = processor(&fixtures().join("tiny_a"));
    let batch = p.collate(&[case_sample(&p, "two_images")]).unwrap();
    for kind in [Kind::Float, Kind::BFloat16] {
        let model = Qwen25VL::random(&cfg, kind, Device::Cpu).unwrap();
        let _g = tch::no_grad_guard();
        let out = model.forward(&batch, false).unwrap();
        assert_eq!(out.last_hidden_state.kind(), kind);
        assert_eq!(out.last_hidden_state.size(), vec![1, batch.input_ids.size()[1], cfg.text.hidden_size]);
        assert!(out.last_hidden_state.isfinite().all().int64_value(&[]) == 1);
    }
    assert!(Qwen25VL::random(&cfg, Kind::Half, Device::Cpu).is_err());
}

#[test]
fn inconsistent_model_inputs_are_refused() {
    let dir = fixtures().join("tiny_a");
    let (_, p) = processor(&dir);
    let model = Qwen25VL::load(&dir, Kind::Float, Device::Cpu).unwrap();
    let _g = tch::no_grad_guard();
    let mut batch = p.collate(&[case_sample(&p, "one_image")]).unwrap();
    // NaN in the pixels.
    let nan = batch.pixel_values.copy();
    let _ = nan.get(0).get(0).fill_(f64::NAN);
    let e = model.image_embeds(&nan, &batch.image_grid_thw, false).unwrap_err().to_string();
    assert!(e.contains("NaN"), "{e}");
    // Grid that does not match the pixel rows.
    let e = model.image_embeds(&batch.pixel_values, &[[1, 4, 8]], false).unwrap_err().to_string();
    assert!(e.contains("pixel_values shape") && e.contains("[32, 1176]"), "{e}");
    // Image features for the wrong number of image tokens.
    let wrong = Tensor::zeros([3, 32], (Kind::Float, Device::Cpu));
    let e = model.forward_with_image_embeds(&batch, Some(&wrong), false).unwrap_err().to_string();
    assert!(e.contains("do not match 4 image tokens"), "{e}");
    // Token ids outside the vocabulary.
    batch.input_ids = batch.input_ids.fill(10_000);
    let e = model.forward(&batch, false).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
}

#[test]
fn named_tensors_are_the_checkpoint_tensors() {
    let dir = fixtures().join("tiny_a");
    let model = Qwen25VL::load(&dir, Kind::Float, Device::Cpu).unwrap();
    let stored: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, t)| (new_layout(&n), t))
        .collect();
    let named = model.named_tensors();
    assert_eq!(named.len(), stored.len(), "tied model: every stored tensor and nothing else");
    for (n, t) in &named {
        assert!(t.equal(&stored[n].to_kind(Kind::Float)), "{n}");
    }
    // Written out, they load back into the same model (random weights round trip).
    let cfg = Config::from_file(&dir.join("config.json")).unwrap();
    let random = Qwen25VL::random(&cfg, Kind::Float, Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("config.json"), tmp.path().join("config.json")).unwrap();
    Tensor::write_safetensors(&random.named_tensors(), tmp.path().join("model.safetensors")).unwrap();
    let back = Qwen25VL::load(tmp.path(), Kind::Float, Device::Cpu).unwrap();
    for ((n1, a), (n2, b)) in random.named_tensors().iter().zip(back.named_tensors().iter()) {
        assert_eq!(n1, n2);
        assert!(a.equal(b), "{n1}");
    }
}
