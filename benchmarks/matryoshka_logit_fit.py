"""One t and b for every Matryoshka prefix, or one pair each? What sharing costs a frozen encoder.

For each prefix size: the BiXSE optimum (t, b) of the frozen model's in-batch cells (logit_init's
logistic fit: every query against every document of its batch of `--batch` STS-B train pairs,
grade = score / 5 on the diagonal, 0 elsewhere), its mean BCE per query, and the mean BCE per
query at the whole embedding's optimum instead. The gap is what one shared (t, b) costs before any
training adapts the encoder to it. Prints one JSON line per prefix.

  python benchmarks/matryoshka_logit_fit.py --model MODEL_DIR --sts ../shared/data/stsbenchmark/sts-train.csv
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--sts", required=True)
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dims", default="32,64,128,256,384")
    parser.add_argument("--max-len", type=int, default=64)
    args = parser.parse_args()

    from bixse_jax import inference, matryoshka
    from bixse_jax.data import sources
    from bixse_jax.logit_init import bce_sum, fit_logistic
    from bixse_jax.models.sentence_model import load_encoder

    pairs = sources.read_sts(args.sts)[:args.pairs]
    model = load_encoder(args.model)
    q = inference.encode(model, [p.query for p in pairs], max_len=args.max_len)
    d = inference.encode(model, [p.document for p in pairs], max_len=args.max_len)
    grades = np.array([p.grade for p in pairs])
    n = len(pairs) // args.batch * args.batch

    def cells(dim: int) -> tuple[np.ndarray, np.ndarray]:
        qk, dk = matryoshka.truncate(q[:n], dim), matryoshka.truncate(d[:n], dim)
        scores, targets = [], []
        for start in range(0, n, args.batch):
            rows = slice(start, start + args.batch)
            scores.append(qk[rows] @ dk[rows].T)
            targets.append(np.diag(grades[rows]))
        return np.stack(scores), np.stack(targets)

    full = max(int(x) for x in args.dims.split(","))
    s_full, t_full = cells(full)
    a_full, b_full, _ = fit_logistic(s_full, t_full, init_scale=10.0, init_bias=-10.0)
    for dim in (int(x) for x in args.dims.split(",")):
        s, t = cells(dim)
        a, b, _ = fit_logistic(s, t, init_scale=10.0, init_bias=-10.0)
        off = s[:, ~np.eye(args.batch, dtype=bool)]
        print(json.dumps({"dim": dim, "t_own": round(math.log(a), 4), "b_own": round(b, 3),
                          "bce_per_query_own": round(bce_sum(a, b, s, t) / n, 4),
                          "bce_per_query_shared": round(bce_sum(a_full, b_full, s, t) / n, 4),
                          "t_shared": round(math.log(a_full), 4), "b_shared": round(b_full, 3),
                          "negative_cos_mean": round(float(off.mean()), 4), "negative_cos_std": round(float(off.std()), 4),
                          "positive_cos_mean": round(float(np.mean([np.diag(x).mean() for x in s])), 4),
                          "pairs": n, "batch": args.batch}), flush=True)


if __name__ == "__main__":
    main()
