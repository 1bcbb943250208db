"""The trainer node with `nproc_per_node: 2` on a real ROS 2 graph: one StartFineTune runs stage 1
in the node and Stage 2 as two data-parallel ranks under torchrun (Gloo on loopback, inside the
test's network namespace); rank 0's progress reaches ~/progress with the steps in order, the
Stage 2 checkpoints are announced on ~/checkpoint and the job ends done."""

import re

from conftest import TINY_MODEL, Collect, call, compiled_dataset, spin_until
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from vla_finetune_msgs.msg import CheckpointInfo, TrainingProgress
from vla_finetune_msgs.srv import StartFineTune

LATCHED = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def test_stage2_runs_as_two_ranks_under_torchrun(graph, ros_node, tmp_path):
    dataset = compiled_dataset(tmp_path)
    procs = graph.launch(
        "collect_and_train.launch.xml",
        {"use_sim": "true", "base_model": str(TINY_MODEL), "dataset_root": str(tmp_path / "data")},
        {"trainer_node": {"nproc_per_node": 2}},
    )
    progress = Collect(ros_node, TrainingProgress, "/vla_trainer/progress", 1000)
    announced = Collect(ros_node, CheckpointInfo, "/vla_trainer/checkpoint", LATCHED)
    overrides = "{stage1.epochs: 2, run.epochs: 2, lora.dropout: 0.0, distributed.timeout_s: 120}"
    start = call(ros_node, StartFineTune, "/vla_trainer/start_finetune", StartFineTune.Request(dataset=str(dataset), overrides=overrides))
    assert start.accepted and start.job_id, start.reason
    mine = lambda: [m for m in progress.items if m.job_id == start.job_id]
    spin_until(ros_node, lambda: any(m.phase in ("done", "failed", "cancelled") for m in mine()), 900, f"job {start.job_id} to end")
    last = mine()[-1]
    assert last.phase == "done", last.message
    stage2 = [m for m in mine() if m.stage == 2 and m.phase == "training"]
    assert stage2, [(m.stage, m.phase) for m in mine()]
    steps = [m.step for m in stage2]
    assert steps == sorted(steps) and steps[-1] > 0, steps
    assert stage2[-1].total_steps > 0 and stage2[-1].total_epochs == 2
    # Two ranks joined the group (their log lines pass through the node's output).
    log = re.sub(r"\x1b\[[0-9;]*m", "", procs["trainer_node"].output())
    assert "rank=0" in log and "rank=1" in log and "world=2" in log, log[-3000:]
    spin_until(ros_node, lambda: len({i.version for i in announced.items if i.job_id == start.job_id}) >= 2, 60, "stage 1 and Stage 2 announcements")
    versions = [i.version for i in announced.items if i.job_id == start.job_id]
    assert versions == sorted(versions), versions
