"""README.md of every exported folder: a Hugging Face model card, metadata by huggingface_hub.

The YAML header is `ModelCardData` (base model, library, pipeline tag, tags, the run's evaluation
results as a model-index), so the hub and `ModelCard.load` read it; the body says what a user needs:
what t and b mean, how to load the folder, how it was trained (base model, data, steps, batch, the
loss and its settings, the command) and how it scored before and after training. Everything comes
from the model, the run's config.json and its summary.jsonl line for the exported step; nothing in
the card depends on the time or the target folder, so an export stays a pure function of its inputs.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any

from bixse_jax import checkpoint
from bixse_jax.models.sentence_model import SentenceModel

_LIBRARY = {"sentence-transformers": "sentence-transformers", "hf": "transformers", "hf-flax": "transformers"}
_PIPELINE = {"sentence-transformers": "sentence-similarity", "hf": "feature-extraction",
             "hf-flax": "feature-extraction"}
_TASK = {"beir": "retrieval", "demo": "retrieval", "rerank": "reranking", "sts": "sts"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def write(folder: pathlib.Path, model: SentenceModel, fmt: str) -> pathlib.Path:
    """Writes folder/README.md, the model card of `model` exported as `fmt`."""
    path = pathlib.Path(folder) / "README.md"
    build(model, fmt).save(path)
    return path


def build(model: SentenceModel, fmt: str):
    """The ModelCard: metadata from ModelCardData, the body from the model and its run's records."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from bixse_jax import __version__
    config, summary = run_records(model)
    base = model.source.get("base_model") or model.source.get("model")
    name = _model_name(model)
    results = [EvalResult(task_type=_TASK.get(kind, kind), dataset_type=_dataset_id(entry), dataset_name=evaluator,
                          dataset_split=entry.get("split") if kind in ("beir", "rerank") else None,
                          metric_type=metric.replace("@", "_at_"), metric_name=metric, metric_value=value)
               for evaluator, kind, entry, metrics in _evaluations(config, summary)
               for metric, value in metrics.get("after", {}).items()]
    tags = ["bixse-jax", "sentence-transformers", "sentence-similarity", "feature-extraction", "dense-retrieval"]
    if config:
        tags.append(f"loss:{config['loss']['name']}")
    if model.matryoshka_dims:
        tags.append("matryoshka")
    data = ModelCardData(base_model=hub_id(base), library_name=_LIBRARY[fmt], pipeline_tag=_PIPELINE[fmt],
                         tags=tags, model_name=name, eval_results=results or None)
    sections = [f"# {name}", _intro(model, config, base, __version__), _relevance(model), _usage(model, fmt),
                _matryoshka(model, fmt), _training(model, config, summary), _evaluation(config, summary), _settings(model)]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n")


def run_records(model: SentenceModel) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the run's config.json, its summary.jsonl line for the exported step), or None for what is missing."""
    workdir = model.source.get("workdir")
    if not workdir:
        return None, None
    config = checkpoint.read_run_config(workdir)
    path = checkpoint.workdir_path(workdir) / "summary.jsonl"
    summary = None
    if path.exists():
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise checkpoint.CheckpointError(f"{path}:{number}: cannot read JSON: {e}") from e
            if isinstance(record, dict) and record.get("steps") == model.source.get("step"):
                summary = record  # the last finished run of this step
    return config, summary


def hub_id(name: Any) -> str | None:
    """`name` if it reads as a hub model id (owner/name) and is no local path; the hub wants no paths."""
    name = None if name is None else str(name)
    return name if name and _HUB_ID.match(name) and not os.path.exists(name) else None


def _model_name(model: SentenceModel) -> str:
    where = model.source.get("workdir") or model.source.get("model") or "model"
    stem = str(where).rstrip("/").rsplit("/", 1)[-1]
    return f"{stem}-step{model.source['step']}" if "step" in model.source else stem


