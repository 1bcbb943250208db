"""Record -> fine-tune -> hot-swap through ROS 2 alone: episodes recorded through the collector's
services, one StartFineTune on the episodes root (failed and discarded episodes left out, the
episodes compiled in phase `compiling`, stage 1 then Stage 2 in one job, steps restarting with
the stage), both checkpoints announced and the policy node running the last (enabled before
its first checkpoint, acting once it is loaded); the job's state
queried; a Stage 2 job on the same root cancelled and resumed by id; and
every bad request answered with its reason while the trainer keeps serving."""

import json
import subprocess
import time

import rclpy
from conftest import CLI, TINY_MODEL, Collect, call, spin_until
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from std_srvs.srv import SetBool, Trigger

from vla_finetune_msgs.msg import ActionChunk, CheckpointInfo, PolicyStatus, TrainingProgress
from vla_finetune_msgs.srv import CancelFineTune, DiscardEpisode, GetFineTuneJob, StartEpisode, StartFineTune, StopEpisode

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
START = "/vla_trainer/start_finetune"
STAGE2_FAST = "model.compute_dtype: f32, cache.mode: vision"


def record(node, seconds, outcome):
    req = StartEpisode.Request(instruction="insert the needle into the red target", task="needle_insertion", operator_name="test")
    resp = call(node, StartEpisode, "/vla_collector/start_episode", req)
    assert resp.started, resp.reason
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.05)
    stop = call(node, StopEpisode, "/vla_collector/stop_episode", StopEpisode.Request(outcome=outcome))
    assert stop.stopped and stop.messages > 0, stop
    return resp.episode_id


def of(progress, job_id):
    return [m for m in progress.items if m.job_id == job_id]


def wait_end(node, progress, job_id, timeout):
    spin_until(node, lambda: any(m.phase in ("done", "failed", "cancelled") for m in of(progress, job_id)), timeout, f"job {job_id} to end")
    return of(progress, job_id)[-1]


def start(node, **fields):
    return call(node, StartFineTune, START, StartFineTune.Request(**fields))


def job(node, job_id=""):
    return call(node, GetFineTuneJob, "/vla_trainer/get_job", GetFineTuneJob.Request(job_id=job_id))


