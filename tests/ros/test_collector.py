"""Collector + simulated robot on a real ROS 2 graph: episodes recorded through StartEpisode /
StopEpisode hold what the simulated robot published in that window (or count the difference
as drops), bad requests are rejected with reasons, SIGINT closes an open episode, and the
recorded messages decode with the Python `rosbags` library to the values published live."""

import json
import time
from collections import Counter
from pathlib import Path

from conftest import Collect, call, digest, read_episode, spin_until

from vla_finetune_msgs.msg import CollectorStatus, SensorFrame
from vla_finetune_msgs.srv import StartEpisode, StopEpisode

TOPICS = ["/sim/camera0/image_raw", "/sim/camera1/image_raw", "/sim/oct/frame", "/sim/robot/pose"]


def start_graph(graph, tmp_path):
    published = tmp_path / "published.log"
    procs = graph.launch(
        "collect_and_train.launch.xml",
        {"use_sim": "true", "dataset_root": str(tmp_path / "data")},
        {"sim_robot_node": {"published_log": str(published), "episode_seconds": 30.0}},
    )
    return procs, published


def record(node, seconds, **start):
    req = StartEpisode.Request(instruction="insert the needle into the red target", task="needle_insertion", operator_name="test", **start)
    resp = call(node, StartEpisode, "/vla_collector/start_episode", req)
    assert resp.started, resp.reason
    t0 = time.time_ns()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        import rclpy

        rclpy.spin_once(node, timeout_sec=0.05)
    t1 = time.time_ns()
    stop = call(node, StopEpisode, "/vla_collector/stop_episode", StopEpisode.Request(outcome="success"))
    assert stop.stopped, stop.reason
    return resp.episode_id, stop, t0, t1


def published_between(log, t0, t1):
    counts = Counter()
    for line in Path(log).read_text().splitlines():
        topic, stamp = line.split()
        if t0 <= int(stamp) <= t1:
            counts[topic] += 1
    return counts


def test_episodes_hold_what_the_robot_published_and_bad_requests_are_rejected(graph, ros_node, tmp_path):
    from geometry_msgs.msg import PoseStamped
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    procs, published = start_graph(graph, tmp_path)
    status = Collect(ros_node, CollectorStatus, "/vla_collector/status")
    live = {
        "/sim/robot/pose": Collect(ros_node, PoseStamped, "/sim/robot/pose", 1000),
        "/sim/oct/frame": Collect(ros_node, SensorFrame, "/sim/oct/frame", 1000),
        "/sim/camera0/image_raw": Collect(ros_node, Image, "/sim/camera0/image_raw", qos_profile_sensor_data),
    }
    spin_until(ros_node, lambda: all(c.items for c in live.values()), 60, "the simulated robot's topics")

    stop = call(ros_node, StopEpisode, "/vla_collector/stop_episode", StopEpisode.Request(outcome="success"))
    assert not stop.stopped and "no episode is being recorded" in stop.reason, stop

    episodes = []
    for _ in range(2):
        ep_id, stop, t0, t1 = record(ros_node, 4.0)
        again = call(ros_node, StartEpisode, "/vla_collector/start_episode", StartEpisode.Request(instruction="x"))
        assert again.started, "the collector accepts a new episode after a stop"
        second = call(ros_node, StartEpisode, "/vla_collector/start_episode", StartEpisode.Request(instruction="y"))
        assert not second.started and again.episode_id in second.reason, second
        call(ros_node, StopEpisode, "/vla_collector/stop_episode", StopEpisode.Request(outcome="aborted"))
        episodes.append((ep_id, stop, t0, t1))

    spin_until(ros_node, lambda: len(status.items) >= 2, 10, "CollectorStatus")
    assert list(status.items[-1].topics) == TOPICS
    for s in status.items:
        assert len(s.dropped) == len(s.topics) == len(s.received) == len(s.written)

    graph.stop_all()
    for ep_id, stop, t0, t1 in episodes:
        ep_dir = tmp_path / "data" / "episodes" / ep_id
        meta = json.loads((ep_dir / "episode.json").read_text())
        recorded = read_episode(ep_dir)
        assert sum(len(v) for v in recorded.values()) == stop.messages, "StopEpisode.messages counts this episode only"
        # Messages stamped while the collector was surely recording (start answered .. stop
        # asked) are all in the episode, or counted as dropped.
        sent = published_between(published, t0, t1)
        for topic in TOPICS:
            got = sum(1 for s in recorded.get(topic, {}) if t0 <= s <= t1)
            missing = sent[topic] - got
            assert sent[topic] > 0, topic
            assert 0 <= missing <= meta["drops"].get(topic, 0), f"{ep_id} {topic}: sent {sent[topic]}, recorded {got}, drops {meta['drops']}"
        # What rclpy received live equals what rosbags decodes from the file, value for value.
        for topic, c in live.items():
            cls = "Image" if "camera" in topic else ("SensorFrame" if "oct" in topic else "PoseStamped")
            seen = {m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec: digest(cls, m) for m in c.items}
            common = set(seen) & set(recorded[topic])
            assert len(common) >= 5, f"{topic}: only {len(common)} messages both received live and recorded"
            for s in common:
                assert seen[s] == recorded[topic][s], f"{topic} @ {s}"


