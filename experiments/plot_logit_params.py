"""t, b, the loss and the labelled cells' calibration against the step: did t and b follow the encoder?

  python experiments/plot_logit_params.py WORKDIR [WORKDIR ...] --out curves.png [--json curves.json]

Reads each workdir's metrics.jsonl (written by `bixse-jax train`; `init/log_temperature` and
`init/bias` at step 0 when `loss.init_logit_params=auto` fitted them) and draws one line per run in
four panels; the fourth is the labelled cells' mean probability (solid) against their mean target
(dashed), the step's `labelled_prob` and `labelled_target` (bixse_jax/cell_stats.py). --json also writes the numbers: per run, its first and last t and b and the largest
change of each over the last quarter of its steps (a settled parameter changes little there).
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

KEYS = ("log_temperature", "bias", "loss", "labelled_prob", "labelled_target")
PANELS = ("log_temperature", "bias", "loss", "labelled_prob")


def curves(workdir: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} of KEYS; a fitted initialisation is t, b at step 0."""
    out: dict[str, list[tuple[int, float]]] = {k: [] for k in KEYS}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in KEYS:
            for name in (key, f"init/{key}"):
                if name in record:
                    out[key].append((record["step"], float(record[name])))
    return {k: sorted(v) for k, v in out.items()}


def summary(points: list[tuple[int, float]]) -> dict[str, Any]:
    """First and last value, and the largest change over the last quarter of the steps."""
    last_step = points[-1][0]
    tail = [v for s, v in points if s >= last_step * 3 / 4]
    return {"first": points[0][1], "last": points[-1][1], "last_quarter_range": max(tail) - min(tail)}


def plot(runs: dict[str, dict[str, list[tuple[int, float]]]], path: str | pathlib.Path) -> pathlib.Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, key in zip(axes, PANELS):
        for name, run in runs.items():
            if run[key]:
                steps, values = zip(*run[key])
                line, = ax.plot(steps, values, marker=".", label=name)
                if key == "labelled_prob" and run["labelled_target"]:
                    ax.plot(*zip(*run["labelled_target"]), linestyle="--", color=line.get_color())
        ax.set(xlabel="step", title={"log_temperature": "t (log scale of the cosines)", "bias": "b",
                                     "loss": "training loss",
                                     "labelled_prob": "labelled cells: mean p (-), target (--)"}[key])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--out", required=True, help="PNG")
    parser.add_argument("--json", default=None, help="also write the per-run summary here")
    args = parser.parse_args(argv)
    runs = {pathlib.Path(w).name: curves(w) for w in args.workdirs}
    result = {name: {k: summary(v) for k, v in run.items() if v} for name, run in runs.items()}
    plot(runs, args.out)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