def test_record_finetune_both_stages_on_the_episodes_root_then_cancel_and_resume(graph, ros_node, tmp_path):
    root = tmp_path / "data"
    graph.launch(
        "collect_and_train.launch.xml",
        {"use_sim": "true", "base_model": str(TINY_MODEL), "dataset_root": str(root)},
        {"sim_robot_node": {"image_width": 112, "image_height": 64, "episode_seconds": 30.0}},
    )
    graph.launch("policy.launch.xml", {"base_model": str(TINY_MODEL)})
    progress = Collect(ros_node, TrainingProgress, "/vla_trainer/progress", 1000)
    announced = Collect(ros_node, CheckpointInfo, "/vla_trainer/checkpoint", LATCHED)
    status = Collect(ros_node, PolicyStatus, "/vla_policy/status", 100)
    actions = Collect(ros_node, ActionChunk, "/vla_policy/action_chunk", 100)

    # The policy's gate is served before it has a checkpoint: an enable now holds once one loads.
    early = call(ros_node, Trigger, "/vla_policy/rollback", Trigger.Request())
    assert not early.success and early.message == "no checkpoint is loaded yet: nothing to roll back to", early
    early = call(ros_node, SetBool, "/vla_policy/enable", SetBool.Request(data=True))
    assert early.success and early.message == "enabled: publishing actions once a checkpoint is loaded", early

    # Four demonstrations: one failed, one discarded afterwards (its files stay).
    ids = [record(ros_node, 3.0, outcome) for outcome in ("success", "success", "failure", "success")]
    gone = call(ros_node, DiscardEpisode, "/vla_collector/discard_episode", DiscardEpisode.Request(episode_id=ids[3], reason="camera occluded"))
    assert gone.success and gone.message == "discarded", gone
    assert (root / "episodes" / ids[3]).is_dir()
    unknown = call(ros_node, DiscardEpisode, "/vla_collector/discard_episode", DiscardEpisode.Request(episode_id="nope"))
    assert not unknown.success and "no episode `nope`" in unknown.message, unknown

    # Bad requests get their reason; nothing starts.
    (tmp_path / "empty" / "episodes").mkdir(parents=True)
    (tmp_path / "not_a_model").mkdir()
    other_model = tmp_path / "llama"
    other_model.mkdir()
    for f in ("tokenizer.json", "model.safetensors"):
        (other_model / f).symlink_to(TINY_MODEL / f)
    (other_model / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    bad = {
        "missing root": (dict(dataset=str(tmp_path / "missing")), "dataset_missing: ", "neither a compiled dataset"),
        "empty root": (dict(dataset=str(tmp_path / "empty")), "dataset_missing: ", "no usable episode: the `episodes/` folder is empty"),
        "nothing selected": (dict(dataset=str(root), outcomes=["aborted"]), "dataset_missing: ", "no usable episode: 4 episode(s) found"),
        "not a model": (dict(dataset=str(root), base_model=str(tmp_path / "not_a_model")), "model_dir_invalid: ", "no config.json"),
        "not Qwen2.5-VL": (dict(dataset=str(root), base_model=str(other_model)), "model_dir_invalid: ", "not a Qwen2.5-VL model: "),
        "unknown key": (dict(dataset=str(root), overrides="{run.nope: 1}"), "config_invalid: ", "nope"),
        "wrong type": (dict(dataset=str(root), overrides="{run.epochs: many}"), "config_invalid: ", "run.epochs"),
        "stage 2 without stage 1": (dict(dataset=str(root), stages="2"), "config_invalid: ", "give stage1_checkpoint"),
        "unknown resume": (dict(resume_job_id="ft-0-0"), "unknown_job: ", "ft-0-0"),
    }
    for what, (fields, code, detail) in bad.items():
        r = start(ros_node, **fields)
        assert not r.accepted and r.reason.startswith(code) and detail in r.reason, (what, r.reason)
    assert "model_type `llama` is not `qwen2_5_vl`" in start(ros_node, dataset=str(root), base_model=str(other_model)).reason
    missing = job(ros_node, "ft-0-0")
    assert not missing.found and "no job `ft-0-0`" in missing.reason, missing
    c = call(ros_node, CancelFineTune, "/vla_trainer/cancel_finetune", CancelFineTune.Request(job_id="ft-0-0"))
    assert not c.cancelled and "ft-0-0" in c.reason

    # One call on the episodes root: compile, stage 1, Stage 2 from it. One Stage 2 epoch may
    # validate worse than stage 1, which would keep `latest` (and the announcement) at stage 1's
    # version: allowed here, so that both are announced.
    both = start(ros_node, dataset=str(root), overrides=f"{{stage1.epochs: 2, run.epochs: 1, checkpoint.allow_worse_latest: true, {STAGE2_FAST}}}")
    assert both.accepted, both.reason
    busy = start(ros_node, dataset=str(root))
    assert not busy.accepted and busy.reason.startswith("already_running: ") and both.job_id in busy.reason, busy
    running = job(ros_node)
    assert running.found and running.job_id == both.job_id and running.state == "running" and running.stages == "both", running
    last = wait_end(ros_node, progress, both.job_id, 900)
    assert last.phase == "done", last.message
    mine = of(progress, both.job_id)
    compiling = [m for m in mine if m.phase == "compiling"]
    assert compiling and all(m.stage == 0 for m in compiling)
    text = compiling[-1].message
    assert "compiled 2 episodes" in text and f"episode `{ids[2]}` left out: outcome `failure`" in text and f"episode `{ids[3]}` left out: discarded: camera occluded" in text, text
    stages = [m.stage for m in mine if m.phase != "compiling"]
    assert stages == sorted(stages) and set(stages) == {1, 2}, stages
    s1 = [m.step for m in mine if m.stage == 1 and m.phase == "training"]
    s2 = [m.step for m in mine if m.stage == 2 and m.phase == "training"]
    assert s1 and s2 and s2[0] < s1[-1] and s2 == sorted(s2), (s1, s2)
    done = job(ros_node, both.job_id)
    assert done.state == "done" and done.stage == 2 and not done.resumable, done
    summary = json.loads(done.summary)
    # Stage 1 publishes each epoch, Stage 2 after its epoch; every version is announced.
    assert len(done.versions) == 3 and summary["stage2"]["versions"] == [done.versions[-1]], done
    spin_until(ros_node, lambda: [a.version for a in announced.items if a.job_id == both.job_id] == list(done.versions), 60, "every announcement")
    v1 = next(a for a in announced.items if a.version == summary["stage1"]["version"])
    v2 = announced.items[-1]
    assert "/datasets/" in done.dataset, done.dataset
    spin_until(ros_node, lambda: any(s.active_version == v2.version for s in status.items), 180, f"the policy running {v2.version}")
    # Enabled before its first checkpoint, it acts without another call.
    spin_until(ros_node, lambda: any(s.enabled and s.acting for s in status.items), 60, "the policy enabled and acting")
    spin_until(ros_node, lambda: any(a.checkpoint_version == v2.version for a in actions.items), 60, f"actions of {v2.version}")
    off = call(ros_node, SetBool, "/vla_policy/enable", SetBool.Request(data=False))
    assert off.success and off.message.startswith("disabled"), off
    assert start(ros_node, resume_job_id=both.job_id).reason.startswith("not_resumable: "), "a done job does not resume"

    # A compiled dataset of another sensor layout is refused for Stage 2 from that checkpoint.
    other_cfg = tmp_path / "other_layout.yaml"
    other_cfg.write_text("align:\n  sensor_window_s: 0.1\n  sensor_samples: 65\n")
    other = tmp_path / "other_layout"
    made = subprocess.run([str(CLI), "dataset", "compile", "--episodes", str(root), "--out", str(other), "--config", str(other_cfg)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    r = start(ros_node, dataset=str(other), stage1_checkpoint=v1.path)
    assert not r.accepted and r.reason.startswith("dataset_missing: ") and "another sensor layout" in r.reason and "[650, 1026]" in r.reason and "[65, 1026]" in r.reason, r.reason

    # Stage 2 alone from stage 1's checkpoint, on the same root (its compiled set reused), cancelled.
    s2 = start(ros_node, dataset=str(root), stage1_checkpoint=v1.path, overrides=f"{{run.epochs: 50, {STAGE2_FAST}}}")
    assert s2.accepted, s2.reason
    action_job = s2.job_id
    spin_until(ros_node, lambda: any(m.phase == "training" and m.step >= 1 for m in of(progress, action_job)), 300, "a Stage 2 step")
    assert any("reusing" in m.message for m in of(progress, action_job) if m.phase == "compiling"), [m.message for m in of(progress, action_job)]
    assert call(ros_node, CancelFineTune, "/vla_trainer/cancel_finetune", CancelFineTune.Request(job_id=action_job)).cancelled
    assert wait_end(ros_node, progress, action_job, 120).phase == "cancelled"
    stopped_at = max(m.step for m in of(progress, action_job) if m.phase == "training")

    # Resumed by id: it continues from its saved state, then is cancelled again.
    q = job(ros_node, action_job)
    assert q.state == "cancelled" and q.resumable and q.stages == "2", q
    mixed = start(ros_node, resume_job_id=action_job, dataset=str(root))
    assert mixed.reason.startswith("not_resumable: ") and "leave every field but resume_job_id empty" in mixed.reason, mixed
    n = len(of(progress, action_job))
    again = start(ros_node, resume_job_id=action_job)
    assert again.accepted and again.job_id == action_job, again.reason
    spin_until(ros_node, lambda: any(m.phase == "training" for m in of(progress, action_job)[n:]), 300, "the resumed job training")
    first_resumed = next(m for m in of(progress, action_job)[n:] if m.phase == "training")
    assert first_resumed.step >= stopped_at, (first_resumed.step, stopped_at)
    assert call(ros_node, CancelFineTune, "/vla_trainer/cancel_finetune", CancelFineTune.Request()).cancelled
    spin_until(ros_node, lambda: of(progress, action_job)[-1].phase == "cancelled", 120, "the resumed job cancelled")
    assert job(ros_node, action_job).state == "cancelled"
