"""One record per model family, declared once in the family's module; everything else reads it.

A family is the Flax module of one or more of config.json's `model_type`s, with its config class,
the renaming of transformers' tensor names, and the switches where families behave differently
(pooling, causality, LoRA targets, what an export writes). Loading, export, LoRA and the teacher
read those fields, so nothing outside a family's module asks which family a model is. A family of
the package registers itself at the bottom of its module (listed in BUILTIN_MODULES); one defined
elsewhere (a test's toy) calls `register` before its config.json is read.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from bixse_jax.errors import ConfigError

# The package's families, imported (so registered) before the first look-up.
BUILTIN_MODULES = ("bixse_jax.models.bert", "bixse_jax.models.modernbert", "bixse_jax.models.decoder")

TorchToFlax = Callable[[str, np.ndarray], "tuple[tuple[str, ...], np.ndarray] | None"]
FlaxToTorch = Callable[[dict], "dict[str, np.ndarray]"]


class ModelConfig(Protocol):
    """What the rest of the package reads of any family's config (a frozen dataclass)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    pad_token_id: int | None
    hidden_dropout_prob: float
    lora: Any  # lora.LoraSpec | None; dataclasses.replace sets it

    @property
    def position_offset(self) -> int: ...

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> "ModelConfig": ...

    def to_hf_dict(self) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True, eq=False)  # a record compared by identity: the registry holds each once
class Family:
    """A model family: what builds it, how its weights are named, and how it differs from the others.

    config_class: `from_hf_dict(config.json's dict, **training overrides)` -> its frozen config.
    module: the Flax module class, `module(config)(input_ids, attention_mask, deterministic=...)`
      -> last hidden states [B, T, hidden]. Every parameter is boxed with nn.with_logical_partitioning:
      it shards by those names (parallel.py's rules).
    torch_to_flax / flax_to_torch: transformers' tensor name and [out, in] array <-> our parameter
      path and array (None: a tensor an embedder ignores), for loading and for exports.
    lora_linears / lora_default_targets: paths of the linear layers inside a layer (model.lora.targets
      match them by suffix), and the targets when none are given.
    default_pooling: of a folder without sentence-transformers modules.
    causal: a decoder LLM: attends causally unless `config.bidirectional` (the others refuse that
      option); its tokenizer may name no pad token (pad_token_id, else eos pads), and its exports
      pool the last token and write a tokenizer that names the pad token and appends eos as trained.
    lm_embedding: path of the token embedding table a tied LM head shares; None: not a language
      model, which the in-process teacher (label/jax_teacher.py) refuses.
    hf_architectures: model_type -> transformers' AutoModel class named in exported config.json
      (and save_pretrained's); a type absent cannot be exported.
    pooler_head: that class has a pooler head (BertModel), which exports carry (sentence embeddings
      never use it).
    hf_flax: transformers has Flax classes for it, so the hf-flax export format is offered.
    dtype_field: exported config.json also names the weights' dtype `dtype` (transformers 5's name),
      beside `torch_dtype`.
    base_model_scope: the top scope of the tree that transformers' AutoModel does not have (the
      decoders' `model`), dropped from PEFT module names.
    """

    name: str
    model_types: tuple[str, ...]
    config_class: type
    module: type
    torch_to_flax: TorchToFlax
    flax_to_torch: FlaxToTorch
    lora_linears: tuple[str, ...] = ()
    lora_default_targets: tuple[str, ...] = ()
    default_pooling: str = "mean"
    causal: bool = False
    lm_embedding: tuple[str, ...] | None = None
    hf_architectures: Mapping[str, str] = dataclasses.field(default_factory=dict)
    pooler_head: bool = False
    hf_flax: bool = False
    dtype_field: bool = True
    base_model_scope: str | None = None

    def __post_init__(self):
        if not self.model_types:
            raise ValueError(f"family {self.name!r} reads no model_type")
        if set(self.hf_architectures) - set(self.model_types):
            raise ValueError(f"family {self.name!r}: hf_architectures names model_types it does not read: "
                             f"{sorted(set(self.hf_architectures) - set(self.model_types))}")


_BY_MODEL_TYPE: dict[str, Family] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for name in BUILTIN_MODULES:
            importlib.import_module(name)


def register(family: Family) -> Family:
    """Adds `family` under each of its model_types; a model_type already taken is refused."""
    if family.module.__module__ not in BUILTIN_MODULES:  # one from outside meets the package's first
        _load_builtins()
    taken = [t for t in family.model_types if t in _BY_MODEL_TYPE]
    if taken:
        raise ValueError(f"model_type {', '.join(taken)} is already registered "
                         f"(family {_BY_MODEL_TYPE[taken[0]].name!r})")
    for model_type in family.model_types:
        _BY_MODEL_TYPE[model_type] = family
    return family


def unregister(family: Family) -> None:
    """Removes `family` (a test's toy, so later tests see the package's families only)."""
    for model_type in family.model_types:
        if _BY_MODEL_TYPE.get(model_type) is family:
            del _BY_MODEL_TYPE[model_type]


def registered() -> tuple[Family, ...]:
    """The families, each once: the package's in BUILTIN_MODULES' order (whichever was imported first),
    then the others as they were registered."""
    _load_builtins()
    found = list(dict.fromkeys(_BY_MODEL_TYPE.values()))
    rank = lambda f: BUILTIN_MODULES.index(f.module.__module__) if f.module.__module__ in BUILTIN_MODULES \
        else len(BUILTIN_MODULES)  # noqa: E731
    return tuple(sorted(found, key=rank))  # stable: the others keep their order


def model_types() -> tuple[str, ...]:
    """Every model_type some family reads, family by family (`registered`'s order)."""
    return tuple(t for family in registered() for t in family.model_types)


def for_model_type(model_type: Any) -> Family:
    """The family that reads config.json's `model_type`; ConfigError listing the types if none."""
    _load_builtins()
    if model_type not in _BY_MODEL_TYPE:
        raise ConfigError(f"model_type {model_type!r} is not supported; supported: {model_types()}")
    return _BY_MODEL_TYPE[model_type]


def of(config: ModelConfig) -> Family:
    """The family of a config object (by its model_type)."""
    return for_model_type(config.model_type)
