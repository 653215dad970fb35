"""transformers 4.x's FlaxBertModel loads bixse-jax's hf-flax exports and embeds as bixse-jax does.

transformers 5 has no Flax models, so this runs in a second venv (`.ci/interop.sh`) and skips
in the main one.
"""

import numpy as np
import pytest

try:
    import transformers
    from transformers import AutoTokenizer, FlaxAutoModel, FlaxBertModel
except Exception as e:  # not installed, or transformers >= 5 (Flax removed)
    pytest.skip(f"interop test: needs transformers>=4.57,<5 with its Flax models ({type(e).__name__}: {e}); "
                "run .ci/interop.sh", allow_module_level=True)

import bixse_jax  # noqa: E402
from bixse_jax import export  # noqa: E402
from flax import serialization, traverse_util  # noqa: E402

from _trained import QUERY_PREFIX, TEXTS, tiny_folder, train_tiny  # noqa: E402

TOLERANCE = 1e-5


def _hf_embed(folder, texts, max_len: int, *, ours, model_class=FlaxBertModel) -> tuple[object, np.ndarray]:
    """Mean over the attention mask of the Flax model's last hidden state, L2-normalised."""
    model = model_class.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="np")
    for row, ids in zip(batch["input_ids"], ours.tokenizer.encode(list(texts), max_len)):
        np.testing.assert_array_equal(row[:len(ids)], ids)  # both sides see the same tokens
    hidden = np.asarray(model(**batch).last_hidden_state, np.float64)
    mask = batch["attention_mask"][..., None].astype(np.float64)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return model, (pooled / np.linalg.norm(pooled, axis=1, keepdims=True)).astype(np.float32)


def _report(name: str, diff: float) -> None:
    print(f"[interop] transformers {transformers.__version__} Flax {name}: max abs diff {diff:.3g}")
    assert diff < TOLERANCE, f"{name}: max abs diff {diff}"


def _assert_all_weights_loaded(model, folder):
    """Nothing was freshly initialised: the model's parameters are the file's, pooler included."""
    ours = bixse_jax.load_encoder(folder)
    theirs = traverse_util.flatten_dict(model.params)
    assert ("pooler", "dense", "kernel") in theirs
    mine = traverse_util.flatten_dict({**ours.params, "pooler": export._pooler(ours)[0]})
    assert theirs.keys() == mine.keys()
    for k in mine:
        np.testing.assert_array_equal(np.asarray(theirs[k]), mine[k], err_msg="/".join(k))


@pytest.fixture(scope="module")
def workdir(tiny_model_dir, tmp_path_factory):
    return train_tiny(tiny_model_dir, tmp_path_factory.mktemp("train"))[0]


@pytest.mark.parametrize("shard", [None, "1MB"])
def test_trained_export_embeds_like_bixse(workdir, tmp_path, shard):
    kwargs = {"max_shard_size": shard} if shard else {}
    out = bixse_jax.export_checkpoint(workdir, tmp_path / "flax", "hf-flax", **kwargs)
    assert (out / "flax_model.msgpack.index.json").is_file() == bool(shard)
    ours = bixse_jax.load_encoder(out)
    model, docs = _hf_embed(out, TEXTS, 24, ours=ours)
    _assert_all_weights_loaded(model, out)
    _report(f"trained tiny BERT ({'sharded' if shard else 'one file'}), documents",
            float(np.abs(docs - bixse_jax.encode(ours, TEXTS)).max()))
    _, queries = _hf_embed(out, [QUERY_PREFIX + t for t in TEXTS], 16, ours=ours)
    _report("trained tiny BERT, queries with prompt", float(np.abs(queries - bixse_jax.encode(ours, TEXTS, query=True)).max()))


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta"])
def test_roberta_family_export(minilm_path, tmp_path, model_type):
    model = bixse_jax.load_encoder(tiny_folder(tmp_path, model_type, minilm_path))
    out = bixse_jax.export_model(model, tmp_path / "flax", "hf-flax")
    flax_model, theirs = _hf_embed(out, TEXTS, 24, ours=model, model_class=FlaxAutoModel)
    assert type(flax_model).__name__ == {"roberta": "FlaxRobertaModel", "xlm-roberta": "FlaxXLMRobertaModel"}[model_type]
    _assert_all_weights_loaded(flax_model, out)
    _report(f"tiny {model_type}", float(np.abs(theirs - bixse_jax.encode(model, TEXTS, max_len=24)).max()))


def test_minilm_zero_shot_export(minilm_path, tmp_path):
    minilm = bixse_jax.load_encoder(minilm_path)
    out = bixse_jax.export_model(minilm, tmp_path / "flax", "hf-flax")
    tree = serialization.msgpack_restore((out / "flax_model.msgpack").read_bytes())
    assert set(tree) == {"embeddings", "encoder", "pooler"}
    model, theirs = _hf_embed(out, TEXTS, 256, ours=minilm)
    _assert_all_weights_loaded(model, out)
    _report("all-MiniLM-L6-v2", float(np.abs(theirs - bixse_jax.encode(minilm, TEXTS)).max()))
