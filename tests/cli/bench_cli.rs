//! `vla_finetune bench` on the tiny fixture shapes: one case of each kind, each in its own child
//! process; the JSON records follow the schema shared with scripts/reference_bench.py, and the
//! Python reference builds a step with the same LoRA and heads parameter counts and the same
//! token count from the exported inputs.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vla_finetune");
const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// LoRA scalars of tiny_a at r 8 on q/k/v/o: hidden 32, 2 heads of 16, 1 KV head, 2 layers.
/// Per layer q: 8x32 + 32x8, k: 8x32 + 16x8, v: the same as k, o: 8x32 + 32x8.
const TINY_LORA_PARAMS: i64 = 2 * ((256 + 256) + (256 + 128) * 2 + (256 + 256));

fn records(path: &Path) -> Vec<Value> {
    serde_json::from_str::<Vec<Value>>(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn positive(r: &Value, field: &str) -> f64 {
    let v = r[field].as_f64().unwrap_or_else(|| panic!("{field} missing in {r}"));
    assert!(v.is_finite() && v > 0.0, "{field} = {v} in {r}");
    v
}

fn find<'a>(records: &'a [Value], kind: &str, cache: Option<&str>) -> &'a Value {
    records
        .iter()
        .find(|r| r["kind"] == kind && r["cache"].as_str() == cache)
        .unwrap_or_else(|| panic!("no {kind} {cache:?} record"))
}

#[test]
fn tiny_bench_writes_one_valid_record_per_case_and_the_reference_agrees_on_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("ours.json");
    let setup = dir.path().join("setup");
    run_tiny_bench(&json, &setup);
    let ours = records(&json);
    assert_eq!(ours.len(), 5);
    check_our_records(&ours);

    // The Python stack on the exported inputs: same LoRA size, same tokens, same heads minus the
    // positional embeddings our heads add (horizon x expert width + sensor tokens x sensor width).
    let ref_json = dir.path().join("reference.json");
    run_reference_bench(&setup, &ref_json);
    let reference = records(&ref_json);
    let (r, o) = (&reference[0], find(&ours, "step", Some("off")));
    assert_eq!(r["impl"], "reference");
    positive(r, "loss");
    positive(r, "samples_per_s");
    assert_eq!(r["lora_params"], o["lora_params"]);
    assert_eq!(r["tokens_per_sample"], o["tokens_per_sample"]);
    let heads: Value = serde_json::from_str(&std::fs::read_to_string(setup.join("heads.json")).unwrap()).unwrap();
    let (s, e) = (&heads["sensor"], &heads["expert"]);
    let sensor_tokens =
        s["conv_channels"].as_array().unwrap().iter().fold(s["window"].as_i64().unwrap(), |l, _| (l - 1) / 2 + 1);
    let pos_embeds = e["horizon"].as_i64().unwrap() * e["d_model"].as_i64().unwrap()
        + sensor_tokens * s["d_model"].as_i64().unwrap();
    assert_eq!(r["heads_params"].as_i64().unwrap() + pos_embeds, o["heads_params"].as_i64().unwrap());

    // The comparison script pairs the two.
    let out = Command::new(PYTHON)
        .arg(Path::new(ROOT).join("scripts/bench_compare.py"))
        .arg(&json)
        .arg(&ref_json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().nth(1).is_some_and(|l| l.trim_start().starts_with("step") && l.contains("off")), "{text}");
}

/// `bench` on the tiny model, 5 cases, records into `json` and its inputs exported to `setup`.
fn run_tiny_bench(json: &Path, setup: &Path) {
    let out = Command::new(BIN)
        .args(["bench", "--model", "tiny", "--kinds", "step,vision-cache,act", "--cache", "off,vision,features"])
        .args(["--precision", "f32", "--steps", "2", "--warmup", "1", "--ddim-steps", "2"])
        .arg("--json")
        .arg(json)
        .arg("--export")
        .arg(setup)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table.lines().count(), 6, "header + 5 cases:\n{table}");
}

/// Every record of ours: the shared fields and rates, then each step case's sizes and units.
fn check_our_records(ours: &[Value]) {
    for r in ours {
        assert_eq!(r["impl"], "ours");
        assert_eq!(r["model"], "tiny");
        assert_eq!(r["device"], "cpu");
        assert_eq!((r["views"].as_u64(), r["batch"].as_u64(), r["image_size"].as_u64()), (Some(2), Some(2), Some(56)));
        let (rate, ms) = (positive(r, "samples_per_s"), positive(r, "step_ms"));
        let per_iter = if r["kind"] == "vision_cache" { 4.0 } else { 2.0 };
        assert!((rate * ms / 1e3 - per_iter).abs() < 1e-6, "throughput is not items / median time: {r}");
        assert!(r["peak_accel_bytes"].is_null(), "no accelerator on CPU: {r}");
        positive(r, "peak_host_bytes");
    }
    for cache in ["off", "vision", "features"] {
        let r = find(ours, "step", Some(cache));
        positive(r, "loss");
        assert_eq!(r["unit"], "samples/s");
        let lora = if cache == "features" { 0 } else { TINY_LORA_PARAMS };
        assert_eq!(r["lora_params"].as_i64(), Some(lora), "{r}");
        assert_eq!(r["trainable_params"].as_i64().unwrap(), lora + r["heads_params"].as_i64().unwrap());
        // 2 views of 4 tokens between the prompt tokens; the features step runs no LLM.
        let tokens = r["tokens_per_sample"].as_i64().unwrap();
        assert!(if cache == "features" { tokens == 0 } else { tokens > 8 }, "{r}");
    }
    assert_eq!(find(ours, "vision_cache", None)["unit"], "images/s");
    assert_eq!(find(ours, "act", None)["unit"], "chunks/s");
}

/// scripts/reference_bench.py on the exported `setup`: one step case, records into `ref_json`.
fn run_reference_bench(setup: &Path, ref_json: &Path) {
    let out = Command::new(PYTHON)
        .arg(Path::new(ROOT).join("scripts/reference_bench.py"))
        .arg("--setup")
        .arg(setup)
        .args(["--kinds", "step", "--cache", "off", "--precision", "f32", "--steps", "1", "--warmup", "0", "--json"])
        .arg(ref_json)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn bad_bench_arguments_are_named() {
    let out = Command::new(BIN).args(["bench", "--model", "tiny", "--cache", "sometimes"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sometimes"));
    let out = Command::new(BIN).args(["bench", "--model", "tiny", "--kinds", "act", "--steps", "0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("steps must be >= 1"));
}
