//! The demo end to end (reduced size): its report's numbers must come from the run, checked
//! against the files it leaves on disk.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use vla_finetune::train::publish::verify;

fn num(r: &Value, key: &str) -> f64 {
    r[key].as_f64().unwrap_or_else(|| panic!("report.json: `{key}` is not a number: {}", r[key]))
}

#[test]
fn demo_closes_the_loop_and_its_report_matches_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = Command::new(env!("CARGO_BIN_EXE_vla_finetune"))
        .args(["demo", "--quick", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "demo failed:\n{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let report: Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();

    // Data counts agree with the recordings and the compiled dataset.
    let episodes = std::fs::read_dir(out.join("recordings/episodes")).unwrap().count();
    assert_eq!(report["episodes"].as_u64().unwrap() as usize, episodes);
    let info: Value = serde_json::from_slice(
        &Command::new(env!("CARGO_BIN_EXE_vla_finetune")).args(["dataset", "info", "--json"]).arg(out.join("dataset")).output().unwrap().stdout,
    )
    .unwrap();
    let info_text = info.to_string();
    assert!(num(&report, "samples_train") > 0.0 && num(&report, "samples_val") > 0.0);
    assert!(info_text.contains(&report["samples_train"].to_string()), "dataset info does not mention {} train samples: {info_text}", report["samples_train"]);

    // Both stages trained and validated in the same metric; the LoRA moved; the cache was refreshed.
    let (s1, s2) = (num(&report, "stage1_val_action_error"), num(&report, "stage2_val_action_error"));
    assert!(s1.is_finite() && s2.is_finite() && s1 > 0.0 && s2 > 0.0, "{s1} {s2}");
    assert_eq!(report["lora_params_changed"], Value::Bool(true));
    assert!(num(&report, "cache_refreshes") >= 1.0);

    // Every published version verifies on disk; the policy process ended on the last one.
    let versions: Vec<String> = report["published_versions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert!(versions.len() >= 2, "a stage-1 and at least one Stage 2 version: {versions:?}");
    for v in &versions {
        let m = verify(&out.join("checkpoints").join(v)).unwrap_or_else(|e| panic!("checkpoint {v}: {e}"));
        assert_eq!(&m.version, v);
    }
    let last = versions.last().unwrap();
    assert_eq!(report["active_version"].as_str().unwrap(), last);
    assert!(Path::new(&out.join("checkpoints").join(last).join("adapter/adapter_model.safetensors")).exists());
    assert_eq!(num(&report, "missed_ticks"), 0.0);
    assert!(num(&report, "hotswap_latency_ms") > 0.0);
    let status: Value = serde_json::from_slice(&std::fs::read(out.join("policy_status.json")).unwrap()).unwrap();
    assert_eq!(status["active_version"], report["active_version"]);
    assert!(num(&report, "wall_s") > 0.0);
}
