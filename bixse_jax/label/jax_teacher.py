"""A decoder LLM run by bixse-jax as the teacher: one forward per batch, logits at the last position only.

The decoder module is the encoders' own (models/decoder.py, loaded by hf_io from an HF folder or
a .gguf file); the LM head is the tied embedding table or the checkpoint's `lm_head.weight`, and
it multiplies only the last position's hidden state, so no [B, T, vocab] array is formed. Prompts
are sorted by length, cut into batches padded on the left to a few bucket lengths (few
compilations; the answer position is the last column of every row), and each batch is split over
the (data, fsdp) mesh: parameters follow the encoders' logical-axis sharding, so `fsdp > 1` splits
a teacher too big for one device. Positions count real tokens only, so padding does not change a
row's logits.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bixse_jax import parallel
from bixse_jax.data.batching import bucket_length
from bixse_jax.data.tokenizer import Tokenizer
from bixse_jax.errors import UserError
from bixse_jax.label import prompts
from bixse_jax.label.grades import Outcome, grade_token_ids
from bixse_jax.models import architectures, bert, families, hf_io

# Padded prompt lengths: prompts are long, so finer steps than the encoders' buckets.
PROMPT_BUCKETS = (64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1536, 2048, 3072, 4096, 8192)


def left_pad(seqs: Sequence[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, length] ids and attention mask, each sequence ending at the last column."""
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, length - len(s):], mask[i, length - len(s):] = s, 1
    return ids, mask


def lm_head(config, params: dict, model_dir: pathlib.Path) -> np.ndarray:
    """[vocab, hidden] output matrix: `lm_head.weight`, else the tied input embeddings (at the path
    the family's record names)."""
    head = hf_io.read_tensor(model_dir, "lm_head.weight")
    if head is not None:
        return head
    if not getattr(config, "tie_word_embeddings", False):
        raise hf_io.ModelLoadError(f"{model_dir}: no lm_head.weight and tie_word_embeddings is false; "
                                   "the teacher needs the LM head")
    tree = params
    for key in families.of(config).lm_embedding:
        tree = tree[key]
    return np.asarray(tree)


