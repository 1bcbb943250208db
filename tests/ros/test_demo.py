"""`make demo` at a reduced size (scripts/ros_demo.py --quick, in this test's network
namespace): the loop runs through ROS 2 and its report's numbers come from the run, checked
against the files the run left (compiled dataset, checkpoints, job record, the policy's status
log) and the ROS graph's own account."""

import json
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
