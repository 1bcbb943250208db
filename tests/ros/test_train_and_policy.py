"""Trainer and policy nodes on a real ROS 2 graph, with the shipped launch files and parameter
files: StartFineTune on the tiny model, progress at its rate with increasing steps, cancel with a
resumable state, CheckpointInfo latched for late subscribers, the policy node (default
parameters) activating the announced checkpoint, publishing nothing until enabled, acting while
its inputs are fresh, rejecting a corrupted checkpoint, rolling back and pinning on an operator's
request, parameters served by the rcl_interfaces services, and SIGINT ending every node with
exit code 0."""

import json
import shutil
import time

import rclpy
from conftest import TINY_MODEL, Collect, call, compiled_dataset, spin_until
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_srvs.srv import SetBool, Trigger

from vla_finetune_msgs.msg import ActionChunk, CheckpointInfo, PolicyStatus, TrainingProgress
from vla_finetune_msgs.srv import CancelFineTune, StartFineTune

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def progress_of(items, job_id):
    return [m for m in items if m.job_id == job_id]


def wait_terminal(node, progress, job_id, timeout):
    spin_until(node, lambda: any(m.phase in ("done", "failed", "cancelled") for m in progress_of(progress.items, job_id)), timeout, f"job {job_id} to end")
    return progress_of(progress.items, job_id)[-1]


def spin_for(node, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.02)


def set_string_param(node, target, name, value):
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    p = Parameter(name=name, value=ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value))
    result = call(node, SetParameters, f"{target}/set_parameters", SetParameters.Request(parameters=[p])).results[0]
    assert result.successful, result.reason


