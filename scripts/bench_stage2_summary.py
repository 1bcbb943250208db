#!/usr/bin/env python3
"""Summarizes scripts/bench_stage2.sh runs: per run (OUT/<mode>-<dtype>), from the progress
JSON-lines log the samples/s (samples over step time, all steps of the phase) and the median
step time (data + compute) and its data and compute parts, of the optimizer steps of each phase
(`training`: live or cached epochs, `refreshing_cache`: features-mode refresh epochs), the
largest reported peak host memory, and the wall time from `/usr/bin/time -v`. Prints a Markdown
table. Usage: bench_stage2_summary.py OUT
"""
import json
import re
import sys
from pathlib import Path


def main():
    out = Path(sys.argv[1])
    print("| mode | dtype | phase | steps | samples/s | median step s | median data s | median compute s | peak host MiB | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in ["off", "vision", "features"]:
        for dtype in ["f32", "bf16"]:
            run = out / f"{mode}-{dtype}"
            events = [json.loads(l) for l in (run / "progress.jsonl").read_text().splitlines() if l.strip()]
            peak = max((e["peak_host_mem_bytes"] or 0) for e in events) / 2**20
            wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", (out / f"{mode}-{dtype}.time").read_text())
            parts = [float(x) for x in wall.group(1).split(":")] if wall else []
            secs = sum(v * 60 ** i for i, v in enumerate(reversed(parts))) if parts else float("nan")
            for phase in ["training", "refreshing_cache"]:
                steps = [e for e in events if e["phase"] == phase and e["loss"] is not None and e["samples_per_s"]]
                if not steps:
                    continue
                times = [e["data_time_s"] + e["compute_time_s"] for e in steps]
                samples = sum(e["samples_per_s"] * t for e, t in zip(steps, times))
                sps = samples / sum(times)
                med = lambda v: sorted(v)[len(v) // 2]
                st, dt, ct = med(times), med([e["data_time_s"] for e in steps]), med([e["compute_time_s"] for e in steps])
                print(f"| {mode} | {dtype} | {phase} | {len(steps)} | {sps:.2f} | {st:.3f} | {dt:.4f} | {ct:.3f} | {peak:.0f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
