"""mteb through the bixse-jax wrapper scores as `bixse-jax eval` does (bixse_jax/eval/mteb_model.py).

The real MiniLM on a SciFact subset (a local mteb retrieval task) and an STS-B test subset (a local
STS task): mteb's own search, pytrec_eval and correlations give our nDCG@10 and Spearman. Offline:
the tasks are built from ../shared/data, nothing is fetched.
"""

import dataclasses
import json

import numpy as np
import pytest

import tiny_data
from conftest import skip_unless_ci

try:
    import mteb
except ImportError:
    skip_unless_ci("mteb is not installed (pip install 'bixse-jax[mteb]')")

from bixse_jax.commands import eval as eval_cmd  # noqa: E402
from bixse_jax.data import sources  # noqa: E402
from bixse_jax.eval import evaluate, mteb_model  # noqa: E402
from mteb.types import PromptType  # noqa: E402

MAX_LEN = 128  # SciFact abstracts cut short: the agreement, not the model, is under test


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def scifact_subset(shared_data, tmp_path_factory):
    """20 SciFact test queries, their judged abstracts and 80 others, as a BEIR folder."""
    return tiny_data.scifact_subset(shared_data / "scifact", tmp_path_factory.mktemp("scifact_mteb"), "test", 20, 80)


@pytest.fixture(scope="module")
def sts_subset(shared_data, tmp_path_factory):
    """The first 150 pairs of STS-B test."""
    lines = (shared_data / "stsbenchmark" / "sts-test.csv").read_text().splitlines()[:150]
    path = tmp_path_factory.mktemp("sts_mteb") / "sts-test.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def minilm(minilm_path):
    """MiniLM wrapped for mteb; the memo lets our own evaluation reuse the embeddings mteb asked for
    (a hit only where the texts, length and prefix are the same, so it hides no difference)."""
    enc = evaluate.load_text_encoder(minilm_path, max_len=MAX_LEN, batch_size=64)
    return mteb_model.MTEBEncoder(dataclasses.replace(enc, memo={}), name="sentence-transformers/all-MiniLM-L6-v2")


def _scores(model, task) -> dict:
    (row,) = mteb_model.scores(mteb.evaluate(model, task, cache=None, show_progress_bar=False))
    return row["scores"]


def test_the_wrapper_is_an_mteb_encoder(minilm):
    assert isinstance(minilm, mteb.models.EncoderProtocol)
    meta = minilm.mteb_model_meta
    assert meta.name == "sentence-transformers/all-MiniLM-L6-v2" and meta.embed_dim == 384
    assert meta.framework == ["JAX"] and meta.n_parameters > 20_000_000


def test_retrieval_ndcg_through_mteb_equals_ours(minilm, scifact_subset):
    theirs = _scores(minilm, mteb_model.beir_task(scifact_subset))
    queries, corpus, qrels = sources.read_beir_eval(scifact_subset, "test")
    ours, _ = evaluate.evaluate_retrieval(minilm.model, queries, corpus, qrels, ks=(10, 100))
    assert theirs["ndcg_at_10"] == pytest.approx(ours["ndcg@10"], abs=1e-4)
    assert theirs["recall_at_10"] == pytest.approx(ours["recall@10"], abs=1e-4)
    assert theirs["mrr_at_10"] == pytest.approx(ours["mrr@10"], abs=1e-4)
    assert 0.5 < ours["ndcg@10"] < 1.0  # MiniLM finds SciFact's evidence among 100-odd abstracts


def test_sts_spearman_through_mteb_equals_ours(minilm, sts_subset):
    theirs = _scores(minilm, mteb_model.sts_task(sts_subset))
    ours = evaluate.evaluate_sts(minilm.model, sources.read_sts(sts_subset))
    assert theirs["cosine_spearman"] == pytest.approx(ours["spearman"], abs=1e-4)
    assert theirs["spearman"] == pytest.approx(ours["spearman"], abs=1e-4)  # the model's score: normalised dot
    assert theirs["cosine_pearson"] == pytest.approx(ours["pearson"], abs=1e-4)
    assert ours["spearman"] > 0.7


