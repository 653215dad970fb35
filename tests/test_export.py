"""Export and import: both folder formats, re-import, atomic writes, errors, MiniLM round trip, 1 vs 8 devices."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import serialization, traverse_util
from safetensors.numpy import load_file

import bixse_jax
from bixse_jax import checkpoint, cli, export
from bixse_jax.eval.encode import encode_texts
from bixse_jax.models import hf_io

from interop._trained import QUERY_PREFIX, TEXTS, train_tiny

ST_FILES = {"1_Pooling/config.json", "2_Normalize/config.json", "README.md", "bixse.json", "config.json",
            "config_sentence_transformers.json", "model.safetensors", "modules.json", "sentence_bert_config.json",
            "tokenizer.json", "tokenizer_config.json", "vocab.txt"}
FLAX_FILES = {"README.md", "bixse.json", "config.json", "flax_model.msgpack", "tokenizer.json", "tokenizer_config.json",
              "vocab.txt"}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A 3-step run on all 8 devices: (workdir, final state)."""
    return train_tiny(tiny_model_dir, tmp_path_factory.mktemp("eight"))


def _files(folder: pathlib.Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _assert_same_params(a, b):
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_b[k]), np.asarray(flat_a[k]), err_msg="/".join(k))


def test_sentence_transformers_export_reimports_exactly(trained, tmp_path):
    workdir, state = trained
    out = export.export_checkpoint(workdir, tmp_path / "st", "sentence-transformers")
    assert _files(out) == ST_FILES
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((out / "sentence_bert_config.json").read_text()) == {"max_seq_length": 24, "do_lower_case": False}
    st_config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == {"query": QUERY_PREFIX} and st_config["default_prompt_name"] is None
    assert st_config["similarity_fn_name"] == "cosine"
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    assert pooling["word_embedding_dimension"] == 32
    tensors = load_file(str(out / "model.safetensors"))
    assert "encoder.layer.1.attention.self.query.weight" in tensors and tensors["pooler.dense.weight"].shape == (32, 32)

    sidecar = json.loads((out / "bixse.json").read_text())
    assert np.float32(sidecar["log_temperature"]) == np.asarray(state.params["log_temperature"])
    assert np.float32(sidecar["bias"]) == np.asarray(state.params["bias"])
    assert sidecar["source"]["step"] == 3 and sidecar["source"]["workdir"] == str(workdir)
    assert (sidecar["query_max_len"], sidecar["doc_max_len"], sidecar["query_prompt"]) == (16, 24, QUERY_PREFIX)

    model = bixse_jax.load_encoder(out)
    trained_params = jax.device_get(state.params["encoder"])
    _assert_same_params(trained_params, model.params)
    assert (model.log_temperature, model.bias) == (sidecar["log_temperature"], sidecar["bias"])
    assert (model.settings.pooling, model.settings.normalize, model.settings.query_prompt) == ("mean", True, QUERY_PREFIX)
    # Embeddings of the re-imported model are those of the trained parameters, prompt included.
    want_docs = encode_texts(model.encoder, trained_params, model.tokenizer, TEXTS, max_len=24)
    want_queries = encode_texts(model.encoder, trained_params, model.tokenizer, TEXTS, max_len=16, prefix=QUERY_PREFIX)
    np.testing.assert_array_equal(bixse_jax.encode(model, TEXTS), want_docs)
    np.testing.assert_array_equal(bixse_jax.encode(model, TEXTS, query=True), want_queries)
    assert not np.allclose(want_docs, want_queries)