def _intro(model: SentenceModel, config: dict | None, base: str | None, version: str) -> str:
    lib = f"[bixse-jax](https://pypi.org/project/bixse-jax/) {version}"
    if config is None:
        return (f"`{base}` converted by {lib}, untrained here. It embeds queries and documents into "
                f"{model.config.hidden_size}-dimensional vectors compared by cosine similarity.")
    loss = config["loss"]["name"]
    return (f"A sentence-embedding model fine-tuned from `{base}` with {lib}, loss `{loss}`"
            + (" (BiXSE: sigmoid binary cross-entropy over the in-batch query x document similarity matrix "
               "against graded relevance targets)" if loss == "bixse" else "")
            + f". It embeds queries and documents into {model.config.hidden_size}-dimensional vectors "
            "compared by cosine similarity.")


def _relevance(model: SentenceModel) -> str | None:
    t, b = model.log_temperature, model.bias
    if t is None or b is None:
        return None
    scale = math.exp(t)

    def p(cos: float) -> str:
        return f"{1 / (1 + math.exp(-(scale * cos + b))):.3f}"

    return "\n".join([
        "## Relevance probability", "",
        f"Training learned t = {t:.6g} and b = {b:.6g} (exp(t) = {scale:.4g}). "
        "`sigmoid(exp(t) * cos(query, document) + b)` turns a cosine into the probability that the document "
        "is relevant to the query, on the scale of the training grades (grade / top grade), which the loss fitted "
        "it to: a threshold on it means the same on data like the training data (`bixse-jax eval --calibration` "
        "measures how well it holds on yours).",
        "", "| cosine | 0.2 | 0.4 | 0.6 | 0.8 |", "|---|---|---|---|---|",
        f"| p(relevant) | {p(0.2)} | {p(0.4)} | {p(0.6)} | {p(0.8)} |", "",
        f"A cosine of {-b / scale:.3f} is an even chance. `bixse_jax.predict_relevance` computes it; both values "
        "are also in `bixse.json` (`log_temperature`, `bias`)."])


def _usage(model: SentenceModel, fmt: str) -> str:
    prompt = model.settings.query_prompt
    lines = ["## Usage", ""]
    if fmt == "sentence-transformers":
        query = ', prompt_name="query"' if prompt else ""
        lines += ["```python", "from sentence_transformers import SentenceTransformer",
                  'model = SentenceTransformer("PATH")',
                  f'q = model.encode(["how long do cats sleep?"]{query})',
                  'd = model.encode(["Cats sleep 12 to 16 hours a day."])', "print(model.similarity(q, d))", "```"]
        if prompt:
            lines += ["", f"Queries take the prompt `query` ({prompt!r}), as in training; documents none."]
    else:
        lines += [f"`transformers.{'FlaxAutoModel' if fmt == 'hf-flax' else 'AutoModel'}.from_pretrained(PATH)`, "
                  f"then {model.settings.pooling} pooling over the attention mask"
                  + (" and L2 normalisation" if model.settings.normalize else "")
                  + (f"; queries start with {prompt!r}" if prompt else "") + " (`bixse.json` holds these settings)."]
    lines += ["", "With bixse-jax (`pip install bixse-jax`), t and b included:", "", "```python", "import bixse_jax",
              'model = bixse_jax.load_encoder("PATH")',
              'p = bixse_jax.predict_relevance(model, ["how long do cats sleep?"], ["Cats sleep 12 to 16 hours a day."])',
              "```"]
    return "\n".join(lines)


def _matryoshka(model: SentenceModel, fmt: str) -> str | None:
    """Which prefixes were trained to work alone (loss.matryoshka_dims), and how to load them."""
    dims = model.matryoshka_dims
    if not dims:
        return None
    small = dims[0]
    lines = ["## Matryoshka dimensions", "",
             f"Trained so that the first {', '.join(map(str, dims))} coordinates of each embedding work on their own "
             f"(the loss summed over those prefixes{', each renormalised' if model.settings.normalize else ''}, with one "
             "t and b for all of them: the relevance probability above is the one training fitted at every size). "
             "`bixse.json` lists them as `matryoshka_dims`.", ""]
    if fmt == "sentence-transformers":
        lines += ["```python", f'model = SentenceTransformer("PATH", truncate_dim={small})  # {small}-dimensional', "```",
                  ""]
    lines += [f"With bixse-jax: `bixse-jax encode --model PATH --input texts.txt --out e.npy --dim {small}`."]
    return "\n".join(lines)


