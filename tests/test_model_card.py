"""Model cards: every export's README.md is a huggingface_hub ModelCard whose metadata and text tell the run."""

import json
import math
import shutil

import pytest
from huggingface_hub import ModelCard

from bixse_jax import export, model_card, train
from bixse_jax.checkpoint import CheckpointError
from bixse_jax.default_config import evaluator
from bixse_jax.models.sentence_model import load_encoder

from interop._trained import pairs_jsonl, run_config

COMMAND = "bixse-jax train --config configs/demo.py --workdir run"


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A 3-step run with an STS evaluator (8 pairs): (workdir, summary)."""
    root = tmp_path_factory.mktemp("card")
    sts = root / "sts-test.csv"
    words = ["red cat", "blue dog", "fast car", "slow boat", "big tree", "small cup", "old book", "new shoe"]
    sts.write_text("".join(f"g\tf\ty\t{i}\t{i % 6}.0\t{w} runs\t{w} sleeps\n" for i, w in enumerate(words)))
    config = run_config(tiny_model_dir, pairs_jsonl(root / "pairs.jsonl"))
    config.evals.sts = evaluator("sts", path=str(sts))
    summary, _ = train.train(config, root / "run", show_progress=False, command=COMMAND)
    return root / "run", summary


@pytest.mark.parametrize("fmt,library,pipeline", [("sentence-transformers", "sentence-transformers", "sentence-similarity"),
                                                  ("hf", "transformers", "feature-extraction"),
                                                  ("hf-flax", "transformers", "feature-extraction")])
def test_every_format_gets_a_card_that_model_card_load_parses(run, tmp_path, fmt, library, pipeline):
    workdir, summary = run
    out = export.export_checkpoint(workdir, tmp_path / fmt, fmt)
    card = ModelCard.load(out / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag) == (library, pipeline)
    assert {"bixse-jax", "loss:bixse"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is no hub id; the text names it
    assert card.data.model_name == "run-step3"
    after, before = summary["after"]["sts"], summary["before"]["sts"]
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["spearman"].metric_value == after["spearman"]
    assert (results["spearman"].task_type, results["spearman"].dataset_name) == ("sts", "sts")
    assert set(results) == set(after)  # spearman, pearson, ece, brier
    text = card.text
    t, b = summary["log_temperature"], summary["bias"]
    assert f"t = {t:.6g} and b = {b:.6g}" in text
    p06 = 1 / (1 + math.exp(-(math.exp(t) * 0.6 + b)))
    assert f"| p(relevant) | " in text and f" {p06:.3f} |" in text
    assert f"A cosine of {-b / math.exp(t):.3f} is an even chance" in text
    assert "- steps: 3 of 3, global batch 16 pairs, learning rate 0.001" in text
    assert "init_bias = -10.0" in text and "learn_temperature = True" in text
    assert f"```bash\n{COMMAND}\n```" in text
    assert f"| sts | sts `{workdir.parent / 'sts-test.csv'}` | spearman | {before['spearman']:.4f} | " \
           f"{after['spearman']:.4f} |" in text
    assert ("prompt_name=\"query\"" in text) == (fmt == "sentence-transformers")


def test_an_untrained_conversion_says_so_and_has_no_results(tiny_model_dir, tmp_path):
    out = export.export_model(load_encoder(tiny_model_dir), tmp_path / "zero", "hf")
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results is None and card.data.library_name == "transformers"
    assert "untrained here" in card.text and "## Training" not in card.text
    assert "## Relevance probability" not in card.text  # no t and b without a run or bixse.json


def test_base_model_metadata_is_a_hub_id_only():
    assert model_card.hub_id("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert model_card.hub_id("/abs/path/model") is None and model_card.hub_id("a/b/c") is None
    assert model_card.hub_id(None) is None


def test_a_damaged_summary_names_its_line_and_writes_nothing(run, tmp_path):
    workdir = shutil.copytree(run[0], tmp_path / "run")
    with (workdir / "summary.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(CheckpointError, match=r"summary\.jsonl:2: cannot read JSON"):
        export.export_checkpoint(workdir, tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()
    assert json.loads((workdir / "summary.jsonl").read_text().splitlines()[0])["steps"] == 3
