"""Recording through ROS 2 on this machine (docs/benchmarks.md): the reference rig (5 cameras
640x360 rgb8 at 30 Hz, 650 Hz x 1026 sensor, 100 Hz pose) published by the simulated robot node
and recorded by the collector node, both started as collect_and_train.launch.xml starts them.
Reports per topic the messages published vs recorded in each episode, the drops the collector
counted, and the CPU time of both nodes.

    make ros && source scripts/ros_env.sh && \\
      scripts/netns_run.sh python tests/ros/bench_recording.py --episodes 3 --seconds 4
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rclpy  # noqa: E402
import yaml  # noqa: E402
from conftest import Graph, call, pytest_configure  # noqa: E402
from test_collector import published_between, read_episode  # noqa: E402

from vla_finetune_msgs.srv import StartEpisode, StopEpisode  # noqa: E402


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--cameras", type=int, default=5)
    ap.add_argument("--rate", type=float, default=30.0)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    pytest_configure(None)
    tmp = Path(tempfile.mkdtemp(prefix="vla_bench_ros_"))
    streams = yaml.safe_load((Path(__file__).resolve().parents[2] / "config" / "streams_sim.yaml").read_text())
    cam = streams["cameras"][0]
    streams["cameras"] = [
        {**cam, "name": f"camera{i}", "topic": f"/sim/camera{i}/image_raw", "rate_hz": a.rate, "max_age_ms": 1500.0 / a.rate} for i in range(a.cameras)
    ]
    (tmp / "streams.yaml").write_text(yaml.safe_dump(streams))
    g = Graph(tmp)
    procs = g.launch(
        "collect_and_train.launch.xml",
        {"use_sim": "true", "dataset_root": str(tmp / "data"), "streams_config": str(tmp / "streams.yaml")},
        {"sim_robot_node": {"cameras": a.cameras, "camera_rate_hz": a.rate, "published_log": str(tmp / "published.log"), "episode_seconds": 600.0}},
    )
    rclpy.init()
    node = rclpy.create_node("vla_bench_client")
    rows = []
    try:
        time.sleep(3.0)
        for _ in range(a.episodes):
            cpu0 = {exe: cpu_seconds(p.popen.pid) for exe, p in procs.items()}
            r = call(node, StartEpisode, "/vla_collector/start_episode", StartEpisode.Request(instruction="bench"))
            t0, w0 = time.time_ns(), time.monotonic()
            time.sleep(a.seconds)
            t1 = time.time_ns()
            s = call(node, StopEpisode, "/vla_collector/stop_episode", StopEpisode.Request(outcome="success"))
            wall = time.monotonic() - w0
            cpu1 = {exe: cpu_seconds(p.popen.pid) for exe, p in procs.items()}
            rows.append({"episode": r.episode_id, "messages": s.messages, "t0": t0, "t1": t1, "wall_s": wall,
                         "cpu_percent": {exe: 100.0 * (cpu1[exe] - cpu0[exe]) / wall for exe in procs}})
    finally:
        node.destroy_node()
        rclpy.shutdown()
        g.stop_all()
    report = []
    for row in rows:
        ep = tmp / "data" / "episodes" / row["episode"]
        meta = json.loads((ep / "episode.json").read_text())
        rec = read_episode(ep)
        sent = published_between(tmp / "published.log", row["t0"], row["t1"])
        topics = {t: {"published": n, "recorded": sum(1 for s in rec.get(t, {}) if row["t0"] <= s <= row["t1"]), "drops_counted": meta["drops"].get(t, 0)} for t, n in sorted(sent.items())}
        report.append({"episode": row["episode"], "cpu_percent": row["cpu_percent"], "topics": topics})
        print(f"{row['episode']}: cpu {json.dumps({k: round(v) for k, v in row['cpu_percent'].items()})}")
        for t, v in topics.items():
            print(f"  {t:28s} published {v['published']:5d} recorded {v['recorded']:5d} drops counted {v['drops_counted']}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
