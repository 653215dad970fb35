"""The closing lines of `bixse-jax train`: metrics before -> after on one line, the model, next commands."""

from ml_collections import ConfigDict

from bixse_jax import run_report
from bixse_jax.default_config import base_config, evaluator

SUMMARY = {"workdir": "runs/my run", "steps": 120, "log_temperature": 2.5, "bias": -9.75,
           "before": {"demo": {"ndcg@10": 0.3841, "recall@10": 0.5, "recall@100": 0.9, "map": 0.2},
                      "sts": {"spearman": 0.8203, "pearson": 0.81}},
           "after": {"demo": {"ndcg@10": 0.6672, "recall@10": 0.7, "recall@100": 0.95, "map": 0.4},
                     "sts": {"spearman": 0.8511, "pearson": 0.84}}}


def _config() -> ConfigDict:
    c = base_config()
    c.evals.demo = evaluator("demo")
    c.evals.sts = evaluator("sts", path="../shared/data/stsbenchmark/sts-test.csv")
    c.evals.test = evaluator("rerank", path="../shared/data/trec-dl19", split="test", run_file="qrels")
    return c


def test_metrics_before_and_after_fit_one_line():
    line = run_report.metrics_line(SUMMARY)
    assert line == "demo ndcg@10 0.384 -> 0.667, recall@100 0.900 -> 0.950; sts spearman 0.820 -> 0.851"
    assert run_report.metrics_line({"workdir": "w", "steps": 1}) is None
    # An evaluator that ran only after training still shows, its before as n/a.
    assert run_report.metrics_line({"after": {"x": {"map": 0.5}}}) == "x map n/a -> 0.500"


def test_closing_lines_name_the_model_and_the_commands_for_this_run():
    lines = run_report.closing_lines(SUMMARY, _config(), total_steps=120, seconds=252.4)
    assert lines[0].startswith("bixse-jax: trained 120 steps in 4 min 12 s; final t = 2.500, b = -9.750")
    assert lines[1] == "before -> after: " + run_report.metrics_line(SUMMARY)
    assert "model: runs/my run (checkpoint 120); full summary: runs/my run/summary.jsonl" in lines
    assert "  bixse-jax export --workdir 'runs/my run' --format sentence-transformers --out 'runs/my run-st'" in lines
    assert lines[-2:] == ["  bixse-jax eval --model 'runs/my run' --sts ../shared/data/stsbenchmark/sts-test.csv",
                          "  bixse-jax eval --model 'runs/my run' --beir ../shared/data/trec-dl19 --split test "
                          "--rerank qrels"]
    assert not any(line.lstrip().startswith("{") for line in lines)


def test_a_stopped_run_says_how_to_resume():
    lines = run_report.closing_lines({**SUMMARY, "steps": 60}, _config(), total_steps=120)
    assert lines == ["bixse-jax: stopped at step 60 of 120; checkpoint in runs/my run/checkpoints. "
                     "Run the same command again to resume."]
