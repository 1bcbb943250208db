"""`make demo`: the whole loop through ROS 2 on the embedded default (ROS 2 Jazzy from the venv,
the simulated robot, the tiny random Qwen2.5-VL of the test fixtures), as a user drives it.

The simulated robot, collector, trainer and policy nodes start as `ros2 launch` starts them
(collect_and_train.launch.xml, policy.launch.xml: same executables, parameter files and
arguments, read by scripts/launch_xml.py). Through their services and topics only:
1. the policy node is enabled (~/enable) and waits for a checkpoint;
2. episodes are recorded with StartEpisode / StopEpisode;
3. one StartFineTune on the episodes root runs the job: the episodes are compiled, stage 1
   trains the policy heads, Stage 2 fine-tunes LoRA + heads from it (cache mode `features` with
   a refresh epoch); ~/progress is drawn as a progress bar;
4. each checkpoint announced on ~/checkpoint is hot-swapped by the policy node, which reports
   the active version on ~/status and acts on ~/action_chunk;
5. the nodes are stopped with SIGINT and `<out>/report.json` is written: the keys of
   `vla_finetune demo`'s report (numbers from this run: the job's summary from ~/get_job, the
   compiled dataset's report, the policy's status messages) and `ros`, what happened on the
   graph.
It must run inside a private network namespace with only loopback (scripts/netns_run.sh).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import launch_xml  # noqa: E402

PREFIX = Path(os.environ.get("VLA_ROS_PREFIX", REPO / "install" / "vla_finetune"))
SHARE, LIBEXEC = PREFIX / "share" / "vla_finetune", PREFIX / "lib" / "vla_finetune"
TINY_MODEL = REPO / "tests" / "fixtures" / "vlm" / "tiny_a"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "out" / "demo")
    p.add_argument("--episodes", type=int, default=6)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--epochs", type=int, default=30, help="stage 1 epochs")
    p.add_argument("--stage2-epochs", type=int, default=4)
    p.add_argument("--refresh-every", type=int, default=2, help="Stage 2 cache refresh interval, epochs")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="a reduced run (3 short episodes, fewer epochs) for tests")
    a = p.parse_args()
    if a.quick:
        a.episodes, a.seconds, a.epochs, a.stage2_epochs = 3, 3.0, 6, 3
    return a


def require_private_network():
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines() if line.strip()]
    if names != ["lo"] or os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE") != "LOCALHOST":
        sys.exit(f"ros_demo.py: run it through scripts/netns_run.sh (a network namespace with only loopback and localhost discovery); found links {names}")
    for path in (SHARE, LIBEXEC):
        if not path.is_dir():
            sys.exit(f"ros_demo.py: {path} is missing: build the workspace first (make ros)")


class Nodes:
    """The nodes of launch files, started as `ros2 launch` starts them; logs under `out`."""

    def __init__(self, out):
        self.out, self.procs = out, {}

    def launch(self, launch_file, args, extra_params):
        for spec in launch_xml.nodes(SHARE / "launch" / launch_file, args, {"vla_finetune": str(SHARE)}):
            argv = [str(LIBEXEC / spec.executable)] + spec.ros_args(self.out / "params", extra_params.get(spec.executable))
            log = open(self.out / "logs" / f"{spec.name}.log", "w")
            self.procs[spec.name] = subprocess.Popen(argv, cwd=self.out, env={**os.environ, **spec.env}, stdout=log, stderr=subprocess.STDOUT)

    def check_alive(self):
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"node {name} exited with {p.returncode}; see {self.out / 'logs' / (name + '.log')}")

    def stop(self):
        """SIGINT to every node (as launch does on shutdown); their exit codes."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        codes = {}
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = p.wait()
        return codes


