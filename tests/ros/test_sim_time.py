"""Simulated time: with the launch files' `use_sim_time:=true` every node takes its clock from
/clock (here a test publisher starting at 5000 s, far from the wall clock's ~1.8e9 s). Episode
start/stop times and recorded stamps, collector and policy status, training progress, the
checkpoint announcement and action chunks all carry simulated time, and the policy's control
loop stands still while simulated time does."""

import json
import time

import rclpy
from conftest import TINY_MODEL, Collect, call, compiled_dataset, read_episode, spin_until
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from std_srvs.srv import SetBool

from vla_finetune_msgs.msg import ActionChunk, CheckpointInfo, CollectorStatus, PolicyStatus, TrainingProgress
from vla_finetune_msgs.srv import StartEpisode, StartFineTune, StopEpisode

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
T0_NS = 5_000 * 1_000_000_000


class SimClock:
    """Publishes /clock every 10 ms from the test node's spin; time runs 1:1 with the wall clock
    unless paused (a paused simulator keeps publishing the same time)."""

    def __init__(self, node):
        self.now_ns, self.running, self.last = T0_NS, True, time.monotonic()
        self.pub = node.create_publisher(Clock, "/clock", 10)
        self.timer = node.create_timer(0.01, self.tick)

    def tick(self):
        wall = time.monotonic()
        if self.running:
            self.now_ns += int((wall - self.last) * 1e9)
        self.last = wall
        msg = Clock()
        msg.clock.sec, msg.clock.nanosec = divmod(self.now_ns, 1_000_000_000)
        self.pub.publish(msg)


def ns(stamp):
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def assert_simulated(stamps, clock, what):
    """Every stamp lies in simulated time: after T0 and not after the simulated now."""
    assert stamps, f"no {what}"
    bad = [s for s in stamps if not T0_NS <= s <= clock.now_ns + 1_000_000_000]
    assert not bad, f"{what}: {len(bad)} of {len(stamps)} stamps outside simulated time [{T0_NS}, {clock.now_ns}], e.g. {bad[:3]}"


def spin_for(node, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.02)


def test_every_stamp_and_the_control_loop_follow_sim_time(graph, ros_node, tmp_path):
    dataset = compiled_dataset(tmp_path)
    clock = SimClock(ros_node)
    published = tmp_path / "published.log"
    sim = {"use_sim_time": "true"}
    train = graph.launch(
        "collect_and_train.launch.xml",
        {**sim, "use_sim": "true", "base_model": str(TINY_MODEL), "dataset_root": str(tmp_path / "data")},
        {"sim_robot_node": {"image_width": 112, "image_height": 64, "published_log": str(published)}},
    )
    policy = graph.launch("policy.launch.xml", {**sim, "base_model": str(TINY_MODEL)})
    status = Collect(ros_node, CollectorStatus, "/vla_collector/status")
    progress = Collect(ros_node, TrainingProgress, "/vla_trainer/progress", 1000)
    announced = Collect(ros_node, CheckpointInfo, "/vla_trainer/checkpoint", LATCHED)
    policy_status = Collect(ros_node, PolicyStatus, "/vla_policy/status", 100)
    actions = Collect(ros_node, ActionChunk, "/vla_policy/action_chunk", 100)

    # The collector: its status and an episode recorded now are in simulated time.
    spin_until(ros_node, lambda: [s for s in status.items if ns(s.stamp) >= T0_NS][2:], 60, "three CollectorStatus in simulated time")
    start = call(ros_node, StartEpisode, "/vla_collector/start_episode", StartEpisode.Request(instruction="reach the red target", task="reach"))
    assert start.started, start.reason
    spin_for(ros_node, 3.0)
    stop = call(ros_node, StopEpisode, "/vla_collector/stop_episode", StopEpisode.Request(outcome="success"))
    assert stop.stopped and stop.messages > 0, stop
    ep_dir = tmp_path / "data" / "episodes" / start.episode_id
    meta = json.loads((ep_dir / "episode.json").read_text())
    assert_simulated([meta["start_ns"], meta["stop_ns"]], clock, "episode start/stop")
    assert 2.0e9 <= meta["stop_ns"] - meta["start_ns"] <= 8.0e9, meta
    recorded = read_episode(ep_dir)
    assert set(recorded) == {"/sim/camera0/image_raw", "/sim/camera1/image_raw", "/sim/oct/frame", "/sim/robot/pose"}, recorded.keys()
    for topic, by_stamp in recorded.items():
        assert_simulated(list(by_stamp), clock, f"recorded {topic}")
    # The robot is still writing its log: only lines up to the last newline are whole.
    whole = published.read_text().split("\n")[:-1]
    assert_simulated([int(line.split()[1]) for line in whole], clock, "the simulated robot's stamps")

    # Training progress and the announcement carry simulated time; the policy acts in it.
    job = call(ros_node, StartFineTune, "/vla_trainer/start_finetune", StartFineTune.Request(dataset=str(dataset), stages="1", overrides="{stage1.epochs: 1}"))
    assert job.accepted, job.reason
    spin_until(ros_node, lambda: announced.items, 600, "the checkpoint announcement")
    info = announced.items[-1]
    assert_simulated([ns(info.stamp)], clock, "CheckpointInfo")
    assert_simulated([ns(m.stamp) for m in progress.items if m.job_id == job.job_id], clock, "TrainingProgress")
    assert call(ros_node, SetBool, "/vla_policy/enable", SetBool.Request(data=True)).success
    spin_until(ros_node, lambda: len([a for a in actions.items if a.checkpoint_version == info.version]) >= 3, 240, "action chunks")
    assert_simulated([ns(a.header.stamp) for a in actions.items], clock, "ActionChunk")
    assert_simulated([ns(s.stamp) for s in policy_status.items if ns(s.stamp) > 0], clock, "PolicyStatus")

    # Simulated time stands still: no control tick, no action. It runs again: actions resume.
    clock.running = False
    spin_for(ros_node, 0.5)
    before = len(actions.items)
    spin_for(ros_node, 2.0)
    assert len(actions.items) == before, f"{len(actions.items) - before} actions while simulated time stood still"
    clock.running = True
    spin_until(ros_node, lambda: len(actions.items) >= before + 3, 30, "actions after simulated time resumed")

    codes = {exe: p.interrupt(10.0) for exe, p in {**train, **policy}.items()}
    assert all(c == 0 for c in codes.values()), codes
