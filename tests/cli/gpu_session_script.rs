//! scripts/gpu_session.sh (the one call a lent CUDA machine gets) run end to end as far as a CPU
//! allows (`all --device cpu`: the whole loop with demo --quick, then gpu_bench.sh --quick): it
//! finds the binary and torch the way it will there, and returns the files it promises.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[test]
fn gpu_session_dry_run_on_cpu_returns_the_demo_report_and_both_benchmarks() {
    let out = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new("bash")
        .arg(Path::new(ROOT).join("scripts/gpu_session.sh"))
        .args(["all", "--device", "cpu"])
        .current_dir(ROOT)
        .env("VLA_BIN", env!("CARGO_BIN_EXE_vla_finetune"))
        .env("PYTHON", Path::new(ROOT).join(".venv/bin/python"))
        .env("OUT", out.path())
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("demo exit 0") && stdout.contains("bench exit 0"), "{stdout}");

    let mut files: Vec<String> =
        std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(
        files,
        ["bench.log", "demo.log", "demo_report.json", "ours.json", "policy_status.json", "reference.json"]
    );

    let report = json(&out.path().join("demo_report.json"));
    // The policy ends on what `latest` names (Stage 2's best, or stage 1's version when no Stage 2
    // epoch beat it), one of the published versions.
    let latest = &report["latest_version"];
    assert!(report["published_versions"].as_array().unwrap().contains(latest), "{report}");
    assert_eq!(report["active_version"], *latest, "the policy ends on the `latest` version");
    let status = json(&out.path().join("policy_status.json"));
    assert_eq!((status["device"].as_str(), status["dtype"].as_str()), (Some("Cpu"), Some("Float")));

    for (file, imp) in [("ours.json", "ours"), ("reference.json", "reference")] {
        let records = json(&out.path().join(file));
        let records = records.as_array().unwrap();
        assert_eq!(records.len(), 5, "{file}: step off/vision/features, vision_cache, act");
        assert!(
            records.iter().all(|r| r["impl"] == imp && r["samples_per_s"].as_f64().is_some_and(|v| v > 0.0)),
            "{file}"
        );
    }
    let log = std::fs::read_to_string(out.path().join("bench.log")).unwrap();
    assert!(log.contains("ratio") && log.contains("vision_cache"), "the side-by-side table: {log}");
}
