"""Grades as tokens, and the label read from their logits.

p(grade) is the softmax over the grade tokens' logits at the answer position only. The model also
puts probability on tokens that are no grade ("The", "**", a space); renormalising over the
grades conditions on the model answering at all, so a verbose model is not read as judging
"irrelevant". The full-vocabulary mass of the grade tokens is kept as `grade_mass`, a diagnostic.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from bixse_jax.data.tokenizer import Tokenizer
from bixse_jax.errors import UserError


@dataclasses.dataclass
class Outcome:
    """One row's result: the grade tokens' logits (and their full-vocabulary mass), or why it failed."""
    row: dict[str, Any]
    grade_logits: np.ndarray | None = None
    grade_mass: float | None = None
    error: str | None = None


class GradeError(UserError):
    """Grades that cannot be read as single tokens, or a malformed --grades."""


def parse_grades(text: str) -> list[int]:
    """'0,1,2,3' -> [0, 1, 2, 3]: distinct non-negative integers, at least two, in increasing order."""
    try:
        grades = [int(g) for g in text.split(",")]
    except ValueError:
        raise GradeError(f"--grades must be comma-separated integers, got {text!r}") from None
    if len(grades) < 2 or min(grades) < 0 or grades != sorted(set(grades)):
        raise GradeError(f"--grades must be at least two distinct non-negative integers in increasing "
                         f"order, got {text!r}")
    if max(grades) == 0:
        raise GradeError(f"--grades needs a grade above 0 (the score is E[grade] / max grade), got {text!r}")
    return grades


def grade_token_ids(tokenizer: Tokenizer, grades: Sequence[int]) -> list[int]:
    """The one token id of each grade's digits; an error naming every grade that is not one token."""
    ids, bad = [], []
    for grade in grades:
        tokens = tokenizer.encode([str(grade)], 64, add_special_tokens=False)[0].tolist()
        if len(tokens) != 1:
            bad.append(f"'{grade}' -> {len(tokens)} tokens {tokens}")
        elif tokenizer.decode(tokens).strip() != str(grade):  # e.g. the unknown token
            bad.append(f"'{grade}' -> token {tokens[0]} which reads {tokenizer.decode(tokens)!r}")
        else:
            ids.append(tokens[0])
    if bad:
        raise GradeError("each grade must be exactly one token of the teacher's tokenizer; " + "; ".join(bad))
    if len(set(ids)) != len(ids):
        raise GradeError(f"grades {list(grades)} map to repeated token ids {ids}")
    return ids


def grade_distribution(grade_logits: np.ndarray) -> np.ndarray:
    """[..., G] logits (or log-probabilities) of the grade tokens -> float64 softmax over them."""
    x = np.asarray(grade_logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    p = np.exp(x)
    return p / p.sum(axis=-1, keepdims=True)


def labelled_row(row: dict[str, Any], grade_logits: np.ndarray, grades: Sequence[int], teacher: str,
                 grade_mass: float | None = None) -> dict[str, Any]:
    """The input row plus `score` = E[grade] / max grade, `grade_probs`, `grade` (argmax), `teacher`."""
    probs = grade_distribution(grade_logits)
    expected = float(np.dot(probs, np.asarray(grades, np.float64)))
    out = dict(row)
    out.update(score=expected / max(grades), grade_probs={str(g): float(p) for g, p in zip(grades, probs)},
               grade=int(grades[int(np.argmax(probs))]), teacher=teacher)
    if grade_mass is not None:
        out["grade_mass"] = float(grade_mass)
    return out