def test_prompt_types_map_to_the_query_prefix_or_the_tasks_instruction(tiny_model_dir):
    """Queries get the model's query prefix, documents and STS sentences none; an instruction
    template puts the task's instruction before queries instead; mteb-style prompts come first."""
    enc = evaluate.load_text_encoder(tiny_model_dir, max_len=32, query_prefix="query: ")
    meta = mteb.get_task("SciFact").metadata  # metadata only: nothing is fetched
    plain = mteb_model.MTEBEncoder(enc)
    texts = [{"text": ["a cat sleeps", "protein folding"]}, {"text": ["x"]}]  # what mteb's dataloader yields
    flat = ["a cat sleeps", "protein folding", "x"]

    def encode(model, prompt_type):
        return model.encode(texts, task_metadata=meta, hf_split="test", hf_subset="default", prompt_type=prompt_type)

    np.testing.assert_allclose(encode(plain, PromptType.query), enc.queries(flat), atol=1e-6)
    np.testing.assert_allclose(encode(plain, PromptType.document), enc.documents(flat), atol=1e-6)
    np.testing.assert_allclose(encode(plain, None), enc.documents(flat), atol=1e-6)
    assert [plain.prefix(meta, t) for t in (PromptType.query, PromptType.document, None)] == [None] * 3
    instructed = mteb_model.MTEBEncoder(enc, instruction_template="Instruct: {instruction}\nQuery: ")
    prefix = instructed.prefix(meta, PromptType.query)
    assert prefix.startswith("Instruct: ") and prefix.endswith("\nQuery: ") and len(prefix) > 20
    assert instructed.prefix(meta, PromptType.document) is None
    np.testing.assert_allclose(encode(instructed, PromptType.query),
                               dataclasses.replace(enc, query_prefix=prefix).queries(flat), atol=1e-6)
    prompted = mteb_model.MTEBEncoder(enc, prompts={"SciFact-document": "passage: ", "query": "q: "})
    assert (prompted.prefix(meta, PromptType.document), prompted.prefix(meta, PromptType.query)) == ("passage: ", "q: ")


def _cli(args, capsys) -> dict:
    eval_cmd.main(["bixse-jax eval", *args])
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_eval_mteb_cli_equals_eval(minilm_path, tiny_model_dir, sts_subset, scifact_subset, tmp_path, capsys):
    """`bixse-jax eval --mteb`: a BEIR folder as a retrieval task, an STS file as an STS task; the
    scores are `bixse-jax eval`'s on the same data, and --mteb-results keeps mteb's own files."""
    sts = ["--model", str(minilm_path), "--sts", str(sts_subset), "--max-len", str(MAX_LEN)]
    theirs = _cli(sts + ["--mteb", "--out", str(tmp_path / "sts.json")], capsys)
    ours = _cli(sts, capsys)
    assert theirs["task"] == "sts" and theirs["mteb_version"] == mteb.__version__
    assert theirs["main_score"] == theirs["metrics"]["cosine_spearman"]
    assert theirs["main_score"] == pytest.approx(ours["metrics"]["spearman"], abs=1e-4)
    assert json.loads((tmp_path / "sts.json").read_text())["main_score"] == theirs["main_score"]
    beir = ["--model", str(tiny_model_dir), "--beir", str(scifact_subset), "--max-len", "32"]
    theirs = _cli(beir + ["--mteb", "--mteb-name", "test/tiny", "--mteb-results", str(tmp_path / "mteb")], capsys)
    ours = _cli(beir, capsys)
    assert theirs["task"] == "retrieval" and theirs["mteb_task"] == scifact_subset.name
    assert theirs["main_score"] == pytest.approx(ours["metrics"]["ndcg@10"], abs=1e-4)
    assert list((tmp_path / "mteb" / "results" / "test__tiny").rglob(f"{scifact_subset.name}.json"))


@pytest.mark.parametrize("flags, message", [
    (["--mteb", "--rerank", "qrels"], "--mteb runs mteb's own task"),
    (["--mteb", "--calibration"], "--mteb runs mteb's own task"),
    (["--mteb-name", "a/b"], "need --mteb"),
    (["--mteb", "--mteb-name", "nameless"], "ORGANIZATION/NAME"),
    (["--mteb", "--instruction-template", "Instruct: "], "must hold {instruction}"),
])
def test_eval_mteb_flag_errors(flags, message, scifact_subset, capsys):
    with pytest.raises(SystemExit) as e:
        eval_cmd.main(["bixse-jax eval", "--model", "unused", "--beir", str(scifact_subset), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err



def test_eval_mteb_bad_data_is_a_one_line_error(tmp_path, capsys):
    """Bad data fails before the model loads ("unused" is no model), as `bixse-jax eval` does."""
    from bixse_jax import cli

    def error(folder) -> str:
        with pytest.raises(SystemExit) as e:
            cli.main(["bixse-jax", "eval", "--model", "unused", "--mteb", "--beir", str(folder)])
        assert e.value.code == 2
        return capsys.readouterr().err

    assert error(tmp_path / "nowhere") == f"bixse-jax eval: error: {tmp_path / 'nowhere'}: BEIR folder not found\n"
    _write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "d0", "text": "a document"}])
    _write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q0", "text": "a query"}])
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1.5\n")
    assert "mteb needs integer relevance grades, got 1.5" in error(tmp_path)
