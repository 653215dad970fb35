"""experiments/reproduce.py: its commands build the configs it runs, and a tiny end-to-end sweep."""

import importlib.util
import json
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
    """A script of experiments/ as a module (they import each other by file name)."""
    if str(REPO / "experiments") not in sys.path:
        sys.path.insert(0, str(REPO / "experiments"))
    return importlib.import_module(name)


repro = _load("reproduce")


_PARSE_ONLY = """
import sys
import bixse_jax.train
def parsed(config, workdir, **kw):
    print("CONFIG" + config.to_json())
    sys.exit(0)
bixse_jax.train.train = parsed  # the command's own flag parsing, without the training
from bixse_jax.commands import train
train.main(["bixse-jax train"] + sys.argv[1:])
"""


def _cli_config(cmd: str) -> dict:
    """The config `bixse-jax train` builds from this command line (its absl + ml_collections flags)."""
    argv = shlex.split(cmd)
    assert argv[:2] == ["bixse-jax", "train"]
    out = subprocess.run([sys.executable, "-c", _PARSE_ONLY, *argv[2:]], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout[out.stdout.index("CONFIG") + 6:])


@pytest.mark.parametrize("cell", [
    repro.Cell("trecdl", "BiXSE no bias", 2, 3e-5, "test", fold=3),
    repro.Cell("stsb", "BiXSE binarised", 1, 1e-4, "select"),
    repro.Cell("scifact", "BiXSE diagonal-only", 0, 1e-5, "select"),
    repro.Cell("scifact", "pairwise BCE", 0, 1e-5, "test"),
    repro.Cell("trecdl", repro.ZERO_SHOT, 0, 1e-5, "test", fold=0),
])
def test_printed_command_builds_the_config_the_driver_runs(cell, monkeypatch):
    monkeypatch.chdir(REPO)
    cmd = repro.command(cell, "../shared/data", "some/model", "runs")
    assert _cli_config(cmd) == json.loads(repro.build_config(cell, "../shared/data",
                                                                                   "some/model").to_json())
    config = repro.build_config(cell, "../shared/data", "some/model")
    assert config.seed == cell.seed and config.train.learning_rate == cell.learning_rate
    assert (config.data.folds, config.data.fold) == ((5, cell.fold) if cell.fold is not None else
                                                     (5, 0) if cell == repro.Cell("scifact", "BiXSE diagonal-only", 0,
                                                                                  1e-5, "select") else (0, 0))


def test_learning_rate_selection_uses_dev_scores_only():
    rows = [{"dataset": "stsb", "phase": "select", "learning_rate": lr, "value": v}
            for lr, v in ((1e-5, 0.80), (1e-5, 0.70), (1e-4, 0.76), (1e-4, 0.76))]
    rows += [{"dataset": "scifact", "phase": "select", "learning_rate": lr, "value": v}
             for lr, v in ((1e-5, 0.5), (1e-5, 0.6), (3e-5, 0.7))]  # 3e-5 lacks InfoNCE: not complete
    rows += [{"dataset": "stsb", "phase": "test", "learning_rate": 1e-5, "value": 0.99}]
    assert repro.choose_learning_rates(rows, ["trecdl", "stsb", "scifact"]) == {"stsb": 1e-4, "scifact": 1e-5,
                                                                                "trecdl": 1e-5}
    with pytest.raises(RuntimeError, match="trecdl takes its learning rate from scifact"):
        repro.choose_learning_rates(rows, ["trecdl", "stsb"])


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _tiny_data_root(root: pathlib.Path) -> pathlib.Path:
    """Miniature STS-B, SciFact and TREC-DL folders in the real layouts."""
    rng = np.random.default_rng(0)
    words = ["protein", "cell", "gene", "virus", "brain", "heart", "drug", "trial", "mouse", "cancer"]
    sts = root / "stsbenchmark"
    sts.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        lines = [f"main-captions\tMSRvid\t2012test\t{i:04d}\t{rng.uniform(0, 5):.3f}\t"
                 f"{' '.join(rng.choice(words, 4))}\t{' '.join(rng.choice(words, 5))}" for i in range(64)]
        (sts / f"sts-{split}.csv").write_text("\n".join(lines) + "\n")
    for name, splits, grades in (("scifact", ("train", "test"), (1,)), ("trec-dl19", ("test",), (0, 1, 2, 3))):
        folder = root / name
        (folder / "qrels").mkdir(parents=True)
        _write_jsonl(folder / "corpus.jsonl", [{"_id": f"d{j}", "title": "", "text": " ".join(rng.choice(words, 6))}
                                               for j in range(30)])
        _write_jsonl(folder / "queries.jsonl", [{"_id": f"q{i}", "text": " ".join(rng.choice(words, 3))}
                                                for i in range(40)])
        for s, split in enumerate(splits):
            rows = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{(i + k) % 30}\t{grades[k % len(grades)]}"
                                                     for i in range(s * 20, s * 20 + 20) for k in range(4)]
            (folder / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def test_finished_runs_are_read_from_files_and_folders(tmp_path):
    row = lambda name, **kw: json.dumps({"name": name, **kw}) + "\n"
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "gpu.jsonl").write_text(row("a", value=0.5) + row("b", error="out of memory"))
    (tmp_path / "runs" / "cpu.jsonl").write_text(row("c", value=0.7) + "\n")
    (tmp_path / "runs" / "notes.txt").write_text("not results")
    (tmp_path / "more.jsonl").write_text(row("d", value=0.1))
    assert repro.finished_names(f"{tmp_path / 'runs'},{tmp_path / 'more.jsonl'}") == {"a", "c", "d"}
    assert repro.finished_names(None) == set()
    assert repro.finished_names(str(REPO / "docs" / "results_runs")) >= {"test-stsb-BiXSE-lr3e-05-seed0"}


