"""results.jsonl of experiments/reproduce.py -> the table and plot of docs/results.md.

  python experiments/make_results.py RESULTS.jsonl [MORE.jsonl ...] [--md docs/results.md] [--png docs/results.png]

Per data set and loss: the score of each seed (TREC-DL: the mean over its 5 held-out folds, only
when all 5 finished), then the mean and sample standard deviation over seeds; the same for the
ECE of the run's relevance probabilities where its evaluator recorded one (STS-B, TREC-DL), and
the final t and b. The markdown replaces what lies between `<!-- NAME -->` and `<!-- /NAME -->` in
--md (--marker NAME, default results-table), so one file can hold several sweeps' tables.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from reproduce import DATASETS, SELECTION_VARIANTS, VARIANTS, ZERO_SHOT  # noqa: E402

COLUMNS = {"trecdl": "TREC-DL 2019 nDCG@10 (5-fold, judged-pool re-rank)", "stsb": "STS-B test Spearman",
           "scifact": "SciFact test nDCG@10"}
ROWS = (ZERO_SHOT, *VARIANTS)
CALIBRATED = ("stsb", "trecdl")  # graded judged pairs: their evaluators record the ECE at the run's t, b


def read_results(path: str | pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def table(results: list[dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """dataset -> variant -> {mean, std, n, per_seed, wall_s} over the finished test runs."""
    by_seed: dict[tuple[str, str, int], dict[int | None, dict]] = {}
    wall: dict[tuple[str, str], float] = {}
    for r in results:
        if r.get("phase") != "test" or "value" not in r:
            continue
        by_seed.setdefault((r["dataset"], r["variant"], r["seed"]), {})[r.get("fold")] = r
        wall[r["dataset"], r["variant"]] = wall.get((r["dataset"], r["variant"]), 0.0) + r["wall_s"]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (dataset, variant, seed), folds in sorted(by_seed.items()):
        expected = DATASETS[dataset].folds or 1
        if len(folds) < expected:  # a seed with missing folds is not comparable; leave it out
            continue
        entry = out.setdefault(dataset, {}).setdefault(variant, {"per_seed": {}, "ece_per_seed": {}, "t": [], "b": [],
                                                                 "wall_s": wall[dataset, variant]})
        runs = list(folds.values())
        entry["per_seed"][seed] = statistics.fmean(r["value"] for r in runs)
        if all("ece" in r.get("metrics", {}) for r in runs):
            entry["ece_per_seed"][seed] = statistics.fmean(r["metrics"]["ece"] for r in runs)
        entry["t"] += [r["log_temperature"] for r in runs if "log_temperature" in r]
        entry["b"] += [r["bias"] for r in runs if "bias" in r]
    for variants in out.values():
        for entry in variants.values():
            entry.update(_spread(list(entry["per_seed"].values())))
            if entry["ece_per_seed"]:
                entry["ece"] = _spread(list(entry["ece_per_seed"].values()))
    return out


def _spread(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _cell(e: dict[str, Any], bold: bool = False, plain: bool = False) -> str:
    """mean ± std over seeds; (n=K) when not 3 seeds; plain: the value alone (zero-shot)."""
    if plain:
        text = f"{e['mean']:.4f}"
    elif e["n"] == 1:  # one seed: no spread to show
        text = f"{e['mean']:.4f} (n=1)"
    else:
        text = f"{e['mean']:.4f} ± {e['std']:.4f}" + ("" if e["n"] == 3 else f" (n={e['n']})")
    return f"**{text}**" if bold else text


def markdown(results: list[dict]) -> str:
    """Rows: zero-shot then the losses; columns: data sets, then the ECE of those with graded judged
    pairs; mean ± std over seeds, the best score in bold ("not run": no finished run; "not recorded":
    runs from before the evaluators recorded calibration)."""
    t = table(results)
    datasets = [d for d in COLUMNS if d in t]
    calibrated = [d for d in CALIBRATED if d in t]
    best = {d: max((e["mean"] for v, e in t[d].items() if v != ZERO_SHOT), default=None) for d in datasets}
    lines = ["| loss | " + " | ".join([COLUMNS[d] for d in datasets] + [f"{COLUMNS[d].split(' ')[0]} ECE"
                                                                          for d in calibrated]) + " |",
             "|---|" + "---:|" * (len(datasets) + len(calibrated))]
    for variant in ROWS:
        cells = []
        for d in datasets:
            e = t[d].get(variant)
            cells.append("not run" if e is None else
                         _cell(e, bold=variant != ZERO_SHOT and e["mean"] == best[d], plain=variant == ZERO_SHOT))
        for d in calibrated:
            e = t[d].get(variant)
            cells.append("not run" if e is None else "not recorded" if "ece" not in e else
                         _cell(e["ece"], plain=variant == ZERO_SHOT))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def logit_params_markdown(results: list[dict]) -> str:
    """Final t and b of each loss and data set: the mean over its runs (seeds, folds) and the range."""
    t = table(results)
    datasets = [d for d in COLUMNS if d in t]
    lines = ["| loss | " + " | ".join(f"{COLUMNS[d].split(' ')[0]} t | {COLUMNS[d].split(' ')[0]} b"
                                      for d in datasets) + " |",
             "|---|" + "---:|---:|" * len(datasets)]
    for variant in ROWS:
        if variant == ZERO_SHOT or not any(variant in t[d] for d in datasets):
            continue
        cells = []
        for d in datasets:
            for key in ("t", "b"):
                v = t[d].get(variant, {}).get(key)
                cells.append(f"{statistics.fmean(v):.2f} ({min(v):.2f} to {max(v):.2f})" if v else "n/a")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def selection_markdown(results: list[dict]) -> str:
    """The learning-rate selection: dev score of each candidate rate and loss, and their mean (a
    nested selection, one block per outer fold; its chosen rate per loss is the best in its column)."""
    rows = [r for r in results if r.get("phase") == "select" and "value" in r]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)] or list(SELECTION_VARIANTS)
    lines = ["| data set (dev metric) | learning rate | " + " | ".join(variants) + " | mean |",
             "|---|---:|" + "---:|" * (len(variants) + 1)]
    for d in COLUMNS:
        for outer in sorted({r.get("outer_fold") for r in rows if r["dataset"] == d}, key=lambda k: -1 if k is None else k):
            mine = [r for r in rows if r["dataset"] == d and r.get("outer_fold") == outer]
            name = f"{d} ({DATASETS[d].metric})" + ("" if outer is None else f", outer fold {outer}")
            for lr in sorted({r["learning_rate"] for r in mine}):
                scores = {r["variant"]: r["value"] for r in mine if r["learning_rate"] == lr}
                cells = [f"{scores[v]:.4f}" if v in scores else "n/a" for v in variants]
                lines.append(f"| {name} | {lr:g} | " + " | ".join(cells) + f" | {statistics.fmean(scores.values()):.4f} |")
    return "\n".join(lines) + "\n"


def folds_markdown(results: list[dict], dataset: str = "trecdl") -> str:
    """Per-fold scores of a cross-validated data set: one row per loss and seed."""
    rows = [r for r in results if r.get("phase") == "test" and r["dataset"] == dataset and "value" in r]
    folds = range(DATASETS[dataset].folds)
    lines = ["| loss | seed | " + " | ".join(f"fold {k}" for k in folds) + " | mean |",
             "|---|---:|" + "---:|" * (len(folds) + 1)]
    for variant in ROWS:
        for seed in sorted({r["seed"] for r in rows if r["variant"] == variant}):
            got = {r["fold"]: r["value"] for r in rows if r["variant"] == variant and r["seed"] == seed}
            mean = f"{statistics.fmean(got.values()):.4f}" if len(got) == len(folds) else "incomplete"
            lines.append(f"| {variant} | {seed} | " + " | ".join(f"{got[k]:.4f}" if k in got else "not run"
                                                              for k in folds) + f" | {mean} |")
    return "\n".join(lines) + "\n"


def runs_markdown(results: list[dict]) -> str:
    """How many runs each device finished, and their summed wall time (runs overlap across workers)."""
    by_device: dict[str, list[float]] = {}
    for r in results:
        if "value" in r:
            by_device.setdefault(r.get("device", "unknown"), []).append(r["wall_s"])
    lines = ["| device | finished runs | summed run wall time (s) |", "|---|---:|---:|"]
    lines += [f"| {d} | {len(w)} | {sum(w):.0f} |" for d, w in sorted(by_device.items())]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: str | pathlib.Path) -> pathlib.Path:
    """One panel per data set: a bar per loss (mean, std as error bar), zero-shot as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table(results)
    datasets = [d for d in COLUMNS if d in t]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4.5), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        names = [v for v in VARIANTS if v in t[d]]
        means = [t[d][v]["mean"] for v in names]
        ax.bar(range(len(names)), means, yerr=[t[d][v]["std"] for v in names], capsize=3,
               color=["tab:blue" if v.startswith("BiXSE") else "tab:gray" for v in names])
        if ZERO_SHOT in t[d]:
            ax.axhline(t[d][ZERO_SHOT]["mean"], color="black", linestyle="--", linewidth=1, label="zero-shot")
            ax.legend(loc="lower right")
        values = means + ([t[d][ZERO_SHOT]["mean"]] if ZERO_SHOT in t[d] else [])
        low, high = min(values), max(values)
        ax.set_ylim(low - 0.1 * (high - low + 0.01) - 0.01, high + 0.15 * (high - low + 0.01) + 0.01)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
        seeds = sorted({t[d][v]["n"] for v in names})
        ax.set_title(f"{COLUMNS[d]}\n(seeds per bar: {', '.join(map(str, seeds))})", fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def replace_between_markers(text: str, block: str, marker: str = "results-table") -> str:
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if start not in text or end not in text:
        raise ValueError(f"markers {start} ... {end} not found")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block}{end}{tail}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.jsonl files (several sweeps are merged)")
    parser.add_argument("--md", default=None, help="markdown file whose marked table is replaced")
    parser.add_argument("--png", default=None)
    parser.add_argument("--marker", default="results-table", help="the table goes between <!-- NAME --> and <!-- /NAME -->")
    args = parser.parse_args(argv)
    results = [r for path in args.results for r in read_results(path)]
    finished = [r for r in results if "value" in r]
    parts = [markdown(results), "t and b at the end of training (mean over seeds and folds, and range):\n",
             logit_params_markdown(results)]
    if any(r.get("phase") == "select" for r in finished):  # a sweep given its rates (--chosen) has none
        parts += ["Learning-rate selection (seed 0, dev data only):\n", selection_markdown(results)]
    if any(r.get("phase") == "test" and r["dataset"] == "trecdl" for r in finished):
        parts += ["TREC-DL 2019 per held-out fold (nDCG@10):\n", folds_markdown(results)]
    block = "\n".join(parts + ["Runs behind these numbers:\n", runs_markdown(results)])
    print(block)
    if args.md:
        md = pathlib.Path(args.md)
        md.write_text(replace_between_markers(md.read_text(), block, args.marker))
    if args.png:
        print(f"wrote {plot(results, args.png)}")


if __name__ == "__main__":
    main()
