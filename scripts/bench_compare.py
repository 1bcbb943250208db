"""Side-by-side table of `vla_finetune bench --json` (ours) and scripts/reference_bench.py records.

Cases are matched on kind, cache mode, model, views, image size, batch, LoRA rank, checkpointing,
precision and device; ratios are ours / reference (throughput > 1 and memory < 1 favour ours).

    python scripts/bench_compare.py ours.json reference.json [--markdown]
"""

import argparse
import json
import sys

KEY = ("kind", "cache", "model", "views", "image_size", "batch", "lora_rank", "checkpointing", "precision", "device")


def key(r):
    return tuple(r.get(k) for k in KEY)


def mib(b):
    return "-" if b is None else f"{b / 2**20:.0f}"


def ratio(a, b):
    return "-" if a is None or b in (None, 0) else f"{a / b:.2f}"


def rows(ours, reference):
    by_key = {key(r): r for r in reference}
    out = []
    for o in ours:
        r = by_key.get(key(o))
        if r is None:
            print(f"no reference record for {o['kind']} {o['cache']}", file=sys.stderr)
            continue
        out.append([
            o["kind"], o["cache"] or "-", "on" if o["checkpointing"] else "off", o["precision"], o["unit"],
            f"{o['samples_per_s']:.3f}", f"{r['samples_per_s']:.3f}", ratio(o["samples_per_s"], r["samples_per_s"]),
            f"{o['step_ms']:.1f}", f"{r['step_ms']:.1f}",
            mib(o["peak_accel_bytes"]), mib(r["peak_accel_bytes"]), ratio(o["peak_accel_bytes"], r["peak_accel_bytes"]),
            mib(o["peak_host_bytes"]), mib(r["peak_host_bytes"]), ratio(o["peak_host_bytes"], r["peak_host_bytes"]),
        ])
    return out


HEADER = ["kind", "cache", "ckpt", "prec", "unit", "ours", "ref", "ratio", "ours_ms", "ref_ms",
          "ours_accel_MiB", "ref_accel_MiB", "accel_ratio", "ours_host_MiB", "ref_host_MiB", "host_ratio"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ours")
    ap.add_argument("reference")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table (for docs)")
    args = ap.parse_args()
    table = rows(json.load(open(args.ours)), json.load(open(args.reference)))
    if not table:
        sys.exit("no case appears in both files")
    if args.markdown:
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "---|" * len(HEADER))
        for r in table:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(HEADER, *table)]
        for r in [HEADER] + table:
            print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))


if __name__ == "__main__":
    main()
