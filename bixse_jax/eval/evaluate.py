"""BEIR retrieval, candidate re-ranking and STS evaluation, shared by `bixse-jax eval` and training.

A `TextEncoder` binds a model to how its texts are encoded (query prefix, lengths, batch size);
training swaps in its current parameters with `with_params`. Models load from a HF /
sentence-transformers folder, a bixse-jax export, or a training workdir (its latest checkpoint's
encoder), through bixse_jax.models.sentence_model and bixse_jax.checkpoint.

Re-ranking scores each query only against its own candidate pool: a run file's retrieved
documents (`run_pool`), or the judged documents of the query (`judged_pool`), which is how TREC-DL
2019 is evaluated here, since its corpus holds only candidates. Pools hold only documents with text,
since only those can be scored; the metrics still read the qrels as given (trec_eval's convention),
so a judged passage without text counts in the ideal DCG and recall's denominator as one the model
could not place.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Sequence

import numpy as np
from jax.sharding import Mesh

from bixse_jax.data.tokenizer import Tokenizer
from bixse_jax import checkpoint, matryoshka
from bixse_jax.data.sources import GradedPair
from bixse_jax.errors import UserError
from bixse_jax.eval import calibration, metrics
from bixse_jax.eval.encode import encode_texts
from bixse_jax.eval.search import top_k_run, top_k_search
from bixse_jax.models.encoder import SentenceEncoder
from bixse_jax.models.sentence_model import load_encoder, max_length, position_limit

Qrels = metrics.Qrels
Run = metrics.Run
Candidates = dict[str, list[str]]  # query id -> candidate doc ids
LogitParams = tuple[float, float]  # (t, b): the model's relevance probability is sigmoid(exp(t) cos + b)


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """A model plus the settings its texts are encoded with; queries and documents differ."""

    encoder: SentenceEncoder
    params: dict
    tokenizer: Tokenizer
    query_max_len: int
    doc_max_len: int
    query_prefix: str = ""
    batch_size: int = 128
    mesh: Mesh | None = None
    show_progress: bool = False
    source: str = ""  # what was loaded, for reports
    log_temperature: float | None = None  # the model's learned t and b (a workdir's, an export's bixse.json)
    bias: float | None = None
    dim: int | None = None  # Matryoshka: embeddings cut to their first `dim` coordinates (None: whole)
    memo: dict | None = dataclasses.field(default=None, compare=False, repr=False)  # texts -> whole embeddings

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self.query_max_len, self.query_prefix)

    def documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self.doc_max_len, "")

    def encode(self, texts: Sequence[str], *, query: bool, prefix: str | None = None) -> np.ndarray:
        """Queries at the query length, documents at the document length; `prefix` replaces the
        default one (the query prefix for queries, none for documents), e.g. a task's instruction."""
        if prefix is None:
            prefix = self.query_prefix if query else ""
        return self._encode(texts, self.query_max_len if query else self.doc_max_len, prefix)

    def with_params(self, params: dict) -> "TextEncoder":
        return dataclasses.replace(self, params=params, memo=None)

    def _encode(self, texts: Sequence[str], max_len: int, prefix: str) -> np.ndarray:
        key = (max_len, prefix, tuple(texts))
        full = None if self.memo is None else self.memo.get(key)
        if full is None:
            full = encode_texts(self.encoder, self.params, self.tokenizer, list(texts), max_len=max_len,
                                batch_size=self.batch_size, mesh=self.mesh, prefix=prefix,
                                show_progress=self.show_progress)
            if self.memo is not None:
                self.memo[key] = full
        return matryoshka.truncate(full, self.dim, self.encoder.normalize)


def per_dimension(evaluate_one: Callable[[TextEncoder], dict[str, float]], enc: TextEncoder,
                  dims: Sequence[int] = ()) -> dict[str, float]:
    """`evaluate_one`'s metrics of the whole embedding, and of each narrower prefix in `dims` as
    `dimK/METRIC` (Matryoshka: first K coordinates, renormalised); every text is encoded once."""
    if not dims:
        return evaluate_one(enc)
    memo: dict = {}
    out = evaluate_one(dataclasses.replace(enc, dim=None, memo=memo))
    for dim in dims:
        if dim < enc.encoder.config.hidden_size:
            narrow = evaluate_one(dataclasses.replace(enc, dim=dim, memo=memo))
            out |= {f"dim{dim}/{name}": value for name, value in narrow.items()}
    return out


