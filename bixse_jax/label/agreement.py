"""How good are a teacher's labels: its grades against human qrels.

Over the labelled pairs the qrels judge: Spearman and Kendall's tau-b between the expected grade
(score x max grade) and the human grade, Cohen's kappa (unweighted and quadratic-weighted) of the
argmax grade, the confusion matrix (rows: human grade, columns: teacher's argmax), and the mean
expected grade per human grade; written as JSON and a small PNG.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from bixse_jax.data import sources
from bixse_jax.errors import UserError
from bixse_jax.eval import metrics


def read_qrels(path: str | os.PathLike) -> dict[tuple[str, str], int]:
    """(query id, doc id) -> grade from a BEIR qrels TSV (header optional) or a TREC qrels file.

    Unlike the training reader (data/sources.py), it takes TREC's 4 columns too and needs no corpus:
    agreement only looks up the pairs a label file holds.
    """
    out = {}
    for line_no, line in sources.read_lines(path):
        parts = line.split()
        if len(parts) not in (3, 4):
            raise sources.DataError(path, line_no, None, "expected 'query-id corpus-id score' or TREC's "
                                    f"'query-id iteration doc-id grade', got {len(parts)} fields")
        qid, did, grade = (parts[0], parts[1], parts[2]) if len(parts) == 3 else (parts[0], parts[2], parts[3])
        try:
            out[(qid, did)] = int(float(grade))
        except ValueError:
            if line_no == 1:
                continue  # the header
            raise sources.DataError(path, line_no, "score", f"{grade!r} is not a number") from None
    return out


def cohen_kappa(a: np.ndarray, b: np.ndarray, labels: Sequence[int], weights: str | None = None) -> float:
    """Cohen's kappa of two integer labellings; `weights="quadratic"` for the weighted form."""
    index = {g: i for i, g in enumerate(labels)}
    k = len(labels)
    observed = np.zeros((k, k))
    for x, y in zip(a, b):
        observed[index[x], index[y]] += 1
    observed /= observed.sum()
    expected = np.outer(observed.sum(1), observed.sum(0))
    i, j = np.indices((k, k))
    w = ((i - j) / max(k - 1, 1)) ** 2 if weights == "quadratic" else (i != j).astype(float)
    denominator = (w * expected).sum()
    return float(1 - (w * observed).sum() / denominator) if denominator > 0 else float("nan")


def agreement(rows: Sequence[dict[str, Any]], qrels: dict[tuple[str, str], int]) -> dict[str, Any]:
    try:
        from scipy import stats  # Kendall's tau-b
    except ImportError as e:
        raise UserError("--compare-qrels needs scipy (pip install 'bixse-jax[label]')") from e
    pairs = [(r, qrels[(str(r["query_id"]), str(r["doc_id"]))]) for r in rows
             if (str(r.get("query_id")), str(r.get("doc_id"))) in qrels]
    if len(pairs) < 2:
        raise UserError(f"only {len(pairs)} labelled rows are judged in the qrels; nothing to compare")
    max_grade = max(int(g) for g in pairs[0][0]["grade_probs"])
    expected = np.array([r["score"] * max_grade for r, _ in pairs])
    argmax = np.array([int(r["grade"]) for r, _ in pairs])
    human = np.array([h for _, h in pairs])
    labels = sorted(set(human.tolist()) | set(argmax.tolist()) | {int(g) for g in pairs[0][0]["grade_probs"]})
    confusion = [[int(np.sum((human == h) & (argmax == t))) for t in labels] for h in labels]
    return {
        "pairs": len(pairs), "queries": len({r["query_id"] for r, _ in pairs}),
        "spearman": metrics.spearman(expected, human),
        "kendall_tau_b": float(stats.kendalltau(expected, human).statistic),
        "cohen_kappa": cohen_kappa(human, argmax, labels),
        "cohen_kappa_quadratic": cohen_kappa(human, argmax, labels, "quadratic"),
        "grades": labels, "confusion_human_x_teacher": confusion,
        "mean_expected_grade_by_human_grade": {str(h): float(expected[human == h].mean())
                                               for h in labels if np.any(human == h)},
        "pairs_by_human_grade": {str(h): int(np.sum(human == h)) for h in labels if np.any(human == h)},
        "mean_grade_mass": (float(np.mean([r["grade_mass"] for r, _ in pairs]))
                            if all("grade_mass" in r for r, _ in pairs) else None),
    }


def plot(result: dict[str, Any], out: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.4))
    means = result["mean_expected_grade_by_human_grade"]
    left.bar(list(means), list(means.values()), color="tab:blue")
    left.set(xlabel="human grade", ylabel="mean expected grade (teacher)",
             title=f"Spearman {result['spearman']:.3f}, n={result['pairs']}")
    matrix = np.array(result["confusion_human_x_teacher"])
    right.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        right.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ticks = range(len(result["grades"]))
    right.set(xticks=ticks, yticks=ticks, xticklabels=result["grades"], yticklabels=result["grades"],
              xlabel="teacher argmax grade", ylabel="human grade", title=f"kappa {result['cohen_kappa']:.3f}")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def compare_files(graded: str | os.PathLike, qrels_path: str | os.PathLike, out: pathlib.Path,
                  teacher: str | None = None) -> dict[str, Any]:
    """Agreement of a label file's rows (one teacher's) with a qrels file; JSON to `out`, PNG beside it."""
    text = pathlib.Path(graded).read_text(encoding="utf-8")
    text = text[:text.rfind("\n") + 1]  # a line still being written (a labeller at work) is left out
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    teachers = sorted({r["teacher"] for r in rows})
    if teacher is None and len(teachers) > 1:
        raise UserError(f"{graded} holds several teachers {teachers}; name one with --teacher-name")
    teacher = teacher or (teachers[0] if teachers else None)
    result = agreement([r for r in rows if r["teacher"] == teacher], read_qrels(qrels_path))
    result = {"teacher": teacher, "qrels": str(qrels_path), **result}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    png = out.with_suffix(".png")
    plot(result, png, f"{teacher} vs {pathlib.Path(qrels_path).name}")
    result["plot"] = str(png)
    return result
