"""A model family defined and registered in this file alone loads and trains through the real loop.

The toy family ("toy_bag") is a bag of token embeddings through one tanh projection: its own config
class, Flax module (declaring its logical axes) and tensor names. No library file names it: the
loader, the encoder, the sharding and the training loop find everything through its record.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from typing import Any

import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from safetensors.numpy import save_file

from bixse_jax import train
from bixse_jax.errors import ConfigError
from bixse_jax.models import architectures, families, hf_io, sentence_model
from train_utils import flat_params, logged, pairs_jsonl, tiny_config

MODEL_TYPE = "toy_bag"
HF_CONFIG = {"model_type": MODEL_TYPE, "vocab_size": 30522, "hidden_size": 16, "max_position_embeddings": 64}


@dataclasses.dataclass(frozen=True)
class BagConfig:
    vocab_size: int = 30522
    hidden_size: int = 16
    max_position_embeddings: int = 64
    pad_token_id: int = 0
    model_type: str = MODEL_TYPE
    # The training-time settings the loop passes to every family.
    dtype: str = "float32"
    matmul_dtype: str | None = None
    remat: str = "none"
    attention_impl: str | None = None
    hidden_dropout_prob: float = 0.0
    lora: Any = None

    @property
    def position_offset(self) -> int:
        return 0

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> "BagConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in names}, **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("model_type", "vocab_size", "hidden_size", "max_position_embeddings")}


class BagModel(nn.Module):
    """Token states tanh(W e(token) + b): no mixing between tokens; mean pooling makes the bag."""
    config: BagConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic=True):
        cfg = self.config
        boxed = nn.with_logical_partitioning
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embed",
                     embedding_init=boxed(nn.initializers.normal(0.5), ("vocab", "embed")))(input_ids)
        return nn.tanh(nn.Dense(cfg.hidden_size, name="proj",
                                kernel_init=boxed(nn.initializers.lecun_normal(), ("embed", "mlp")),
                                bias_init=boxed(nn.initializers.zeros, ("mlp",)))(x))


def bag_torch_to_flax(name, array):
    """`embed.weight` -> embed/embedding; `proj.weight` ([out, in]) -> proj/kernel ([in, out])."""
    parent, leaf = name.rsplit(".", 1)
    if parent == "embed":
        return (parent, "embedding"), array
    return ((parent, "kernel"), array.T) if leaf == "weight" else ((parent, leaf), array)


def bag_flax_to_torch(params):
    out = {}
    for (parent, leaf), array in traverse_util.flatten_dict(params).items():
        array = np.asarray(array, np.float32)
        name = "weight" if leaf in ("kernel", "embedding") else leaf
        out[f"{parent}.{name}"] = np.ascontiguousarray(array.T if leaf == "kernel" else array)
    return out


TOY = families.Family(name="toy_bag", model_types=(MODEL_TYPE,), config_class=BagConfig, module=BagModel,
                      torch_to_flax=bag_torch_to_flax, flax_to_torch=bag_flax_to_torch)


@pytest.fixture
def toy():
    yield families.register(TOY)
    families.unregister(TOY)  # leave the registry as the other tests expect it


@pytest.fixture
def toy_dir(toy, tmp_path, minilm_path):
    """A toy_bag folder: a hand-written config.json, random weights under the toy's names, MiniLM's tokenizer."""
    out = tmp_path / "toy_bag"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(HF_CONFIG))
    config = BagConfig.from_hf_dict(HF_CONFIG)
    save_file(bag_flax_to_torch(jax.device_get(architectures.init_params(config, jax.random.key(0)))),
              str(out / "model.safetensors"))
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_path / name, out / name)
    return out


def test_the_toy_folder_loads_as_its_family(toy_dir):
    model = sentence_model.load_encoder(toy_dir)
    assert isinstance(model.config, BagConfig) and families.of(model.config) is TOY
    assert model.settings.pooling == "mean"
    axes = traverse_util.flatten_dict(model.encoder.param_axes(), is_leaf=lambda _, x: isinstance(x, tuple))
    assert axes == {("embed", "embedding"): ("vocab", "embed"), ("proj", "kernel"): ("embed", "mlp"),
                    ("proj", "bias"): ("mlp",)}
    ids = np.asarray(model.tokenizer.encode(["a red cat", "a blue dog"], 16)[0])[None]
    emb = np.asarray(model.encoder(model.params, ids, np.ones_like(ids)))
    assert emb.shape == (1, 16) and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)


def test_the_toy_family_trains_a_step_on_8_devices(toy_dir, tmp_path):
    """One step of the real training loop over the 8 devices: a finite loss, and the encoder moved."""
    assert len(jax.devices()) == 8
    config = tiny_config(toy_dir, pairs_jsonl(tmp_path / "pairs.jsonl"), num_steps=2, warmup_steps=0,
                         log_every=1, checkpoint_every=2, learning_rate=1e-2)
    summary, state = train.train(config, tmp_path / "run", show_progress=False)
    assert summary["steps"] == 2
    losses = logged(tmp_path / "run")
    assert logged(tmp_path / "run", "step")[1:] == [1, 2] and len(losses) == 2 and np.isfinite(losses).all()
    start = hf_io.load_pretrained(toy_dir)[1]
    moved = [np.abs(np.asarray(e) - np.asarray(s)).max()
             for e, s in zip(jax.tree.leaves(jax.device_get(state.params["encoder"])), jax.tree.leaves(start))]
    assert len(moved) == 3 and min(moved) > 1e-4  # embedding, kernel and bias all stepped
    assert all(np.isfinite(x).all() for x in flat_params(state))


def test_an_unknown_model_type_lists_every_registered_one(toy):
    with pytest.raises(ConfigError, match="model_type 'toy_cube' is not supported") as e:
        architectures.config_from_hf({"model_type": "toy_cube"})
    for model_type in ("bert", "modernbert", "llama", "qwen3", MODEL_TYPE):
        assert repr(model_type) in str(e.value)


def test_a_model_type_is_registered_once(toy):
    with pytest.raises(ValueError, match="toy_bag is already registered"):
        families.register(TOY)
    with pytest.raises(ValueError, match="bert is already registered"):
        families.register(dataclasses.replace(TOY, name="bert_again", model_types=("bert",)))
    assert families.for_model_type(MODEL_TYPE) is TOY and families.for_model_type("bert").name == "bert"


def test_unregistered_the_toy_type_is_unknown():
    assert MODEL_TYPE not in families.model_types()
    with pytest.raises(ConfigError, match="is not supported"):
        architectures.config_from_hf(HF_CONFIG)