# ----------------------------------------------------------------------------
# Evaluations.
# ----------------------------------------------------------------------------


def evaluate_sts(enc: TextEncoder, pairs: Sequence[GradedPair],
                 logit_params: LogitParams | None = None) -> dict[str, float]:
    """Spearman and Pearson of cosine(sentence 1, sentence 2) against the gold scores; with the
    model's (t, b), also the ECE and Brier score of its relevance probabilities against score / 5."""
    a = _unit(enc.documents([p.query for p in pairs]))
    b = _unit(enc.documents([p.document for p in pairs]))
    cos = np.sum(a * b, axis=1)
    gold = np.array([p.grade for p in pairs])
    out = {"spearman": metrics.spearman(cos, gold), "pearson": metrics.pearson(cos, gold)}
    return out | (calibration_metrics(cos, gold, logit_params) if logit_params else {})


def calibration_metrics(scores: np.ndarray, targets: np.ndarray, logit_params: LogitParams) -> dict[str, float]:
    """ECE (15 bins) and Brier score of p = sigmoid(exp(t) score + b) against targets in [0, 1]."""
    p = calibration.relevance_probability(scores, *logit_params)
    return {"ece": calibration.expected_calibration_error(p, targets), "brier": calibration.brier_score(p, targets)}


def retrieve(enc: TextEncoder, queries: dict[str, str], corpus: dict[str, str], top_k: int) -> Run:
    """Each query's top_k documents of the whole corpus by exact inner product."""
    qids, dids = list(queries), list(corpus)
    q = enc.queries([queries[i] for i in qids])
    d = enc.documents([corpus[i] for i in dids])
    scores, indices = top_k_search(q, d, top_k, mesh=enc.mesh)
    return top_k_run(qids, dids, scores, indices)


def evaluate_retrieval(enc: TextEncoder, queries: dict[str, str], corpus: dict[str, str], qrels: Qrels, *,
                       ks: Sequence[int] = (10, 100), top_k: int | None = None) -> tuple[dict[str, float], Run]:
    """Full-corpus retrieval: (metrics, run). MAP is over the retrieved depth top_k (default max(ks))."""
    run = retrieve(enc, queries, corpus, max(ks) if top_k is None else top_k)
    return metrics.evaluate_run(run, qrels, ks=tuple(ks)), run


def judged_pool(qrels: Qrels, corpus: dict[str, str]) -> Candidates:
    """Every query's judged documents (any grade, 0 included) that have text, as its candidate pool.

    Judged documents without text stay in `qrels` for the metrics (sources.judged_without_text
    counts them); they cannot be scored, so they are left out of the pool.
    """
    return {qid: [d for d in judged if d in corpus] for qid, judged in qrels.items()}


def run_pool(run: Run, corpus: dict[str, str], depth: int | None = None) -> tuple[Candidates, int]:
    """Each query's top-`depth` documents of a run that have text; also how many had none."""
    pools, missing = {}, 0
    for qid, scores in run.items():
        ranked = sorted(scores, key=lambda d: (scores[d], d), reverse=True)[:depth]
        pools[qid] = [d for d in ranked if d in corpus]
        missing += len(ranked) - len(pools[qid])
    return pools, missing


def rerank(enc: TextEncoder, queries: dict[str, str], corpus: dict[str, str], pools: Candidates) -> Run:
    """Scores each query against its own pool; every pooled document is encoded once."""
    qids = [q for q in queries if pools.get(q)]
    dids = list(dict.fromkeys(d for q in qids for d in pools[q]))
    unknown = [d for d in dids if d not in corpus]
    if unknown:
        raise UserError(f"{len(unknown)} candidate documents have no text, e.g. {unknown[:3]}")
    row = {d: i for i, d in enumerate(dids)}
    q = enc.queries([queries[i] for i in qids])
    d = enc.documents([corpus[i] for i in dids])
    run = {}
    for r, qid in enumerate(qids):
        idx = np.array([row[x] for x in pools[qid]])
        run[qid] = dict(zip(pools[qid], (d[idx] @ q[r]).tolist()))
    return run


