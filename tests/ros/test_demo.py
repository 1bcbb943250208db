"""`make demo` at a reduced size (scripts/ros_demo.py --quick, in this test's network
namespace): the loop runs through ROS 2 and its report's numbers come from the run, checked
against the files the run left (compiled dataset, checkpoints, job record, the policy's status
log) and the ROS graph's own account."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_ros_demo_closes_the_loop_and_its_report_matches_the_files(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "ros_demo.py"), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert json.loads(run.stdout.split("\n\nepisodes ")[0]) == report
    ros = report["ros"]

    # Episodes and samples: those of the compiled dataset the job trained on.
    dataset = Path(report["dataset"])
    index = json.loads((dataset / "index.json").read_text())
    compiled = json.loads((dataset / "report.json").read_text())
    assert report["episodes"] == len(index["episodes"]) == 3
    assert report["samples_train"] + report["samples_val"] == len(index["samples"]) and report["samples_val"] > 0
    assert report["drops"] == compiled["drops"]

    # Versions: those published are the checkpoints folder's; those announced (published and made
    # `latest`) are the job's record; the policy node runs the last announced one.
    record = json.loads((out / "runs" / ros["job_id"] / "job.json").read_text())
    assert record["state"] == "done" and record["versions"] == ros["checkpoints_announced"]
    kept = sorted(p.name for p in Path(report["checkpoints"]).iterdir() if (p / "manifest.json").is_file())
    assert kept == sorted(report["published_versions"]), (kept, report["published_versions"])
    assert ros["checkpoints_announced"] and set(ros["checkpoints_announced"]) <= set(report["published_versions"])
    assert report["published_versions"] == sorted(report["published_versions"])
    assert report["active_version"] == ros["policy_active_version"] == ros["checkpoints_announced"][-1]
    assert report["hotswap_latency_ms"] > 0

    # Numbers of the job, as its summary (kept in the record) says.
    summary = json.loads(record["summary"])
    assert report["stage1_job_val_action_error"] == summary["stage1"]["val_action_error_after"]
    assert report["stage2_val_action_error"] == summary["stage2"]["val_action_error_after"]
    assert len(report["stage1_train_loss_per_epoch"]) == 6 and report["cache_refreshes"] >= 1 and report["lora_params_changed"] is True

    # Errors: one number in training-set stds per model, beside named per-dimension errors in
    # physical units; the job's per-dimension errors are the summary's.
    dims = report["val_action_error_per_dim"]
    assert [(d["name"], d["unit"]) for d in dims][:6] == [("x", "mm"), ("y", "mm"), ("z", "mm"), ("roll", "deg"), ("pitch", "deg"), ("yaw", "deg")]
    assert [d["stage2"] for d in dims] == [d["error"] for d in summary["stage2"]["val_action_error_per_dim"]]
    assert [d["stage1"] for d in dims] == [d["error"] for d in summary["stage2"]["val_action_error_before_per_dim"]]
    assert report["stage1_over_oracle"] == report["stage1_val_action_error"] / report["oracle_val_action_error"]
    assert report["verdict"].startswith(("Stage 2 lowered", "stage 1 is already within", "stage 1 is below the oracle"))
    # Stage 1 with other samples' VL features, from the trainer's stage-1 summary, in the verdict.
    swapped = summary["stage1"]["val_action_error_conditioning_swapped"]
    assert report["stage1_vl_swapped_val_action_error"] == swapped and swapped > 0
    assert f"another sample's give {swapped:.3f} stds" in report["verdict"]
    # The oracle floor: the same heads on the simulator's truth (logged by the sim node as each
    # scene started); rerun from the CLI on the job's dataset, it gives the report's number.
    truth = [json.loads(line) for line in (out / "sim_truth.jsonl").read_text().splitlines()]
    assert all(a["end_ns"] <= b["start_ns"] for a, b in zip(truth, truth[1:])), "one scene at a time"
    assert {e["instruction"] for e in index["episodes"]} <= {t["instruction"] for t in truth}
    oracle = subprocess.run(
        [str(REPO / "install" / "vla_finetune" / "lib" / "vla_finetune" / "vla_finetune"), "train-heads", "--oracle-truth", str(out / "sim_truth.jsonl"),
         "--dataset", str(dataset), "--size", "small", "--epochs", "6", "--seed", "7", "--work-dir", str(tmp_path / "oracle")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TORCH_NUM_THREADS": "1"})
    assert oracle.returncode == 0, oracle.stderr[-3000:]
    o = json.loads(oracle.stdout)
    assert abs(o["val_action_error"] - report["oracle_val_action_error"]) <= 1e-4 * report["oracle_val_action_error"]
    assert all(abs(d["oracle"] - e["error"]) <= 1e-4 * abs(e["error"]) for d, e in zip(dims, o["val_action_error_per_dim"], strict=True))

    # The policy's status log ends with what the report says.
    statuses = json.loads(Path(report["policy_status"]).read_text())
    assert statuses[-1]["active_version"] == report["active_version"] and statuses[-1]["missed_ticks"] == report["missed_ticks"]
    assert report["policy_actions"] > 0 and report["missed_ticks"] <= report["policy_ticks"]

    # The graph: services answered, progress received, every node ended cleanly.
    assert [r["accepted"] for r in ros["services"]["/vla_trainer/start_finetune"]] == [True]
    assert len(ros["services"]["/vla_collector/stop_episode"]) == 3
    assert ros["progress_messages"] > 0 and {"compiling", "training", "done"} <= set(ros["progress_by_phase"])
    assert set(ros["exit_codes"].values()) == {0}, ros["exit_codes"]
    assert (Path(report["plot"])).is_file()