def test_hf_flax_export_single_and_sharded(trained, tmp_path):
    workdir, state = trained
    trained_params = jax.device_get(state.params["encoder"])
    out = export.export_checkpoint(workdir, tmp_path / "flax", "hf-flax")
    assert _files(out) == FLAX_FILES
    tree = serialization.msgpack_restore((out / "flax_model.msgpack").read_bytes())
    assert set(tree) == {"embeddings", "encoder", "pooler"}
    assert tree["pooler"]["dense"]["kernel"].shape == (32, 32)
    _assert_same_params(trained_params, {k: tree[k] for k in ("embeddings", "encoder")})
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["hidden_size"] == 32 and config["num_hidden_layers"] == 2

    sharded = export.export_checkpoint(workdir, tmp_path / "sharded", "hf-flax", max_shard_size="1MB")
    index = json.loads((sharded / "flax_model.msgpack.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3 and shards[0] == "flax_model-00001-of-00003.msgpack"
    assert _files(sharded) == FLAX_FILES - {"flax_model.msgpack"} | {"flax_model.msgpack.index.json", *shards}
    flat = traverse_util.flatten_dict(tree, sep="/")
    assert set(index["weight_map"]) == set(flat)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in flat.values())
    for shard in shards:  # every shard holds exactly the names the index gives it
        names = set(traverse_util.flatten_dict(serialization.msgpack_restore((sharded / shard).read_bytes()), sep="/"))
        assert names == {k for k, v in index["weight_map"].items() if v == shard}
    for folder in (out, sharded):
        model = bixse_jax.load_encoder(folder)
        _assert_same_params(trained_params, model.params)
        assert model.settings.query_prompt == QUERY_PREFIX and model.doc_max_len == 24
    np.testing.assert_array_equal(hf_io.read_pooler(sharded)["dense"]["kernel"], tree["pooler"]["dense"]["kernel"])

    (sharded / shards[1]).unlink()
    with pytest.raises(hf_io.ModelLoadError, match="flax_model-00002-of-00003.msgpack"):
        bixse_jax.load_encoder(sharded)


def test_predict_relevance_is_the_calibrated_sigmoid(trained, tmp_path):
    workdir, state = trained
    model = bixse_jax.load_encoder(export.export_checkpoint(workdir, tmp_path / "st", "sentence-transformers"))
    queries, docs = TEXTS[:3], TEXTS[2:]
    p = bixse_jax.predict_relevance(model, queries, docs)
    q, d = bixse_jax.encode(model, queries, query=True), bixse_jax.encode(model, docs)
    t, b = float(state.params["log_temperature"]), float(state.params["bias"])
    want = 1 / (1 + np.exp(-(math.exp(t) * np.sum(q.astype(np.float64) * d, axis=1) + b)))
    np.testing.assert_allclose(p, want, rtol=1e-6)
    full = bixse_jax.predict_relevance(model, queries, docs, matrix=True)
    assert full.shape == (3, 3) and np.all((full > 0) & (full < 1))
    np.testing.assert_allclose(np.diag(full), p, rtol=1e-6)
    with pytest.raises(ValueError, match="as many documents as queries"):
        bixse_jax.predict_relevance(model, queries, docs[:2])
    with pytest.raises(ValueError, match="no learned t and b"):
        bixse_jax.predict_relevance(bixse_jax.load_encoder(_base_dir(workdir)), queries, docs)


def _base_dir(workdir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(json.loads((workdir / "config.json").read_text())["model"]["name_or_path"])


def _cli(*args: str) -> None:
    cli.main(["bixse-jax", "export", *args])


def test_cli_refuses_bad_targets_and_inputs(trained, minilm_path, tmp_path, capsys):
    workdir, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit) as exit_info:
        _cli("--workdir", str(workdir), "--format", "hf-flax", "--out", str(out))
    assert exit_info.value.code == 2 and "not empty" in capsys.readouterr().err
    assert _files(out) == {"keep.txt"}
    _cli("--workdir", str(workdir), "--format", "hf-flax", "--out", str(out), "--overwrite")
    assert json.loads(capsys.readouterr().out)["step"] == 3
    assert _files(out) == FLAX_FILES

    cases = [
        (["--workdir", str(workdir), "--format", "onnx", "--out", str(tmp_path / "a")], 2, "invalid choice: 'onnx'"),
        (["--workdir", str(workdir), "--step", "99", "--format", "hf-flax", "--out", str(tmp_path / "a")], 2,
         r"no checkpoint of step 99; there are steps \[3\]"),
        (["--workdir", str(tmp_path / "nowhere"), "--format", "hf-flax", "--out", str(tmp_path / "a")], 2,
         "is .* a bixse-jax training workdir"),
        (["--workdir", str(workdir), "--format", "hf-flax", "--out", str(workdir)], 2, "not empty"),
        (["--workdir", str(workdir), "--format", "hf-flax", "--out", str(workdir), "--overwrite"], 2,
         "which the export reads from"),
    ]
    no_checkpoint = tmp_path / "fresh"
    no_checkpoint.mkdir()
    (no_checkpoint / "config.json").write_text((workdir / "config.json").read_text())
    cases.append((["--workdir", str(no_checkpoint), "--format", "hf-flax", "--out", str(tmp_path / "a")], 2,
                  "no checkpoint to export"))
    other_base = tmp_path / "other_base"  # the run's checkpoints, but config.json names MiniLM
    other_base.mkdir()
    (other_base / "checkpoints").symlink_to(workdir / "checkpoints")
    run_config = json.loads((workdir / "config.json").read_text())
    run_config["model"]["name_or_path"] = str(minilm_path)
    (other_base / "config.json").write_text(json.dumps(run_config))
    cases.append((["--workdir", str(other_base), "--format", "hf-flax", "--out", str(tmp_path / "a")], 2,
                  r"encoder does not match the base model .*embeddings/word_embeddings/embedding: "
                  r"checkpoint \(30522, 32\), model \(30522, 384\)"))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 32, "num_attention_heads": 4}))
    cases.append((["--model", str(gpt2), "--format", "hf-flax", "--out", str(tmp_path / "a")], 2, "not supported"))
    for argv, code, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            _cli(*argv)
        assert exit_info.value.code == code, argv
        assert re.search(message, capsys.readouterr().err), (argv, message)
    assert not (tmp_path / "a").exists()
    assert (workdir / "checkpoints" / "3").is_dir()


