"""A bixse-jax model as an `mteb` encoder, and local BEIR / STS files as mteb tasks.

People compare embedders on MTEB, and mteb drives its tasks through an encoder object. Wrapping the
`TextEncoder` that `bixse-jax eval` uses (rather than exporting to sentence-transformers first)
means any model the loader takes -- folder, export, training workdir, GGUF -- is scored exactly as
our own evaluation encodes it: the same lengths and prefix, bucketed batches over the device mesh,
and the dot product the model was trained and retrieves with. mteb's own batch size is ignored:
the mesh wants batches that are a multiple of the device count, and each batch shape compiles once.

Prompts. mteb asks for queries or documents (or neither: STS, classification, clustering). The text
put in front is, first found: `prompts` (mteb's keys: "TASK-query", "TASK", "TYPE-query", "TYPE",
"query" / "document"); for queries with an `instruction_template` such as "Instruct: {instruction}
\\nQuery: ", the task's instruction (mteb's choice of it) in that template; for queries otherwise the
model's own query prefix, the one it was trained with. Documents and untyped texts get none, as in
training. Only queries are instructed, as instruction-tuned embedders are evaluated.

`beir_task` and `sts_task` read local files through bixse_jax.data.sources, so mteb scores the very
texts and judgments `bixse-jax eval` reads (title + text, qrels as given), offline; the test checks
that the two agree. mteb is an optional dependency (`pip install 'bixse-jax[mteb]'`): only this
module imports it.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
from datasets import Dataset, DatasetDict
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
from mteb.models.model_meta import ScoringFunction
from mteb.types import PromptType

from bixse_jax.data import sources
from bixse_jax.errors import UserError
from bixse_jax.eval.evaluate import TextEncoder, load_text_encoder


class MTEBEncoder(AbsEncoder):
    """mteb's EncoderProtocol over a TextEncoder; `load` builds one from anything the loader takes."""

    def __init__(self, text_encoder: TextEncoder, *, name: str | None = None, revision: str | None = None,
                 instruction_template: str | None = None, prompts: dict[str, str] | None = None):
        if instruction_template is not None and "{instruction}" not in instruction_template:
            raise UserError(f"instruction template {instruction_template!r} has no {{instruction}}")
        self.model = text_encoder
        self.instruction_template = instruction_template
        self.model_prompts = self.validate_task_to_prompt_name(prompts) if prompts else None
        config = text_encoder.encoder.config
        self.mteb_model_meta = ModelMeta(
            loader=None, name=name or model_name(text_encoder.source.split(" (")[0]), revision=revision,
            release_date=None, languages=None,
            n_parameters=sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(text_encoder.params)),
            memory_usage_mb=None, max_tokens=text_encoder.doc_max_len,
            embed_dim=text_encoder.dim or config.hidden_size, license=None, open_weights=True,
            public_training_code=None, public_training_data=None, framework=["JAX"],
            # The training score, and what `bixse-jax eval` ranks by: the cosine for a normalised model.
            similarity_fn_name=ScoringFunction.DOT_PRODUCT,
            use_instructions=bool(instruction_template or prompts), training_datasets=None)

    @classmethod
    def load(cls, name_or_path: str | pathlib.Path, *, name: str | None = None, revision: str | None = None,
             instruction_template: str | None = None, prompts: dict[str, str] | None = None,
             **load_kwargs: Any) -> "MTEBEncoder":
        """`load_text_encoder(name_or_path, **load_kwargs)` (query_prefix, max_len, batch_size, dtype,
        step, ...) wrapped; on a CPU, call `bixse_jax.parallel.one_cpu_device_per_core()` before it."""
        return cls(load_text_encoder(name_or_path, **load_kwargs), name=name or model_name(name_or_path),
                   revision=revision, instruction_template=instruction_template, prompts=prompts)

    def prefix(self, task_metadata: TaskMetadata, prompt_type: PromptType | None) -> str | None:
        """The text put before each input (None: the encoder's default, see the module docstring)."""
        prompt_name = get_prompt_name(self.model_prompts, task_metadata, prompt_type)
        if prompt_name is not None:
            return self.model_prompts[prompt_name]
        if prompt_type == PromptType.query and self.instruction_template:
            return self.get_task_instruction(task_metadata, prompt_type)
        return None

    def encode(self, inputs, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        return self.model.encode(texts, query=prompt_type == PromptType.query,
                                 prefix=self.prefix(task_metadata, prompt_type))


def model_name(name_or_path: str | pathlib.Path) -> str:
    """mteb files results under the model's name, which must read "organization/model": a hub name
    as it is, a local folder or workdir as bixse-jax/FOLDER."""
    text = str(name_or_path)
    if not pathlib.Path(text).exists() and text.count("/") == 1:
        return text
    return f"bixse-jax/{pathlib.Path(text).resolve().name or 'model'}"


# ----------------------------------------------------------------------------
# Local files as mteb tasks.
# ----------------------------------------------------------------------------


def _metadata(name: str, kind: str, main_score: str, path: str, split: str) -> TaskMetadata:
    return TaskMetadata(name=name, type=kind, main_score=main_score, description=f"{kind} on the local files {path}",
                        dataset={"path": path, "revision": "local"}, category="t2t", eval_splits=[split],
                        eval_langs=["eng-Latn"], modalities=["text"])


def beir_task(folder: str | pathlib.Path, split: str = "test", name: str | None = None) -> AbsTaskRetrieval:
    """A BEIR folder's split as an mteb retrieval task (main score nDCG@10)."""
    queries, corpus, qrels = sources.read_beir_eval(folder, split)
    relevant = {q: {d: _integer_grade(g, folder) for d, g in judged.items()} for q, judged in qrels.items()}
    split_data = {"queries": Dataset.from_list([{"id": q, "text": queries[q]} for q in qrels]),
                  "corpus": Dataset.from_list([{"id": d, "text": t} for d, t in corpus.items()]),
                  "relevant_docs": relevant, "top_ranked": None}

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = _metadata(name or pathlib.Path(folder).name, "Retrieval", "ndcg_at_10", str(folder), split)

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            self.dataset = {"default": {split: dict(split_data)}}
            self.data_loaded = True

    return LocalRetrieval()


def sts_task(path: str | pathlib.Path, name: str | None = None) -> AbsTaskSTS:
    """An STS Benchmark file as an mteb STS task (main score cosine Spearman), scores 0..5 as given / 5."""
    pairs = sources.read_sts(path)
    data = {"sentence1": [p.query for p in pairs], "sentence2": [p.document for p in pairs],
            "score": [p.grade for p in pairs]}

    class LocalSTS(AbsTaskSTS):
        metadata = _metadata(name or pathlib.Path(path).stem, "STS", "cosine_spearman", str(path), "test")
        min_score, max_score = 0, 1

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            self.dataset = DatasetDict({"test": Dataset.from_dict(data)})
            self.data_loaded = True

    return LocalSTS()


def local_task(path: str | pathlib.Path, split: str = "test") -> AbsTaskRetrieval | AbsTaskSTS:
    """A folder is a BEIR retrieval task, a file an STS task."""
    return beir_task(path, split) if pathlib.Path(path).is_dir() else sts_task(path)


def _integer_grade(grade: float, folder: str | pathlib.Path) -> int:
    if grade != int(grade):  # pytrec_eval, mteb's scorer, takes integer grades only
        raise UserError(f"{folder}: mteb needs integer relevance grades, got {grade}")
    return int(grade)


def scores(result) -> list[dict[str, Any]]:
    """mteb's ModelResult as plain rows: task, split, subset, main score and every score."""
    rows = []
    for task_result in result.task_results:
        for split, subsets in task_result.scores.items():
            for subset in subsets:
                rows.append({"task": task_result.task_name, "split": split, "subset": subset["hf_subset"],
                             "main_score": subset["main_score"],
                             "scores": {k: v for k, v in subset.items() if k not in ("hf_subset", "languages")}})
    return rows
