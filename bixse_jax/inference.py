"""Using a loaded model: embeddings as in training and evaluation, and calibrated relevance.

  encode(model, texts, query=...)        -> [N, H] embeddings
  predict_relevance(model, qs, ds)       -> sigmoid(exp(t) * cos + b) with the model's learned t, b
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from bixse_jax.errors import UserError
from bixse_jax.eval.encode import encode_texts
from bixse_jax.models.sentence_model import SIDECAR_NAME, SentenceModel, max_length, position_limit


def encode(model: SentenceModel, texts: Sequence[str], *, query: bool = False, batch_size: int = 64,
           max_len: int | None = None, show_progress: bool = False) -> np.ndarray:
    """[N, H] float32 embeddings; `query=True` prepends the query prompt and uses the query length."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    limit = position_limit(model)
    if max_len is not None and not 1 <= max_len <= limit:
        raise UserError(f"max_len {max_len} must be between 1 and the model's {limit} positions")
    return encode_texts(model.encoder, model.params, model.tokenizer, list(texts),
                        max_len=max_len or max_length(model, query=query), batch_size=batch_size,
                        prefix=model.settings.query_prompt if query else "", show_progress=show_progress)


def predict_relevance(model: SentenceModel, queries: Sequence[str], docs: Sequence[str], *, matrix: bool = False,
                      batch_size: int = 64, log_temperature: float | None = None,
                      bias: float | None = None) -> np.ndarray:
    """Calibrated relevance probabilities sigmoid(exp(t) * score + b), score as in training.

    Pairwise ([N]: queries[i] with docs[i]) or, with `matrix=True`, every query against every
    document ([Q, D]). The score is the dot product of the embeddings, i.e. the cosine for a
    normalised model, which is what t and b were learned on; t and b are the model's own
    (from bixse.json) unless given.
    """
    t = model.log_temperature if log_temperature is None else log_temperature
    b = model.bias if bias is None else bias
    if t is None or b is None:
        raise UserError(f"{model.model_dir}: the model has no learned t and b (no {SIDECAR_NAME}); "
                         "pass log_temperature= and bias=")
    if not matrix and len(queries) != len(docs):
        raise UserError(f"pairwise relevance needs as many documents as queries, got {len(queries)} "
                         f"and {len(docs)}; pass matrix=True for every query against every document")
    q = encode(model, queries, query=True, batch_size=batch_size).astype(np.float64)
    d = encode(model, docs, batch_size=batch_size).astype(np.float64)
    scores = q @ d.T if matrix else np.sum(q * d, axis=1)
    logits = math.exp(t) * scores + b
    return (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32)  # sigmoid, without overflow