class JaxTeacher:
    """Grades (query, document) rows with a decoder loaded from `model_path` (HF folder or .gguf)."""

    def __init__(self, model_path: str | os.PathLike, *, grades: Sequence[int], template: str,
                 use_chat_template: bool = True, dtype: str = "float32", matmul_dtype: str | None = None,
                 dense_impl: str = "xla",
                 batch_size: int = 16, max_len: int | None = None, max_doc_tokens: int = 384,
                 mesh: Mesh | None = None, name: str | None = None):
        if jax.process_count() > 1:  # every process would read all rows and write the same file
            raise UserError("the in-process teacher runs on one host; give each host its own --input and --out")
        config, params, model_dir = hf_io.load_pretrained(model_path, dtype=dtype, matmul_dtype=matmul_dtype,
                                                          dense_impl=dense_impl)
        if families.of(config).lm_embedding is None:
            language_models = ", ".join(t for f in families.registered() if f.lm_embedding for t in f.model_types)
            raise UserError(f"{model_path}: the teacher must be a decoder LLM ({language_models}), "
                            f"got {config.model_type}")
        self.name = name or pathlib.Path(model_path).name
        self.grades = list(grades)
        self.config = config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        self.tokenizer = Tokenizer.from_model_dir(model_dir, fallback_pad_id=pad)
        self.tokenizer.check_vocab(config.vocab_size, source=str(model_dir))
        self.grade_ids = grade_token_ids(self.tokenizer, self.grades)
        chat = prompts.read_chat_template(model_path, model_dir) if use_chat_template else None
        self.prompt = prompts.PromptBuilder(template, chat, **prompts.special_tokens(model_dir))
        limit = config.max_position_embeddings
        self.max_len = min(max_len or limit, limit)
        self.max_doc_tokens = max_doc_tokens
        self.mesh = mesh or parallel.make_mesh()
        self.batch_size = -(-batch_size // self.mesh.size) * self.mesh.size  # a multiple of the devices
        self.stats = {"batches": 0, "padded_lengths": {}}
        head = lm_head(config, params, model_dir)
        if dtype == "bfloat16":  # half the memory and bandwidth; the module computes in bfloat16 anyway
            params = jax.tree.map(lambda x: np.asarray(x, jnp.bfloat16), params)
            head = np.asarray(head, jnp.bfloat16)
        shardings = parallel.param_shardings({"encoder": params}, self.mesh,
                                             encoder_axes=architectures.param_axes(config))["encoder"]
        fsdp = self.mesh.shape[parallel.FSDP_AXIS]
        head_sharding = (NamedSharding(self.mesh, P(None, parallel.FSDP_AXIS)) if head.shape[1] % fsdp == 0
                         else parallel.replicated(self.mesh))
        self.params = jax.device_put(params, shardings)
        self.head = jax.device_put(head, head_sharding)
        self._forward = self._build_forward(shardings, head_sharding)

    def _build_forward(self, param_shardings, head_sharding):
        module = architectures.module(self.config)
        einsum = bert.attention_einsum(self.config)  # the LM head multiplies like the layers
        grade_ids = jnp.asarray(self.grade_ids)

        def forward(params, head, ids, mask):
            hidden = module.apply({"params": params}, ids, mask)[:, -1]  # left padding: the answer position
            logits = einsum("bh,vh->bv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
            log_z = jax.nn.logsumexp(logits, axis=-1)
            grade_logits = logits[:, grade_ids]
            return grade_logits, jax.nn.logsumexp(grade_logits, axis=-1) - log_z

        batch = parallel.batch_sharding(self.mesh)
        return jax.jit(forward, in_shardings=(param_shardings, head_sharding, batch, batch),
                       out_shardings=parallel.replicated(self.mesh))

    def prompt_ids(self, rows: Sequence[dict[str, Any]]) -> list[np.ndarray]:
        """Token ids of each row's prompt, its document cut to `max_doc_tokens` tokens first."""
        docs = [r["document"] for r in rows]
        doc_ids = self.tokenizer.encode(docs, self.max_doc_tokens + 1, add_special_tokens=False)
        docs = [self.tokenizer.decode(ids[:self.max_doc_tokens]) if len(ids) > self.max_doc_tokens else d
                for d, ids in zip(docs, doc_ids)]
        texts = [self.prompt.build(r["query"], d) for r, d in zip(rows, docs)]
        # A rendered chat template holds its special tokens already; a plain prompt gets the tokenizer's.
        return self.tokenizer.encode(texts, self.max_len + 1, add_special_tokens=not self.prompt.uses_chat_template)

    def logits(self, seqs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One padded batch (at most batch_size prompts) -> ([n, G] grade logits, [n] log grade mass)."""
        n = len(seqs)
        seqs = list(seqs) + [seqs[-1]] * (self.batch_size - n)  # a fixed batch shape; extra rows dropped
        length = bucket_length(max(len(s) for s in seqs), PROMPT_BUCKETS, self.max_len)
        ids, mask = left_pad(seqs, length, self.tokenizer.pad_id)
        sharding = parallel.batch_sharding(self.mesh)
        grade_logits, log_mass = self._forward(self.params, self.head, jax.device_put(ids, sharding),
                                               jax.device_put(mask, sharding))
        self.stats["batches"] += 1
        self.stats["padded_lengths"][length] = self.stats["padded_lengths"].get(length, 0) + 1
        return np.asarray(grade_logits)[:n], np.asarray(log_mass)[:n]

    def label(self, rows: Sequence[dict[str, Any]]) -> Iterator[list[Outcome]]:
        """Outcomes batch by batch, shortest prompts first; a prompt over max_len fails alone."""
        seqs = self.prompt_ids(rows)
        too_long = [i for i, s in enumerate(seqs) if len(s) > self.max_len]
        if too_long:
            yield [Outcome(rows[i], error=f"prompt has more than {self.max_len} tokens (--max-len)") for i in too_long]
        order = sorted((i for i, s in enumerate(seqs) if len(s) <= self.max_len), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            grade_logits, log_mass = self.logits([seqs[i] for i in idx])
            yield [Outcome(rows[i], grade_logits=g, grade_mass=float(np.exp(m)))
                   for i, g, m in zip(idx, grade_logits, log_mass)]