def _training(model: SentenceModel, config: dict | None, summary: dict | None) -> str | None:
    if config is None:
        return None
    data, train, loss = config["data"], config["train"], config["loss"]
    where = {"demo": "the demo's generated graded pairs (bixse_jax/data/synthetic.py)"}.get(
        data["kind"], f"`{data.get('path')}` ({data['kind']}" + (f", split {data['split']}" if data["kind"] == "beir"
                                                                 else "") + ")")
    lines = ["## Training", "",
             f"- base model: `{config['model']['name_or_path']}`",
             f"- data: {where}",
             f"- steps: {model.source.get('step')} of {train['num_steps']}, global batch {train['global_batch_size']} "
             f"pairs, learning rate {train['learning_rate']:g} ({train['schedule']}, {train['warmup_steps']} warm-up "
             f"steps), AdamW weight decay {train['weight_decay']:g}",
             f"- token limits: queries {data['query_max_len']}, documents {data['doc_max_len']}",
             f"- loss `{loss['name']}`: " + ", ".join(f"{k} = {v}" for k, v in sorted(loss.items()) if k != "name")]
    adapters = config["model"].get("lora") or {}
    if adapters.get("rank"):  # an export of a LoRA run holds the merged weights
        lines += [f"- LoRA: rank {adapters['rank']}, alpha {adapters['alpha']:g}, dropout {adapters['dropout']:g} on "
                  f"{', '.join(adapters['targets']) or 'the attention projections'}; the base frozen "
                  f"({adapters['base_dtype']}), the adapters merged into these weights (W + alpha / rank A B)"]
    if summary and summary.get("command"):
        lines += ["", "Trained with:", "", "```bash", summary["command"], "```"]
    return "\n".join(lines)


def _evaluation(config: dict | None, summary: dict | None) -> str | None:
    rows = [f"| {evaluator} | {_describe(kind, entry)} | {metric} | {_num(metrics.get('before', {}).get(metric))} | "
            f"{_num(value)} |"
            for evaluator, kind, entry, metrics in _evaluations(config, summary)
            for metric, value in metrics.get("after", {}).items()]
    if not rows:
        return None
    return "\n".join(["## Evaluation", "", "The run's own evaluators, before and after training (its summary.jsonl):",
                      "", "| evaluator | data | metric | before | after |", "|---|---|---|---|---|", *rows])


def _settings(model: SentenceModel) -> str:
    s = model.settings
    return "\n".join(["## Settings", "",
                      f"pooling `{s.pooling}`, {'L2-normalised' if s.normalize else 'not normalised'}, query prompt "
                      f"{s.query_prompt!r}, token limits: queries {model.query_max_len or '-'}, documents "
                      f"{model.doc_max_len or s.max_seq_length}; `bixse.json` holds them with t, b and provenance."])


def _evaluations(config: dict | None, summary: dict | None):
    """(evaluator name, kind, config entry, {"before": ..., "after": ...}) for each evaluator of the summary."""
    if not config or not summary:
        return []
    entries = config.get("evals") or {}
    names = sorted(set(summary.get("after") or {}))
    return [(n, entries.get(n, {}).get("kind", "beir"), entries.get(n, {}),
             {"before": (summary.get("before") or {}).get(n, {}), "after": summary["after"][n]}) for n in names]


def _dataset_id(entry: dict) -> str:
    if entry.get("kind") == "demo":
        return "bixse-jax-demo"
    path = str(entry.get("path") or "data").rstrip("/")
    return pathlib.PurePath(path).parent.name if entry.get("kind") == "sts" else pathlib.PurePath(path).name


def _describe(kind: str, entry: dict) -> str:
    if kind == "demo":
        return "demo held-out queries"
    split = f", {entry.get('split')}" if kind in ("beir", "rerank") else ""
    return f"{kind} `{entry.get('path')}`{split}"


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"
