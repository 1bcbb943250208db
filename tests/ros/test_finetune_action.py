"""The FineTune action on the trainer's job controller, driven by rclpy's standard ActionClient:
a rejected goal ends aborted with the reason, a stage-1 goal streams TrainingProgress feedback
and succeeds with the announced checkpoint, and a Stage 2 goal cancelled by the client ends
canceled with its job cancelled."""

import json
import time

import rclpy
from action_msgs.msg import GoalStatus
from conftest import TINY_MODEL, Collect, compiled_dataset, spin_until
from rclpy.action import ActionClient
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from vla_finetune_msgs.action import FineTune
from vla_finetune_msgs.msg import CheckpointInfo

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def send(node, client, goal, feedback):
    sent = client.send_goal_async(goal, feedback_callback=lambda f: feedback.append(f.feedback.progress))
    rclpy.spin_until_future_complete(node, sent, timeout_sec=30)
    handle = sent.result()
    assert handle is not None and handle.accepted
    return handle


def result_of(node, handle, timeout):
    future = handle.get_result_async()
    rclpy.spin_until_future_complete(node, future, timeout_sec=timeout)
    assert future.done(), f"no result within {timeout} s"
    return future.result()


def test_finetune_action_feedback_result_reject_and_cancel(graph, ros_node, tmp_path):
    dataset = compiled_dataset(tmp_path)
    graph.launch("collect_and_train.launch.xml", {"use_sim": "false", "base_model": str(TINY_MODEL), "dataset_root": str(tmp_path / "data")})
    announced = Collect(ros_node, CheckpointInfo, "/vla_trainer/checkpoint", LATCHED)
    client = ActionClient(ros_node, FineTune, "/vla_trainer/finetune")
    spin_until(ros_node, client.server_is_ready, 60, "the FineTune action server")
    # Ready on this side is not yet matched on the server's: a goal sent at once can meet a
    # server whose goal response finds no reader yet (Fast DDS: RCL_RET_TIMEOUT, goal dropped).
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        rclpy.spin_once(ros_node, timeout_sec=0.05)

    rejected = result_of(ros_node, send(ros_node, client, FineTune.Goal(dataset=str(tmp_path / "missing")), []), 30)
    assert rejected.status == GoalStatus.STATUS_ABORTED and rejected.result.state == "rejected", rejected
    assert rejected.result.summary.startswith("dataset_missing: ") and "missing" in rejected.result.summary

    feedback = []
    handle = send(ros_node, client, FineTune.Goal(dataset=str(dataset), stages="1", overrides="{stage1.epochs: 2}"), feedback)
    done = result_of(ros_node, handle, 600)
    assert done.status == GoalStatus.STATUS_SUCCEEDED and done.result.state == "done", done
    job_id = done.result.job_id
    assert feedback and all(p.job_id == job_id and p.stage == 1 for p in feedback), feedback[:3]
    assert any(p.phase == "training" for p in feedback) and feedback[-1].phase == "done"
    spin_until(ros_node, lambda: any(a.job_id == job_id for a in announced.items), 30, "the announcement")
    last = [a for a in announced.items if a.job_id == job_id][-1]
    assert done.result.checkpoint.version == last.version and done.result.checkpoint.path == last.path, (done.result.checkpoint, last)
    assert json.loads(done.result.summary)["stage1"]["version"] == last.version

    feedback = []
    handle = send(ros_node, client, FineTune.Goal(dataset=str(dataset), stage1_checkpoint=last.path, overrides="{run.epochs: 50, model.compute_dtype: f32, cache.mode: vision}"), feedback)
    spin_until(ros_node, lambda: any(p.phase == "training" and p.step >= 1 and p.stage == 2 for p in feedback), 300, "Stage 2 feedback")
    cancel = handle.cancel_goal_async()
    rclpy.spin_until_future_complete(ros_node, cancel, timeout_sec=30)
    assert cancel.result() is not None and len(cancel.result().goals_canceling) == 1, cancel.result()
    end = result_of(ros_node, handle, 120)
    assert end.status == GoalStatus.STATUS_CANCELED and end.result.state == "cancelled", end
    assert end.result.job_id == feedback[-1].job_id
    client.destroy()
