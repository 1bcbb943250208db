"""A ROS 2 graph for the tests: the package's installed nodes started as its launch files start
them (scripts/launch_xml.py, which the ROS demo uses too), driven and observed by rclpy. Everything runs inside a private
network namespace with only loopback (scripts/netns_run.sh); outside one the session fails."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
# The package's install prefix (colcon's install/vla_finetune; VLA_ROS_PREFIX to test another).
PREFIX = Path(os.environ.get("VLA_ROS_PREFIX", REPO / "install" / "vla_finetune"))
SHARE = PREFIX / "share" / "vla_finetune"
LIBEXEC = PREFIX / "lib" / "vla_finetune"
TINY_MODEL = REPO / "tests" / "fixtures" / "vlm" / "tiny_a"
CLI = REPO / "target" / "debug" / "vla_finetune"


def pytest_configure(config):
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines() if line.strip()]
    if names != ["lo"]:
        pytest.exit(
            f"the ROS tests need a private network namespace with only loopback (found links {names}); "
            "run them through scripts/netns_run.sh, which uses `unshare -n` as root and `unshare -rn` "
            "(a user namespace) otherwise",
            returncode=2,
        )
    if os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE") != "LOCALHOST":
        pytest.exit("ROS_AUTOMATIC_DISCOVERY_RANGE must be LOCALHOST (scripts/netns_run.sh sets it)", returncode=2)
    for path in (LIBEXEC, SHARE):
        if not path.is_dir():
            pytest.exit(f"{path} is missing: build the workspace first (make ros)", returncode=2)


class Proc:
    """A started node: its process and its log."""

    def __init__(self, spec, popen, log):
        self.spec, self.popen, self.log = spec, popen, log

    def interrupt(self, timeout=10.0):
        """SIGINT, as `ros2 launch` sends on shutdown; the exit code (None if still running)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def output(self):
        return Path(self.log).read_text(errors="replace")


class Graph:
    """Starts the nodes of launch files; stops them all at the end of the test."""

    def __init__(self, tmp):
        self.tmp, self.procs = Path(tmp), []

    def launch(self, launch_file, args=None, extra_params=None, cwd=None):
        """Starts every node `ros2 launch vla_finetune <launch_file> k:=v ...` starts;
        `extra_params` = {executable: {param: value}} are the test's own, applied last."""
        import launch_xml

        specs = launch_xml.nodes(SHARE / "launch" / launch_file, args, {"vla_finetune": str(SHARE)})
        started = {}
        for spec in specs:
            argv = [str(LIBEXEC / spec.executable)] + spec.ros_args(self.tmp, (extra_params or {}).get(spec.executable))
            log = self.tmp / f"{spec.name}.log"
            env = {**os.environ, **spec.env}
            p = subprocess.Popen(argv, cwd=cwd or self.tmp, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
            started[spec.executable] = Proc(spec, p, log)
            self.procs.append(started[spec.executable])
        return started

    def stop_all(self):
        for p in self.procs:
            if p.interrupt(10.0) is None:
                p.popen.kill()
                p.popen.wait()


@pytest.fixture
def graph(tmp_path):
    g = Graph(tmp_path)
    yield g
    g.stop_all()


@pytest.fixture(scope="session")
def ros_node():
    import rclpy

    rclpy.init()
    node = rclpy.create_node("vla_test_client")
    yield node
    node.destroy_node()
    rclpy.shutdown()


def spin_until(node, predicate, timeout, what):
    """Spins `node` until `predicate()` is true; fails naming `what` after `timeout` seconds."""
    import rclpy

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        rclpy.spin_once(node, timeout_sec=0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def call(node, srv_type, name, request, timeout=30.0, resend_every=None):
    """Calls service `name` once it is available; returns the response. With `resend_every`
    (seconds; only for requests that change nothing, such as parameter queries) the request is
    sent again when no response came in that time: a request sent right after discovery, while
    a busy graph is still starting, can go unanswered (seen once in a whole ROS run on the
    2-core machine, ListParameters of the policy node, 30 s without a response; the same test
    alone and the next whole run passed)."""
    import rclpy

    client = node.create_client(srv_type, name)
    try:
        spin_until(node, client.service_is_ready, timeout, f"service {name}")
        deadline = time.monotonic() + timeout
        while True:
            future = client.call_async(request)
            wait = min(resend_every or timeout, max(deadline - time.monotonic(), 0.0))
            rclpy.spin_until_future_complete(node, future, timeout_sec=wait)
            if future.done() or time.monotonic() >= deadline:
                break
        assert future.done(), f"no response from {name} within {timeout} s"
        return future.result()
    finally:
        node.destroy_client(client)


class Collect:
    """Messages of one topic, in arrival order."""

    def __init__(self, node, msg_type, topic, qos=10):
        self.items = []
        self.sub = node.create_subscription(msg_type, topic, self.items.append, qos)


def compiled_dataset(tmp_path):
    """Three short simulated episodes recorded and compiled by the CLI (for the trainer node)."""
    rec = tmp_path / "recorded"
    for args in (
        ["record", "--sim", "--episodes", "3", "--seconds", "3", "--width", "112", "--height", "64", "--seed", "3", "--out", str(rec)],
        ["dataset", "compile", "--episodes", str(rec), "--out", str(tmp_path / "compiled")],
    ):
        out = subprocess.run([str(CLI)] + args, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    return tmp_path / "compiled"


def read_episode(ep_dir):
    """Per-topic messages (stamp -> value digest) decoded by rosbags from the episode."""
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    ts = get_typestore(Stores.ROS2_JAZZY)
    ts.register(get_types_from_msg("std_msgs/Header header\nfloat32[] values\nuint32 channels\nstring layout\n", "vla_finetune_msgs/msg/SensorFrame"))
    out = {}
    with Reader(ep_dir) as r:
        for conn, _, raw in r.messages():
            m = ts.deserialize_cdr(raw, conn.msgtype)
            stamp = m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec
            out.setdefault(conn.topic, {})[stamp] = digest(conn.msgtype, m)
    return out


def digest(msgtype, m):
    if msgtype.endswith("Image"):
        return hashlib.sha256(bytes(m.data)).hexdigest() + f"/{m.width}x{m.height}/{m.encoding}"
    if msgtype.endswith("SensorFrame"):
        return hashlib.sha256(m.values.tobytes()).hexdigest() + f"/{m.channels}/{m.layout}"
    p, q = m.pose.position, m.pose.orientation
    return repr((p.x, p.y, p.z, q.x, q.y, q.z, q.w))