class Bar:
    """TrainingProgress as a one-line progress bar on stderr."""

    def __init__(self):
        self.last = None

    def show(self, m):
        frac = m.step / m.total_steps if m.total_steps else 0.0
        filled = int(30 * min(frac, 1.0))
        loss = f"loss {m.loss:.4f}" if m.loss == m.loss else ""
        eta = f"eta {m.eta_s:.0f}s" if m.eta_s == m.eta_s and m.eta_s > 0 else ""
        head = f"stage {m.stage}" if m.stage else "data"
        line = f"\r{head} {m.phase:<16} [{'#' * filled}{'.' * (30 - filled)}] step {m.step}/{m.total_steps} epoch {m.epoch + 1}/{max(m.total_epochs, 1)} {loss} {eta}"
        sys.stderr.write(line[:160].ljust(160))
        if self.last is not None and (m.stage, m.phase) != self.last and m.phase in ("compiling", "done", "failed", "cancelled") and m.message:
            sys.stderr.write(f"\n  {m.message[:300]}\n")
        sys.stderr.flush()
        self.last = (m.stage, m.phase)


def run_oracle(dataset, truth_log, work, a):
    """The oracle floor with the trainer's stage-1 settings (`vla_finetune train-heads --oracle-truth`)."""
    cmd = [str(LIBEXEC / "vla_finetune"), "train-heads", "--oracle-truth", str(truth_log), "--dataset", str(dataset), "--size", "small",
           "--epochs", str(a.epochs), "--seed", str(a.seed), "--work-dir", str(work)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TORCH_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"the oracle failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def per_dim(errors):
    """Per action dimension: name, unit and each model's error (physical units)."""
    dims = errors["stage1"][1]
    return [{"name": d["name"], "unit": d["unit"], **{m: e[1][k]["error"] for m, e in errors.items()}} for k, d in enumerate(dims)]


def verdict(errors, stage1_vl_swapped, vl_use_threshold=0.05):
    """vla_finetune::train::comparison's verdict: the gain verdict, then whether stage 1's heads read
    their VL features (their error with another sample's, `stage1_vl_swapped`, when measured)."""
    if stage1_vl_swapped is None:
        return gain_verdict(errors)
    change = stage1_vl_swapped / errors["stage1"][0] - 1.0
    reads = "barely read" if abs(change) < vl_use_threshold else "read"
    return (f"{gain_verdict(errors)}; stage 1's heads {reads} their VL features "
            f"(another sample's give {stage1_vl_swapped:.3f} stds, {100 * change:+.1f} %)")


def gain_verdict(errors, threshold=0.2):
    """The rule of vla_finetune::train::comparison: a gain of 20 %, or stage 1 within 20 % of the floor
    (or below the oracle, which then is no floor)."""
    s1, s2, floor = errors["stage1"][0], errors["stage2"][0], errors["oracle"][0]
    gain = 1.0 - s2 / s1
    if gain >= threshold:
        return f"Stage 2 lowered the validation action error by {100 * gain:.1f} % versus stage 1 ({s1:.3f} -> {s2:.3f} stds; oracle floor {floor:.3f})"
    if s1 < floor:
        return (f"stage 1 is below the oracle \"floor\" ({s1:.3f} vs {floor:.3f} stds, {100 * (1 - s1 / floor):.1f} % under it): "
                f"with this few samples the oracle's heads reached no floor, so this run cannot tell how much Stage 2 could gain "
                f"(it changed the error by {-100 * gain:.1f} %)")
    if s1 <= (1.0 + threshold) * floor:
        return (f"stage 1 is already within {100 * (s1 / floor - 1):.1f} % of the oracle floor ({s1:.3f} vs {floor:.3f} stds): "
                f"little is left for Stage 2 to gain (it changed the error by {-100 * gain:.1f} %)")
    return (f"Stage 2 lowered the validation action error by only {100 * gain:.1f} % versus stage 1 ({s1:.3f} -> {s2:.3f} stds) "
            f"although stage 1 is {100 * (s1 / floor - 1):.1f} % above the oracle floor ({floor:.3f})")


def main():
    a = parse_args()
    require_private_network()
    import rclpy
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from std_srvs.srv import SetBool

    from vla_finetune_msgs.msg import ActionChunk, CheckpointInfo, PolicyStatus, TrainingProgress
    from vla_finetune_msgs.srv import GetFineTuneJob, StartEpisode, StartFineTune, StopEpisode

    t0 = time.monotonic()
    out = a.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    for sub in ("logs", "params"):
        (out / sub).mkdir(parents=True)
    base = out / "base_model"
    shutil.copytree(TINY_MODEL, base)
    truth_log = out / "sim_truth.jsonl"
    compile_yaml = out / "compile.yaml"
    compile_yaml.write_text(
        f"align:\n  sensor_window_s: 0.1\n  sensor_samples: 65\nsplit:\n  val_fraction: 0.25\n  seed: {a.seed}\n"
    )
    nodes = Nodes(out)
    nodes.launch(
        "collect_and_train.launch.xml",
        {"use_sim": "true", "base_model": str(base), "dataset_root": str(out / "recordings")},
        {
            # A simulated episode lasts a little longer than a recording, which starts with it (its
            # scene's instruction read from the truth log), so a recording holds one scene.
            "sim_robot_node": {"image_width": 112, "image_height": 84, "seed": a.seed, "episode_seconds": a.seconds + 2.0, "truth_log": str(truth_log)},
            "trainer_node": {"runs_root": str(out / "runs"), "checkpoints_root": str(out / "checkpoints"), "compile_config": str(compile_yaml)},
        },
    )
    nodes.launch("policy.launch.xml", {"base_model": str(base)}, {})

    rclpy.init()
    node = rclpy.create_node("vla_demo")
    graph = {"services": {}, "progress_messages": 0, "progress_by_phase": {}, "checkpoints_announced": []}
    progress, announced, statuses, chunks = [], [], [], [0]
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    bar = Bar()

    def on_progress(m):
        progress.append(m)
        graph["progress_by_phase"][m.phase] = graph["progress_by_phase"].get(m.phase, 0) + 1
        bar.show(m)

    node.create_subscription(TrainingProgress, "/vla_trainer/progress", on_progress, 1000)
    node.create_subscription(CheckpointInfo, "/vla_trainer/checkpoint", lambda m: announced.append((time.monotonic(), m)), latched)
    node.create_subscription(PolicyStatus, "/vla_policy/status", lambda m: statuses.append((time.monotonic(), m)), 100)
    node.create_subscription(ActionChunk, "/vla_policy/action_chunk", lambda m: chunks.__setitem__(0, chunks[0] + 1), 100)

    def spin_until(pred, timeout, what):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return
            rclpy.spin_once(node, timeout_sec=0.05)
            nodes.check_alive()
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")

    def call(srv_type, name, request, timeout=60.0):
        client = node.create_client(srv_type, name)
        spin_until(client.service_is_ready, timeout, f"service {name}")
        future = client.call_async(request)
        spin_until(future.done, timeout, f"the answer of {name}")
        node.destroy_client(client)
        resp = future.result()
        graph["services"].setdefault(name, []).append({k: getattr(resp, k) for k in resp.get_fields_and_field_types() if isinstance(getattr(resp, k), (bool, str, int))})
        return resp

    try:
        eprint = lambda *x: print(*x, file=sys.stderr, flush=True)  # noqa: E731
        eprint(f"[1/4] nodes started (logs in {out / 'logs'})")
        eprint(f"[2/4] recording {a.episodes} episodes of {a.seconds} s through the collector")
        def truths():
            return [json.loads(line) for line in truth_log.read_text().splitlines()] if truth_log.exists() else []

        for i in range(a.episodes):
            # Start with the next simulated episode (the node logs its truth as it starts).
            n0 = len(truths())
            spin_until(lambda: len(truths()) > n0, 2 * a.seconds + 30, "the next simulated episode")
            scene = truths()[-1]
            r = call(StartEpisode, "/vla_collector/start_episode", StartEpisode.Request(instruction=scene["instruction"], task="needle_insertion", operator_name="demo"))
            if not r.started:
                raise RuntimeError(f"start_episode: {r.reason}")
            # Stop before the simulator's scene ends (its span is in the truth log), so that the
            # recording holds that one scene even when starting it took a while.
            left = (scene["end_ns"] - time.time_ns()) / 1e9 - 0.3
            if left < 1.0:
                raise RuntimeError(f"start_episode answered {left + 0.3:.1f} s before simulated episode {scene['index']} ends: too late to record it")
            end = time.monotonic() + min(a.seconds, left)
            while time.monotonic() < end:
                rclpy.spin_once(node, timeout_sec=0.05)
            s = call(StopEpisode, "/vla_collector/stop_episode", StopEpisode.Request(outcome="success"))
            if not s.stopped:
                raise RuntimeError(f"stop_episode: {s.reason}")
            eprint(f"  {s.episode_id}: {s.messages} messages")
        eprint("[3/4] one StartFineTune on the episodes root: compile, stage 1, Stage 2 from it")
        overrides = {
            "stage1.epochs": a.epochs,
            "stage1.seed": a.seed,
            "stage1.keep_versions": 100,
            "run.epochs": a.stage2_epochs,
            "run.seed": a.seed,
            "model.compute_dtype": "f32",
            "memory.accum_steps": 2,
            "optim.lr_vl_lora": 1.0e-3,
            "optim.lr_heads": 3.0e-4,
            "optim.lr_sensor_encoder": 3.0e-4,
            "cache.mode": "features",
            "cache.rebuild_interval_epochs": a.refresh_every,
            "checkpoint.keep_versions": 20,
        }
        start = call(StartFineTune, "/vla_trainer/start_finetune", StartFineTune.Request(dataset=str(out / "recordings"), overrides=json.dumps(overrides)))
        if not start.accepted:
            raise RuntimeError(f"start_finetune: {start.reason}")
        # The policy node serves ~/enable once it runs a checkpoint: enabled as soon as it does.
        enable = node.create_client(SetBool, "/vla_policy/enable")
        enabling = []

        def job_ended():
            if not enabling and enable.service_is_ready():
                enabling.append(enable.call_async(SetBool.Request(data=True)))
            return any(m.job_id == start.job_id and m.phase in ("done", "failed", "cancelled") for m in progress)

        spin_until(job_ended, 3600, "the fine-tuning job")
        sys.stderr.write("\n")
        job = call(GetFineTuneJob, "/vla_trainer/get_job", GetFineTuneJob.Request(job_id=start.job_id))
        if job.state != "done":
            raise RuntimeError(f"job {start.job_id} ended {job.state}: {job.summary}")
        summary = json.loads(job.summary)
        spin_until(lambda: [m.version for _, m in announced if m.job_id == start.job_id] and statuses, 30, "the announcements")
        mine = [(t, m) for t, m in announced if m.job_id == start.job_id]
        last = mine[-1][1].version
        if not enabling:
            spin_until(enable.service_is_ready, 120, "the policy node's ~/enable")
            enabling.append(enable.call_async(SetBool.Request(data=True)))
        spin_until(enabling[0].done, 30, "the answer of /vla_policy/enable")
        graph["services"]["/vla_policy/enable"] = [{"success": enabling[0].result().success, "message": enabling[0].result().message}]
        eprint(f"[4/4] the policy node hot-swaps the announced checkpoints; waiting for {last}")
        spin_until(lambda: any(s.active_version == last and s.acting for _, s in statuses), 300, f"the policy acting with {last}")
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            rclpy.spin_once(node, timeout_sec=0.05)
    finally:
        codes = nodes.stop()
        node.destroy_node()
        rclpy.shutdown()

    latency = {}
    for t, m in mine:
        active = next((ts for ts, s in statuses if ts >= t and s.active_version == m.version), None)
        latency[m.version] = None if active is None else round((active - t) * 1000.0, 1)
    final = statuses[-1][1]
    status_file = out / "policy_status.json"
    status_file.write_text(json.dumps([{"t": round(t - t0, 3), "active_version": s.active_version, "acting": s.acting, "ticks": s.ticks, "missed_ticks": s.missed_ticks, "last_tick_ms": s.last_tick_ms, "message": s.message} for t, s in statuses], indent=1))
    dataset = Path(job.dataset)
    compiled = json.loads((dataset / "report.json").read_text())
    s1, s2 = summary["stage1"], summary["stage2"]
    print("oracle: the stage-1 heads conditioned on the simulator's ground truth instead of VL features", file=sys.stderr, flush=True)
    oracle = run_oracle(dataset, truth_log, out / "oracle", a)
    errors = {
        "untrained": (s1["val_action_error_before"], s1["val_action_error_before_per_dim"]),
        "stage1": (s2["val_action_error_before"], s2["val_action_error_before_per_dim"]),
        "stage2": (s2["val_action_error_after"], s2["val_action_error_per_dim"]),
        "oracle": (oracle["val_action_error"], oracle["val_action_error_per_dim"]),
    }
    tick_ms = [s.last_tick_ms for _, s in statuses if s.acting]
    graph.update(
        progress_messages=len([m for m in progress if m.job_id == start.job_id]),
        checkpoints_announced=[m.version for _, m in mine],
        policy_active_version=final.active_version,
        job_id=start.job_id,
        exit_codes=codes,
    )
    report = {
        "episodes": len(compiled["episodes"]),
        "samples_train": s1["samples"][0],
        "samples_val": s1["samples"][1],
        "drops": compiled["drops"],
        "val_action_error_unit": "training-set std (mean over the varying action dimensions)",
        "untrained_val_action_error": s1["val_action_error_before"],
        "stage1_job_val_action_error": s1["val_action_error_after"],
        "stage1_val_action_error": s2["val_action_error_before"],
        "stage2_val_action_error": s2["val_action_error_after"],
        "oracle_val_action_error": oracle["val_action_error"],
        "stage1_vl_swapped_val_action_error": s1["val_action_error_conditioning_swapped"],
        "val_action_error_per_dim": per_dim(errors),
        "stage2_val_action_error_per_dim": s2["val_action_error_per_dim"],
        "stage2_best_val_action_error": s2["best"],
        "stage2_gain_over_stage1": 1.0 - s2["val_action_error_after"] / s2["val_action_error_before"],
        "stage1_over_oracle": s2["val_action_error_before"] / oracle["val_action_error"],
        "verdict": verdict(errors, s1["val_action_error_conditioning_swapped"]),
        "stage1_train_loss_per_epoch": s1["train_loss_per_epoch"],
        "oracle_train_loss_per_epoch": oracle["train_loss_per_epoch"],
        "stage2_validation_per_epoch": s2["validation"],
        "lora_params_changed": s2["lora_params_changed"],
        "cache_refreshes": s2["cache_refreshes"],
        "published_versions": s1["versions"] + s2["versions"],
        "active_version": final.active_version,
        "hotswap_latency_ms": latency.get(final.active_version),
        "missed_ticks": final.missed_ticks,
        "policy_ticks": final.ticks,
        "policy_actions": chunks[0],
        "policy_control_latency_ms": {"mean": sum(tick_ms) / len(tick_ms), "max": max(tick_ms)} if tick_ms else None,
        "checkpoints": str(out / "checkpoints"),
        "adapter": str(out / "checkpoints" / final.active_version / "adapter"),
        "plot": str(out / "runs" / start.job_id / "stage2" / "curves.png"),
        "dataset": str(dataset),
        "base_model": str(base),
        "policy_status": str(status_file),
        "wall_s": time.monotonic() - t0,
        "ros": graph,
    }
    text = json.dumps(report, indent=2)
    (out / "report.json").write_text(text)
    print(text)
    print(
        f"\nepisodes {report['episodes']} (samples train {report['samples_train']} / val {report['samples_val']}), validation action error "
        f"(mean abs error in training-set stds): untrained {report['untrained_val_action_error']:.3f}, stage 1 {report['stage1_val_action_error']:.3f}, "
        f"Stage 2 {report['stage2_val_action_error']:.3f}, oracle floor {report['oracle_val_action_error']:.3f}\n{report['verdict']}\n"
        f"policy node: active {report['active_version']} "
        f"{report['hotswap_latency_ms']} ms after its announcement, {report['missed_ticks']} missed ticks of {report['policy_ticks']}; "
        f"announced {graph['checkpoints_announced']}; node exit codes {codes}\nreport {out / 'report.json'}"
    )
    if any(c != 0 for c in codes.values()):
        sys.exit(f"a node did not exit cleanly: {codes}")


if __name__ == "__main__":
    main()