@pytest.fixture(scope="module")
def tiny_model_512(tmp_path_factory, tiny_model_dir) -> pathlib.Path:
    """The tiny test BERT with 512 positions, enough for the real configs' 256-token documents."""
    import shutil

    import jax

    from bixse_jax.models.bert import EncoderConfig, init_params
    from bixse_jax.models.hf_io import save_pretrained
    from conftest import TINY_BERT

    out = tmp_path_factory.mktemp("tiny_bert_512")
    config = EncoderConfig(**{**TINY_BERT, "max_position_embeddings": 512})
    save_pretrained(out, config, jax.device_get(init_params(config, jax.random.key(0))))
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, out / name)
    return out


def test_tiny_sweep_end_to_end_and_its_report(tiny_model_512, tmp_path):
    data_root = _tiny_data_root(tmp_path / "data")
    out = tmp_path / "out"
    summary = repro.main(["--data-root", str(data_root), "--model", str(tiny_model_512), "--out", str(out),
                          "--variants", "BiXSE", "--seeds", "0", "--learning-rates", "1e-3,1e-2",
                          "--steps", "2", "--compile-cache", str(tmp_path / "jax_cache")])
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # selection: 2 data sets with dev data x 2 losses x 2 rates; test: 7 zero-shot + 1 loss x 7 (5 TREC folds).
    assert summary["runs"] == len(results) == 8 + 7 + 7
    assert summary["finished"] == len(results), [r for r in results if "value" not in r]
    chosen = json.loads((out / "selection.json").read_text())["learning_rates"]
    assert chosen["trecdl"] == chosen["scifact"] and set(chosen) == {"stsb", "scifact", "trecdl"}
    test = [r for r in results if r["phase"] == "test"]
    assert {r["learning_rate"] for r in test if r["dataset"] == "stsb"} == {chosen["stsb"]}
    assert sorted(r["fold"] for r in test if r["dataset"] == "trecdl" and r["variant"] == "BiXSE") == [0, 1, 2, 3, 4]
    zero = [r for r in test if r["variant"] == repro.ZERO_SHOT]
    assert all(r["steps"] == 0 and r["bias"] == -10.0 for r in zero)
    assert all(r["steps"] == 2 and r["bias"] != -10.0 for r in test if r["variant"] == "BiXSE")
    assert not list((out / "work").glob("*")), "run folders are deleted after each run"

    report = _load("make_results")
    table = report.table(results)
    assert table["stsb"]["BiXSE"]["n"] == 1 and table["trecdl"]["BiXSE"]["n"] == 1
    trec = [r["value"] for r in test if r["dataset"] == "trecdl" and r["variant"] == "BiXSE"]
    assert table["trecdl"]["BiXSE"]["mean"] == pytest.approx(np.mean(trec))
    md = report.markdown(results)
    assert "| zero-shot |" in md and "| BiXSE |" in md and "| InfoNCE | n/a | n/a | n/a |" in md
    selection = report.selection_markdown(results)
    assert selection.count("| stsb (spearman) |") == 2 and selection.count("| scifact (ndcg@10) |") == 2
    folds = report.folds_markdown(results)
    assert "| BiXSE | 0 |" in folds and "incomplete" not in folds and "not run" not in folds
    assert f"| {len(results)} |" in report.runs_markdown(results)
    png = report.plot(results, tmp_path / "results.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
