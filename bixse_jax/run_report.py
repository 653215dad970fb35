"""The last lines `bixse-jax train` prints: what a person wants once a run ends.

The whole summary is a line of WORKDIR/summary.jsonl (for scripts); the terminal gets the metrics
before -> after on one line, where the model is, and the commands that export, encode or evaluate
it, filled in with this run's workdir and evaluation data.
"""

from __future__ import annotations

import shlex
from typing import Any, Mapping

# The metrics worth a glance, in this order; others stay in summary.jsonl.
HEADLINE_METRICS = ("ndcg@10", "recall@100", "spearman")


def metrics_line(summary: Mapping[str, Any]) -> str | None:
    """`demo ndcg@10 0.384 -> 0.667, recall@100 0.91 -> 0.97; sts spearman ...`, or None without evaluators."""
    before, after = summary.get("before") or {}, summary.get("after") or {}
    parts = []
    for name in sorted(set(before) | set(after)):
        b, a = before.get(name) or {}, after.get(name) or {}
        keys = [k for k in HEADLINE_METRICS if k in a or k in b] or sorted(set(a) | set(b))[:1]
        shown = [f"{k} {_num(b.get(k))} -> {_num(a.get(k))}" for k in keys]
        parts.append(f"{name} " + ", ".join(shown))
    return "; ".join(parts) or None


def closing_lines(summary: Mapping[str, Any], config: Mapping[str, Any], *, total_steps: int,
                  seconds: float | None = None) -> list[str]:
    """The closing lines of a finished (or preempted) run: metrics, model, summary file, next commands."""
    workdir = str(summary["workdir"])
    w = shlex.quote(workdir)
    steps = int(summary["steps"])
    took = f" in {_duration(seconds)}" if seconds is not None else ""
    if steps < total_steps:  # preempted or stopped early: no summary line was written
        return [f"bixse-jax: stopped at step {steps} of {total_steps}{took}; checkpoint in {workdir}/checkpoints. "
                f"Run the same command again to resume."]
    lines = [f"bixse-jax: trained {steps} steps{took}; final t = {summary['log_temperature']:.3f}, "
             f"b = {summary['bias']:.3f}: p(relevant) = sigmoid(exp(t) * cos + b)"]
    metrics = metrics_line(summary)
    if metrics:
        lines.append(f"before -> after: {metrics}")
    lines += [f"model: {workdir} (checkpoint {steps}); full summary: {workdir}/summary.jsonl",
              "next:",
              f"  bixse-jax export --workdir {w} --format sentence-transformers --out {shlex.quote(workdir + '-st')}",
              f"  bixse-jax encode --model {w} --input texts.txt --out embeddings.npy   # add --query for queries"]
    lines += [f"  bixse-jax eval --model {w} {args}" for args in eval_arguments(config)]
    return lines


def eval_arguments(config: Mapping[str, Any]) -> list[str]:
    """`bixse-jax eval` flags that repeat each of the run's evaluators (one with placeholders for the demo's)."""
    out = []
    for _, entry in sorted((config.get("evals") or {}).items()):
        kind, path = entry.get("kind"), entry.get("path")
        if kind in ("beir", "rerank") and path:
            args = f"--beir {shlex.quote(str(path))} --split {shlex.quote(str(entry.get('split', 'test')))}"
            if kind == "rerank":
                args += f" --rerank {shlex.quote(str(entry.get('run_file') or 'qrels'))}"
            out.append(args)
        elif kind == "sts" and path:
            out.append(f"--sts {shlex.quote(str(path))}")
    return list(dict.fromkeys(out)) or ["--beir BEIR_FOLDER --split test   # or --sts STS_FILE"]


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"