def copy_as_version(src, dst, version):
    """A verified checkpoint folder copied under another version name (manifest rewritten)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = version
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_finetune_announce_hot_swap_cancel_and_shutdown(graph, ros_node, tmp_path):
    from rcl_interfaces.srv import GetParameters, ListParameters

    dataset = compiled_dataset(tmp_path)
    train = graph.launch(
        "collect_and_train.launch.xml",
        {"use_sim": "true", "base_model": str(TINY_MODEL), "dataset_root": str(tmp_path / "data")},
        {"sim_robot_node": {"image_width": 112, "image_height": 64}},
    )
    policy = graph.launch("policy.launch.xml", {"base_model": str(TINY_MODEL)})
    procs = {**train, **policy}
    progress = Collect(ros_node, TrainingProgress, "/vla_trainer/progress", 1000)
    status = Collect(ros_node, PolicyStatus, "/vla_policy/status", 100)
    actions = Collect(ros_node, ActionChunk, "/vla_policy/action_chunk", 100)

    # Parameters are declared with types and served by the parameter services.
    names = call(ros_node, ListParameters, "/vla_policy/list_parameters", ListParameters.Request(), resend_every=5.0).result.names
    for expected in ("sensor_window", "horizon", "action_dim", "control_rate_hz", "base_model", "use_sim_time"):
        assert expected in names, names
    got = call(ros_node, GetParameters, "/vla_policy/get_parameters", GetParameters.Request(names=["control_rate_hz", "sensor_window"]), resend_every=5.0).values
    assert (got[0].double_value, got[1].integer_value) == (10.0, 0), got

    # Stage 1 through the service; a second start while it runs is rejected with a reason.
    # One override syntax for both stages: a key without its section is refused with the fix.
    flat = call(ros_node, StartFineTune, "/vla_trainer/start_finetune", StartFineTune.Request(dataset=str(dataset), stages="1", overrides="{epochs: 3}"))
    assert not flat.accepted and "`stage1.epochs` for stage 1" in flat.reason, flat
    start = call(ros_node, StartFineTune, "/vla_trainer/start_finetune", StartFineTune.Request(dataset=str(dataset), stages="1", overrides="{stage1.epochs: 3}"))
    assert start.accepted and start.job_id, start.reason
    second = call(ros_node, StartFineTune, "/vla_trainer/start_finetune", StartFineTune.Request(dataset=str(dataset)))
    assert not second.accepted and "already" in second.reason, second
    last = wait_terminal(ros_node, progress, start.job_id, 600)
    assert last.phase == "done", last.message
    mine = progress_of(progress.items, start.job_id)
    steps = [m.step for m in mine]
    assert steps == sorted(steps) and steps[-1] > 0, steps
    assert last.total_steps > 0 and last.total_epochs == 3
    training = [m for m in mine if m.phase == "training"]
    if len(training) >= 3:
        span = (training[-1].stamp.sec + training[-1].stamp.nanosec * 1e-9) - (training[0].stamp.sec + training[0].stamp.nanosec * 1e-9)
        assert (len(training) - 1) / max(span, 1e-3) <= 2.0 * 1.5, f"{len(training)} training messages in {span:.2f} s (progress_rate_hz 2)"

    # The announcement is latched: a subscriber created now still receives it.
    late = Collect(ros_node, CheckpointInfo, "/vla_trainer/checkpoint", LATCHED)
    spin_until(ros_node, lambda: late.items, 30, "the latched CheckpointInfo")
    info = late.items[-1]
    assert info.job_id == start.job_id and info.version and info.path

    # The policy node, with its shipped parameters, activates it but publishes nothing until an
    # operator enables it; then it acts while inputs are fresh.
    spin_until(ros_node, lambda: any(s.active_version == info.version for s in status.items), 180, f"the policy loading {info.version}")
    spin_for(ros_node, 1.5)
    assert not actions.items, "actions published before ~/enable"
    assert not status.items[-1].enabled and not status.items[-1].acting, status.items[-1]
    enabled = call(ros_node, SetBool, "/vla_policy/enable", SetBool.Request(data=True))
    assert enabled.success and enabled.message == "enabled: publishing actions", enabled
    spin_until(ros_node, lambda: any(s.active_version == info.version and s.acting and s.enabled for s in status.items), 60, f"the policy acting with {info.version}")
    spin_until(ros_node, lambda: len([a for a in actions.items if a.checkpoint_version == info.version]) >= 3, 60, "action chunks")
    chunk = actions.items[-1]
    assert chunk.horizon * chunk.action_dim == len(chunk.values) > 0

    # A corrupted checkpoint is rejected and the active version stays.
    bad = tmp_path / "bad_checkpoint"
    shutil.copytree(info.path, bad)
    heads = next(p for p in bad.iterdir() if p.suffix == ".safetensors")
    heads.write_bytes(heads.read_bytes()[:-16] + b"\0" * 16)
    pub = ros_node.create_publisher(CheckpointInfo, "/vla_trainer/checkpoint", LATCHED)
    pub.publish(CheckpointInfo(version="v9999", path=str(bad), job_id="forged"))
    spin_until(ros_node, lambda: any("v9999" in s.message for s in status.items), 60, "the rejection of v9999")
    n = len(status.items)
    spin_until(ros_node, lambda: len(status.items) > n + 2, 30, "more policy status")
    assert status.items[-1].active_version == info.version, status.items[-1]

    # Roll back and pin, between two verified versions (the second a renamed copy of the first).
    second = copy_as_version(info.path, tmp_path / "copies" / "v0777", "v0777")
    pub.publish(CheckpointInfo(version="v0777", path=str(second), job_id="copy"))
    spin_until(ros_node, lambda: any(s.active_version == "v0777" and s.previous_version == info.version for s in status.items), 60, "v0777 active")
    back = call(ros_node, Trigger, "/vla_policy/rollback", Trigger.Request())
    assert back.success and back.message == f"rolled back to {info.version} (pinned; v0777 kept as previous)", back
    spin_until(ros_node, lambda: any(s.active_version == info.version and s.pinned_version == info.version for s in status.items), 30, "the roll-back")
    n = len(actions.items)
    spin_until(ros_node, lambda: len(actions.items) >= n + 3, 30, "actions after the roll-back")
    assert {a.checkpoint_version for a in actions.items[n + 1 :]} == {info.version}
    set_string_param(ros_node, "/vla_policy", "pinned_version", "v0777")
    spin_until(ros_node, lambda: any(s.active_version == "v0777" and s.pinned_version == "v0777" for s in status.items), 30, "the pin of v0777")
    set_string_param(ros_node, "/vla_policy", "pinned_version", "")
    spin_until(ros_node, lambda: status.items[-1].pinned_version == "" and status.items[-1].active_version == "v0777", 30, "the unpin")
    again = call(ros_node, Trigger, "/vla_policy/rollback", Trigger.Request())
    assert again.success and again.message.startswith(f"rolled back to {info.version}"), again
    # Disabled again: no more actions; enabled: they resume.
    off = call(ros_node, SetBool, "/vla_policy/enable", SetBool.Request(data=False))
    assert off.success and off.message.startswith("disabled"), off
    spin_for(ros_node, 0.5)
    n = len(actions.items)
    spin_for(ros_node, 1.5)
    assert len(actions.items) == n, "actions published while disabled"
    assert call(ros_node, SetBool, "/vla_policy/enable", SetBool.Request(data=True)).success
    spin_until(ros_node, lambda: len(actions.items) >= n + 3, 30, "actions after enabling again")
    ros_node.destroy_publisher(pub)

    # Stage 2 from that checkpoint, cancelled within a step with a resumable state.
    s2 = call(
        ros_node,
        StartFineTune,
        "/vla_trainer/start_finetune",
        StartFineTune.Request(dataset=str(dataset), stage1_checkpoint=info.path, overrides="{run.epochs: 50, model.compute_dtype: f32, cache.mode: vision}"),
    )
    assert s2.accepted, s2.reason
    spin_until(ros_node, lambda: any(m.step >= 1 and m.phase == "training" for m in progress_of(progress.items, s2.job_id)), 300, "a Stage 2 step")
    cancel = call(ros_node, CancelFineTune, "/vla_trainer/cancel_finetune", CancelFineTune.Request(job_id=s2.job_id))
    assert cancel.cancelled, cancel.reason
    assert wait_terminal(ros_node, progress, s2.job_id, 120).phase == "cancelled"
    assert (tmp_path / "vla_runs" / s2.job_id / "stage2" / "state" / "latest.safetensors").is_file()
    unknown = call(ros_node, CancelFineTune, "/vla_trainer/cancel_finetune", CancelFineTune.Request(job_id="no-such-job"))
    assert not unknown.cancelled and "no-such-job" in unknown.reason

    # Inputs go stale when the robot stops: no more actions.
    assert procs["sim_robot_node"].interrupt(10.0) == 0, procs["sim_robot_node"].output()[-3000:]
    spin_until(ros_node, lambda: any(not s.acting and s.stale_inputs for s in status.items[-5:]), 30, "stale inputs")
    time.sleep(1.0)
    for _ in range(20):
        rclpy.spin_once(ros_node, timeout_sec=0.05)
    before = len(actions.items)
    for _ in range(40):
        rclpy.spin_once(ros_node, timeout_sec=0.05)
    assert len(actions.items) == before, "actions published with stale inputs"

    # SIGINT ends every node with exit code 0.
    codes = {exe: p.interrupt(10.0) for exe, p in procs.items() if exe != "sim_robot_node"}
    assert all(c == 0 for c in codes.values()), {exe: (c, procs[exe].output()[-3000:]) for exe, c in codes.items() if c != 0}

    # A policy started on the checkpoints root runs the version its `latest` names.
    root = tmp_path / "vla_checkpoints"
    assert (root / "latest").read_text().strip() == info.version
    restarted = graph.launch("policy.launch.xml", {"base_model": str(TINY_MODEL), "checkpoint": str(root)})
    later = Collect(ros_node, PolicyStatus, "/vla_policy/status", 100)
    spin_until(ros_node, lambda: any(s.active_version == info.version for s in later.items), 120, f"{info.version} from {root}")
    assert restarted["policy_node"].interrupt(10.0) == 0