def evaluate_rerank(enc: TextEncoder, queries: dict[str, str], corpus: dict[str, str], qrels: Qrels,
                    pools: Candidates, *, ks: Sequence[int] = (10, 100),
                    logit_params: LogitParams | None = None) -> tuple[dict[str, float], Run]:
    """Re-ranking of each judged query's pool: (metrics, run), metrics against `qrels` as given.

    Queries without a pool score 0, and judged documents outside the pools count as not retrieved.
    With the model's (t, b), also the ECE and Brier score of its relevance probabilities on the
    pools' judged pairs, against grade / the qrels' top grade (TREC-DL's 0-3 as g/3).
    """
    run = rerank(enc, {q: queries[q] for q in qrels}, corpus, pools)
    out = metrics.evaluate_run(run, qrels, ks=tuple(ks))
    out["mean_pool_size"] = float(np.mean([len(s) for s in run.values()])) if run else 0.0
    if logit_params:  # only then: the judged pairs are gathered for calibration alone
        judged = [(score, qrels[q][d]) for q, scores in run.items() for d, score in scores.items() if d in qrels[q]]
        if judged:
            top = max(g for grades in qrels.values() for g in grades.values()) or 1.0
            scores, grades = np.array(judged, np.float64).T
            out |= calibration_metrics(scores, grades / top, logit_params)
    return out, run


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------
# Loading a model to evaluate.
# ----------------------------------------------------------------------------


def load_text_encoder(name_or_path: str | pathlib.Path, *, dtype: str = "float32",
                      matmul_dtype: str | None = None, dense_impl: str = "xla", batch_size: int = 128,
                      max_len: int | None = None, query_max_len: int | None = None,
                      query_prefix: str | None = None, pooling: str | None = None,
                      normalize: bool | None = None, append_eos: bool = False, step: int | None = None,
                      mesh: Mesh | None = None, show_progress: bool = False) -> TextEncoder:
    """A model folder (HF, sentence-transformers or a bixse-jax export), a hub name, or a training workdir.

    A workdir gives its newest checkpoint's encoder (or `step`'s), read by bixse_jax.checkpoint without
    the optimiser state. Defaults: the query prompt (a workdir's `model.query_prefix`) and lengths
    (a workdir's or export's training lengths, else the folder's max_seq_length, else the position
    limit). `max_len` sets both lengths, `query_max_len` the query length alone. `pooling` and
    `normalize` override the model's own (None keeps it); `append_eos` applies to model folders.
    """
    if checkpoint.is_workdir(name_or_path):
        model = checkpoint.restore_model(name_or_path, step)
        if append_eos:
            raise UserError(f"{name_or_path}: append_eos is for model folders; a training workdir keeps its "
                            "model.append_eos")
        config = dataclasses.replace(model.config, dtype=dtype, matmul_dtype=matmul_dtype, dense_impl=dense_impl)
        model = dataclasses.replace(model, encoder=SentenceEncoder(
            config, pooling or model.encoder.pooling, model.encoder.normalize if normalize is None else normalize))
        source = f"{model.source['workdir']} (checkpoint {model.source['step']}, base {model.source['base_model']})"
    else:
        if step is not None:
            raise UserError(f"{name_or_path}: a checkpoint step needs a training workdir")
        model = load_encoder(name_or_path, pooling=pooling, normalize=normalize, append_eos=append_eos,
                             dtype=dtype, matmul_dtype=matmul_dtype, dense_impl=dense_impl)
        source = str(model.model_dir)
    limit = position_limit(model)
    query_len = query_max_len or max_len or max_length(model, query=True)
    doc_len = max_len or max_length(model, query=False)
    for name, value in (("query max length", query_len), ("max length", doc_len)):
        if not 1 <= value <= limit:
            raise UserError(f"{name} {value} is outside 1..{limit}, the model's position limit")
    return TextEncoder(model.encoder, model.params, model.tokenizer, query_max_len=query_len, doc_max_len=doc_len,
                       query_prefix=model.settings.query_prompt if query_prefix is None else query_prefix,
                       batch_size=batch_size, mesh=mesh, show_progress=show_progress, source=source,
                       log_temperature=model.log_temperature, bias=model.bias)
