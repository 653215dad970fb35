"""sentence-transformers (6.x, PyTorch on the CPU) loads bixse-jax's exports and embeds as bixse-jax does."""

import numpy as np
import pytest

from conftest import skip_unless_ci  # noqa: E402

try:
    import torch  # noqa: F401
    import sentence_transformers
except ImportError as e:
    skip_unless_ci(f"interop test: needs torch==2.13.0 and sentence-transformers 6.x ({e})")

import bixse_jax  # noqa: E402

from _trained import QUERY_PREFIX, TEXTS, tiny_folder, train_tiny  # noqa: E402

TOLERANCE = 1e-5  # float32, two frameworks


def _st_embed(folder, texts, **kwargs) -> tuple[object, np.ndarray]:
    model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    return model, np.asarray(model.encode(list(texts), convert_to_numpy=True, **kwargs), np.float32)


def _report(name: str, diff: float) -> None:
    print(f"[interop] sentence-transformers {sentence_transformers.__version__} {name}: max abs diff {diff:.3g}")
    assert diff < TOLERANCE, f"{name}: max abs diff {diff}"


@pytest.fixture(scope="module")
def trained_export(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    workdir, _ = train_tiny(tiny_model_dir, root / "train")  # the only run here
    return bixse_jax.export_checkpoint(workdir, root / "st", "sentence-transformers")


def test_trained_export_embeds_like_bixse(trained_export):
    out = trained_export
    ours = bixse_jax.load_encoder(out)
    st, docs = _st_embed(out, TEXTS)
    assert st.max_seq_length == 24 and st.similarity_fn_name == "cosine"
    assert st.prompts.get("query") == QUERY_PREFIX
    _report("trained tiny BERT, documents", float(np.abs(docs - bixse_jax.encode(ours, TEXTS)).max()))
    # sentence-transformers has one length limit (the documents'), so queries use it on both sides.
    _, queries = _st_embed(out, TEXTS, prompt_name="query")
    _report("trained tiny BERT, queries with prompt",
            float(np.abs(queries - bixse_jax.encode(ours, TEXTS, query=True, max_len=24)).max()))
    assert np.abs(queries - docs).max() > 1e-3  # the prompt did change the embeddings


def test_the_model_card_loads_with_the_model_and_survives_its_save(trained_export, tmp_path):
    """SentenceTransformer(folder) reads README.md as its card and, untrained, writes it back unchanged."""
    from huggingface_hub import ModelCard
    card = (trained_export / "README.md").read_text()
    st = sentence_transformers.SentenceTransformer(str(trained_export), device="cpu")
    assert st._model_card_text == card
    assert st.model_card_data.base_model is None  # offline, a local folder: nothing to look up
    st.save(str(tmp_path / "resaved"))
    assert (tmp_path / "resaved" / "README.md").read_text() == card
    data = ModelCard.load(tmp_path / "resaved" / "README.md").data
    assert data.library_name == "sentence-transformers" and "bixse-jax" in data.tags

@pytest.mark.parametrize("pooling,normalize", [("cls", False), ("last", True)])
def test_pooling_variants(tiny_model_dir, tmp_path, pooling, normalize):
    model = bixse_jax.load_encoder(tiny_model_dir, pooling=pooling, normalize=normalize)
    out = bixse_jax.export_model(model, tmp_path / "st", "sentence-transformers")
    st, theirs = _st_embed(out, TEXTS)
    assert st.similarity_fn_name == ("cosine" if normalize else "dot")
    ours = bixse_jax.encode(model, TEXTS)
    assert normalize or np.abs(np.linalg.norm(ours, axis=1) - 1).max() > 1e-2
    _report(f"tiny BERT, {pooling} pooling, normalize={normalize}", float(np.abs(theirs - ours).max()))


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta"])
def test_roberta_family_export(minilm_path, tmp_path, model_type):
    model = bixse_jax.load_encoder(tiny_folder(tmp_path, model_type, minilm_path))
    out = bixse_jax.export_model(model, tmp_path / "st", "sentence-transformers")
    st, theirs = _st_embed(out, TEXTS)
    assert type(st[0].auto_model).__name__ == {"roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}[model_type]
    _report(f"tiny {model_type}", float(np.abs(theirs - bixse_jax.encode(model, TEXTS)).max()))


def test_minilm_zero_shot_export(minilm_path, tmp_path):
    minilm = bixse_jax.load_encoder(minilm_path)
    out = bixse_jax.export_model(minilm, tmp_path / "st", "sentence-transformers")
    _, exported = _st_embed(out, TEXTS)
    _, original = _st_embed(minilm_path, TEXTS)
    ours = bixse_jax.encode(minilm, TEXTS)
    _report("all-MiniLM-L6-v2 export vs bixse-jax", float(np.abs(exported - ours).max()))
    _report("all-MiniLM-L6-v2 export vs the original folder", float(np.abs(exported - original).max()))


def test_matryoshka_export_loads_with_truncate_dim(tiny_model_dir, tmp_path):
    """SentenceTransformer(folder, truncate_dim=K) gives the first K coordinates of bixse-jax's embedding
    (cut after its Normalize module), and its cosine is bixse-jax's `encode --dim K` cosine."""
    import dataclasses

    from bixse_jax import export, matryoshka
    model = dataclasses.replace(bixse_jax.load_encoder(tiny_model_dir), matryoshka_dims=(8, 16, 32))
    out = export.export_model(model, tmp_path / "st", "sentence-transformers")
    st = sentence_transformers.SentenceTransformer(str(out), device="cpu", truncate_dim=8)
    got = np.asarray(st.encode(TEXTS, convert_to_numpy=True), np.float32)
    ours = bixse_jax.encode(bixse_jax.load_encoder(out), TEXTS)
    assert got.shape == (len(TEXTS), 8)
    _report("Matryoshka export, truncate_dim=8", float(np.abs(got - ours[:, :8]).max()))
    prefix = matryoshka.truncate(ours, 8)
    _report("Matryoshka export, truncate_dim=8 cosines", float(np.abs(np.asarray(st.similarity(got, got)) - prefix @ prefix.T).max()))