def test_sigint_closes_the_open_episode_as_interrupted(graph, ros_node, tmp_path):
    procs, _ = start_graph(graph, tmp_path)
    resp = call(ros_node, StartEpisode, "/vla_collector/start_episode", StartEpisode.Request(instruction="i", task="t", operator_name="o"))
    assert resp.started, resp.reason
    time.sleep(2.0)
    codes = {exe: p.interrupt(10.0) for exe, p in procs.items()}
    assert codes == {exe: 0 for exe in procs}, {exe: (c, procs[exe].output()[-2000:]) for exe, c in codes.items() if c != 0}
    ep_dir = tmp_path / "data" / "episodes" / resp.episode_id
    meta = json.loads((ep_dir / "episode.json").read_text())
    assert meta["outcome"] == "interrupted" and not meta["recovered"], meta
    assert not (ep_dir / "RECORDING").exists()
    recorded = read_episode(ep_dir)
    assert all(len(recorded.get(t, {})) > 0 for t in TOPICS), {t: len(v) for t, v in recorded.items()}


def test_a_robot_that_goes_silent_mid_episode_shows_as_drops(graph, ros_node, tmp_path):
    procs, published = start_graph(graph, tmp_path)
    live = Collect(ros_node, SensorFrame, "/sim/oct/frame", 1000)
    spin_until(ros_node, lambda: live.items, 60, "the simulated robot's sensor")
    resp = call(ros_node, StartEpisode, "/vla_collector/start_episode", StartEpisode.Request(instruction="i", task="t", operator_name="o"))
    assert resp.started, resp.reason
    time.sleep(1.5)
    assert procs["sim_robot_node"].interrupt(10.0) == 0
    time.sleep(1.0)
    asked = time.time_ns()
    stop = call(ros_node, StopEpisode, "/vla_collector/stop_episode", StopEpisode.Request(outcome="aborted"))
    assert stop.stopped, stop.reason
    meta = json.loads((tmp_path / "data" / "episodes" / resp.episode_id / "episode.json").read_text())
    last = {}
    for line in Path(published).read_text().splitlines():
        topic, stamp = line.split()
        last[topic] = max(last.get(topic, 0), int(stamp))
    rates = {"/sim/camera0/image_raw": 10.0, "/sim/camera1/image_raw": 10.0, "/sim/oct/frame": 650.0, "/sim/robot/pose": 100.0}
    for topic, rate in rates.items():
        # Due after the last message the robot sent and before the stop was asked: at least that
        # many are counted as dropped (the stop came later, and the collector may have received
        # less than was sent).
        period = 1e9 / rate
        owed = int((asked - last[topic]) / period)
        assert owed >= 5, (topic, owed)
        assert meta["drops"].get(topic, 0) >= owed, f"{topic}: silent for {(asked - last[topic]) / 1e9:.2f} s, drops {meta['drops']}"
