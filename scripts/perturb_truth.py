"""A simulator truth log (sim_truth.jsonl) with noise on the target's x and y, for the oracle:
how precisely must a VL feature place the target for the heads to reach a given error?

    python scripts/perturb_truth.py IN OUT R2 SEED

Each episode's target x and y get Gaussian noise of std sqrt(1 - R2) times that coordinate's std
over the log's episodes, drawn once per episode (a target estimate of coefficient of
determination R2), so `vla_finetune train-heads --oracle-truth OUT` trains the oracle on an
imprecise target. Prints the noise per coordinate."""

import json
import random
import statistics
import sys


def main(src, dst, r2, seed):
    if not 0.0 < r2 <= 1.0:
        sys.exit(f"R2 must be in (0, 1], got {r2}")
    rows = [json.loads(line) for line in open(src) if line.strip()]
    if len(rows) < 2:
        sys.exit(f"{src}: {len(rows)} episodes; at least 2 are needed for a spread")
    rng = random.Random(seed)
    for d, name in ((0, "x"), (1, "y")):
        sd = statistics.pstdev(r["target_mm"][d] for r in rows)
        sigma = sd * (1.0 - r2) ** 0.5
        print(f"target {name}: std {sd:.2f} mm over {len(rows)} episodes, noise std {sigma:.2f} mm", file=sys.stderr)
        for r in rows:
            r["target_mm"][d] += rng.gauss(0.0, sigma)
    with open(dst, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
