//! `vla_finetune experiment cache-modes` at a tiny size: every mode runs from the same stage-1
//! checkpoint per seed, the refresh counts follow each mode's rule, and the summary, table and
//! plot data are the runs' numbers (means and spreads recomputed here); the heads-only control
//! leaves the LoRA untouched.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vla_finetune");

#[test]
fn cache_modes_runs_every_mode_from_one_stage1_checkpoint_and_summarizes_the_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("exp");
    run_tiny_experiment(&out);
    let results: Value = serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let runs = results["runs"].as_array().unwrap();
    let modes = ["off", "vision", "features/1", "features/5", "features/adaptive", "heads-only"];
    assert_eq!(runs.len(), 2 * modes.len());
    for seed in [1u64, 2] {
        check_the_runs_of_seed(&out, runs, &modes, seed);
    }
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    let plot: Value = serde_json::from_slice(&std::fs::read(out.join("cache_modes.json")).unwrap()).unwrap();
    assert!(out.join("cache_modes.png").is_file());
    for (m, s) in modes.iter().zip(results["summary"].as_array().unwrap()) {
        assert_eq!(s["mode"], *m);
        let errs: Vec<f64> = runs.iter().filter(|r| r["mode"] == *m).map(|r| number(r, "val_action_error")).collect();
        let mean = errs.iter().sum::<f64>() / 2.0;
        let std = ((errs[0] - mean).powi(2) + (errs[1] - mean).powi(2)).sqrt();
        assert!(
            (number(s, "val_action_error_mean") - mean).abs() < 1e-12
                && (number(s, "val_action_error_std") - std).abs() < 1e-12,
            "{s}"
        );
        assert!(table.contains(&format!("| {m} | {mean:.3} ± {std:.3}")), "{m}: {table}");
        let curve = plot[0]["curves"].as_array().unwrap().iter().find(|c| c["name"] == *m).unwrap();
        let ys: Vec<f64> = curve["points"].as_array().unwrap().iter().map(|p| p[1].as_f64().unwrap()).collect();
        assert_eq!(ys, errs);
    }

    let o = Command::new(BIN)
        .args(["experiment", "cache-modes", "--modes", "features/3", "--out"])
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("unknown mode `features/3`"), "{err}");
}

/// `--base-model`: the given folder is the one copied in and trained on; a folder that is not a
/// model is refused before anything is recorded.
#[test]
fn cache_modes_trains_on_the_base_model_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/sim_grounded_tiny");
    let out = dir.path().join("exp");
    let o = Command::new(BIN)
        .args(["experiment", "cache-modes", "--seeds", "1", "--episodes", "1", "--val-episodes", "1"])
        .args(["--seconds", "2", "--stage1-epochs", "1", "--stage2-epochs", "1", "--modes", "heads-only"])
        .args(["--vl-pooling", "last", "--base-model"])
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .env("TORCH_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "experiment failed:\n{}", String::from_utf8_lossy(&o.stderr));
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        let copied = std::fs::read(out.join("seed1/base_model").join(f)).unwrap();
        assert!(copied == std::fs::read(model.join(f)).unwrap(), "{f} is not the given model's");
    }

    let not_a_model = dir.path().join("empty");
    std::fs::create_dir(&not_a_model).unwrap();
    let o = Command::new(BIN)
        .args(["experiment", "cache-modes", "--base-model"])
        .arg(&not_a_model)
        .arg("--out")
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no config.json") && err.contains("empty"), "{err}");
    assert!(!dir.path().join("x/seed7/recordings").exists(), "recorded before checking the model");
}

/// Runs every mode on seeds 1 and 2 at the tiny size (2 + 1 episodes of 2 s, 2 + 2 epochs) into `out`.
fn run_tiny_experiment(out: &Path) {
    let o = Command::new(BIN)
        .args([
            "experiment",
            "cache-modes",
            "--seeds",
            "1,2",
            "--episodes",
            "2",
            "--val-episodes",
            "1",
            "--seconds",
            "2",
        ])
        .args(["--stage1-epochs", "2", "--stage2-epochs", "2", "--out"])
        .arg(out)
        .env("TORCH_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "experiment failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

/// The number `k` of the record `r`; panics naming both when it is not one.
fn number(r: &Value, k: &str) -> f64 {
    r[k].as_f64().unwrap_or_else(|| panic!("`{k}` of {r}"))
}

/// The runs of `seed`: every mode in order from one stage-1 error, the refreshes, and the control's LoRA.
fn check_the_runs_of_seed(out: &Path, runs: &[Value], modes: &[&str], seed: u64) {
    let mine: Vec<&Value> = runs.iter().filter(|r| r["seed"] == seed).collect();
    assert_eq!(mine.iter().map(|r| r["mode"].as_str().unwrap()).collect::<Vec<_>>(), modes);
    // One stage-1 checkpoint per seed: every mode starts from the same error, and carries the
    // same ablations of stage 1 and the oracle (their conditioning from other samples).
    for k in ["stage1_val_action_error", "stage1_swapped_val_action_error", "oracle_swapped_val_action_error"] {
        assert!(mine.iter().all(|r| number(r, k) == number(mine[0], k)), "{k}");
    }
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    let row = format!(
        "| {seed} | {:.3} | {:.3} | {:.3} | {:.3} |",
        number(mine[0], "stage1_val_action_error"),
        number(mine[0], "stage1_swapped_val_action_error"),
        number(mine[0], "oracle_val_action_error"),
        number(mine[0], "oracle_swapped_val_action_error")
    );
    assert!(table.contains(&row), "{row} in {table}");
    for r in &mine {
        // Two epochs: `features/1` refreshes after its first cached epoch, nothing else does.
        let refreshes = if r["mode"] == "features/1" { 1 } else { 0 };
        assert_eq!(r["refreshes"], refreshes, "{r}");
        assert_eq!(r["drift"].is_number(), refreshes == 1, "{r}");
        assert!(number(r, "val_action_error") > 0.0 && number(r, "wall_s") > 0.0 && number(r, "samples_per_s") > 0.0);
    }
    // The control leaves the VL model as it is: its adapter's B matrices are still the
    // zeros they start at, while the vision mode's moved.
    assert_eq!(lora_b_abs_sum(out, seed, "heads-only"), 0.0);
    assert!(lora_b_abs_sum(out, seed, "vision") > 0.0);
}

/// Sum of the absolute values in the `lora_B` tensors of the adapter `mode` trained for `seed`.
fn lora_b_abs_sum(out: &Path, seed: u64, mode: &str) -> f64 {
    let bytes =
        std::fs::read(out.join(format!("seed{seed}/{mode}/stage2_work/adapter/adapter_model.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let b: Vec<_> = st.tensors().into_iter().filter(|(n, _)| n.contains("lora_B")).collect();
    assert!(!b.is_empty(), "{mode}: no lora_B tensors");
    b.iter()
        .map(|(_, t)| t.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()).abs() as f64).sum::<f64>())
        .sum()
}