def test_failed_export_leaves_nothing_half_written(trained, tmp_path, monkeypatch):
    workdir, _ = trained
    model = checkpoint.restore_model(workdir)

    def broken_copy(source, tmp):
        assert (tmp / "model.safetensors").is_file()  # midway: the weights are already written
        raise OSError("disk full")

    monkeypatch.setattr(export, "_copy_tokenizer", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        export.export_model(model, tmp_path / "st", "sentence-transformers")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    old = export.export_model(model, tmp_path / "st", "sentence-transformers")
    before = {name: (old / name).read_bytes() for name in _files(old)}
    monkeypatch.setattr(hf_io, "save_flax_weights", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        export.export_model(model, tmp_path / "st", "hf-flax", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["st"]
    assert {name: (old / name).read_bytes() for name in _files(old)} == before


def test_minilm_round_trip_is_exact(minilm_path, tmp_path):
    """Real MiniLM in, sentence-transformers out, in again: same parameters, pooler and settings."""
    minilm = bixse_jax.load_encoder(minilm_path)
    out = bixse_jax.export_model(minilm, tmp_path / "st", "sentence-transformers")
    again = bixse_jax.load_encoder(out)
    _assert_same_params(minilm.params, again.params)
    assert again.settings == minilm.settings == hf_io.SentenceSettings("mean", True, 256, "")
    assert again.log_temperature is None and again.bias is None
    source, exported = load_file(str(minilm_path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(exported) == set(source) - {"embeddings.position_ids"}
    for name in exported:  # the very tensors of the original file, pooler included
        np.testing.assert_array_equal(exported[name], source[name], err_msg=name)
    assert json.loads((out / "bixse.json").read_text())["pooler"] == "pretrained"
    flax_out = bixse_jax.export_model(again, tmp_path / "flax", "hf-flax")
    _assert_same_params(minilm.params, bixse_jax.load_encoder(flax_out).params)
    np.testing.assert_array_equal(hf_io.read_pooler(flax_out)["dense"]["kernel"], source["pooler.dense.weight"].T)


def test_one_and_eight_device_runs_export_alike(trained, tiny_model_dir, tmp_path_factory, tmp_path):
    """Exports are a pure function of the parameters, whatever mesh trained them.

    Training itself is not bit-identical across mesh sizes (gradient sums reduce in another
    order, ~1e-7 after 3 steps), so the two runs' model.safetensors agree in layout and to 1e-6 in
    value, while each export's bytes equal those of its own run's final parameters exactly.
    """
    from safetensors.numpy import save as safetensors_bytes

    runs = {8: trained, 1: train_tiny(tiny_model_dir, tmp_path_factory.mktemp("one"), devices=1)}
    outs = {}
    for n, (workdir, state) in runs.items():
        outs[n] = export.export_checkpoint(workdir, tmp_path / f"st{n}", "sentence-transformers")
        model = checkpoint.restore_model(workdir)
        pooler, _ = export._pooler(model)
        params = {**jax.device_get(state.params["encoder"]), "pooler": pooler}
        want = safetensors_bytes(hf_io.flax_to_torch(params), metadata={"format": "pt"})
        assert (outs[n] / "model.safetensors").read_bytes() == want
    assert _files(outs[1]) == _files(outs[8])
    for name in _files(outs[1]) - {"model.safetensors", "bixse.json", "README.md"}:  # the last two hold t and b
        assert (outs[1] / name).read_bytes() == (outs[8] / name).read_bytes(), name
    one, eight = load_file(str(outs[1] / "model.safetensors")), load_file(str(outs[8] / "model.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in one.items()} == {k: (v.shape, v.dtype) for k, v in eight.items()}
    assert max(float(np.abs(one[k] - eight[k]).max()) for k in one) < 1e-6
    sidecars = [json.loads((outs[n] / "bixse.json").read_text()) for n in (1, 8)]
    assert abs(sidecars[0]["bias"] - sidecars[1]["bias"]) < 1e-5
    # A checkpoint written by an 8-device run exports the same from a 1-device process.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    cli = subprocess.run([sys.executable, "-m", "bixse_jax.cli", "export", "--workdir", str(trained[0]),
                          "--format", "sentence-transformers", "--out", str(tmp_path / "cli")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    for name in _files(outs[8]) - {"bixse.json"}:
        assert (tmp_path / "cli" / name).read_bytes() == (outs[8] / name).read_bytes(), name


def test_sentence_transformers_6_settings_are_read(tmp_path):
    """Folders saved by sentence-transformers >= 6: `pooling_mode` strings, length in the tokenizer config."""
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.base.modules.normalize.Normalize"}]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "lasttoken"}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"transformer_task": "feature-extraction"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 200}))
    assert hf_io.read_sentence_settings(tmp_path) == hf_io.SentenceSettings("last", True, 200, "")
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "max"}))
    with pytest.raises(hf_io.ModelLoadError, match="pooling_mode 'max' not supported"):
        hf_io.read_sentence_settings(tmp_path)


def test_bad_sidecar_names_file_and_field(tiny_model_dir, tmp_path):
    out = bixse_jax.export_model(bixse_jax.load_encoder(tiny_model_dir), tmp_path / "flax", "hf-flax")
    sidecar = json.loads((out / "bixse.json").read_text())
    (out / "bixse.json").write_text(json.dumps({**sidecar, "pooling": "max"}))
    with pytest.raises(hf_io.ModelLoadError, match=r"bixse.json: field 'pooling'"):
        bixse_jax.load_encoder(out)
    (out / "bixse.json").write_text(json.dumps({**sidecar, "normalize": "yes"}))
    with pytest.raises(hf_io.ModelLoadError, match=r"bixse.json: field 'normalize' must be bool"):
        bixse_jax.load_encoder(out)
