"""`bixse-jax encode / eval / mine`, the shared evaluation functions, and workdir loading (tiny model)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from bixse_jax import cli
from bixse_jax.commands import encode as encode_cmd
from bixse_jax.commands import eval as eval_cmd
from bixse_jax.commands import mine as mine_cmd
from bixse_jax.data import sources
from bixse_jax.default_config import base_config, evaluator
from bixse_jax.eval import evaluate, metrics, run_files
from bixse_jax.models import compute_policy

WORDS = ["protein", "cell", "gene", "virus", "brain", "heart", "drug", "trial", "mouse", "cancer",
         "blood", "liver", "sleep", "diet", "exercise", "memory"]


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory) -> pathlib.Path:
    """40 documents, 8 queries with graded test and train qrels; d39's text is absent (like TREC-DL)."""
    root = tmp_path_factory.mktemp("beir")
    rng = np.random.default_rng(0)
    docs = [{"_id": f"d{j}", "title": WORDS[j % 16], "text": " ".join(rng.choice(WORDS, 6))} for j in range(39)]
    _write_jsonl(root / "corpus.jsonl", docs)
    _write_jsonl(root / "queries.jsonl", [{"_id": f"q{i}", "text": f"{WORDS[i]} and {WORDS[i + 4]}"} for i in range(8)])
    (root / "qrels").mkdir()
    for split, offset in (("test", 0), ("train", 1)):
        rows = ["query-id\tcorpus-id\tscore"]
        for i in range(8):
            for j, grade in ((i + offset, 2), (i + 16, 1), (i + 24, 0)):
                rows.append(f"q{i}\td{j}\t{grade}")
        rows.append("q0\td39\t3")  # judged, but without text
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_enc(tiny_model_dir) -> evaluate.TextEncoder:
    return evaluate.load_text_encoder(tiny_model_dir, max_len=32, query_prefix="query: ")


def _run_cli(module, args: list[str], capsys) -> dict:
    module.main([f"bixse-jax {module.__name__.rsplit('.', 1)[1]}", *args])
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def _cli_error(module, args: list[str], capsys) -> str:
    """A user error through `bixse-jax COMMAND`: one stderr line, exit status 2."""
    command = module.__name__.rsplit(".", 1)[1]
    with pytest.raises(SystemExit) as e:
        cli.main(["bixse-jax", command, *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bixse-jax {command}: error: ") and err.count("\n") == 1, err
    return err


# ----------------------------------------------------------------------------
# encode
# ----------------------------------------------------------------------------


def test_encode_txt_and_jsonl_match_the_encoder(tiny_model_dir, tiny_enc, tmp_path, capsys):
    texts = ["a short sentence", "protein folding in the cell", "x"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    _write_jsonl(tmp_path / "in.jsonl", [{"title": "Heart", "text": "blood flow"}, {"text": "no title"}])
    info = _run_cli(encode_cmd, ["--model", str(tiny_model_dir), "--input", str(tmp_path / "in.txt"),
                                 "--out", str(tmp_path / "docs.npy"), "--max-len", "32", "--matmul-dtype", "float32"], capsys)
    docs = np.load(tmp_path / "docs.npy")
    assert info["shape"] == [3, 32] and docs.dtype == np.float32
    np.testing.assert_allclose(docs, tiny_enc.documents(texts), atol=1e-6)
    _run_cli(encode_cmd, ["--model", str(tiny_model_dir), "--input", str(tmp_path / "in.txt"), "--query",
                          "--query-prefix", "query: ", "--out", str(tmp_path / "q.npy"), "--max-len", "32", "--matmul-dtype", "float32"], capsys)
    queries = np.load(tmp_path / "q.npy")
    np.testing.assert_allclose(queries, tiny_enc.queries(texts), atol=1e-6)
    assert not np.allclose(queries, docs, atol=1e-3)  # the prefix changed the embeddings
    _run_cli(encode_cmd, ["--model", str(tiny_model_dir), "--input", str(tmp_path / "in.jsonl"),
                          "--out", str(tmp_path / "j.npy"), "--max-len", "32", "--matmul-dtype", "float32"], capsys)
    np.testing.assert_allclose(np.load(tmp_path / "j.npy"), tiny_enc.documents(["Heart blood flow", "no title"]),
                               atol=1e-6)
    _run_cli(encode_cmd, ["--model", str(tiny_model_dir), "--input", str(tmp_path / "in.txt"), "--max-len", "32",
                          "--matmul-dtype", "bfloat16", "--out", str(tmp_path / "bf.npy")], capsys)
    rounded = np.load(tmp_path / "bf.npy")
    assert rounded.dtype == np.float32 and 1e-6 < np.abs(rounded - docs).max() < 3e-2
    # The default, --matmul-dtype auto: bfloat16 on a CPU with native bfloat16, float32 elsewhere.
    _run_cli(encode_cmd, ["--model", str(tiny_model_dir), "--input", str(tmp_path / "in.txt"), "--max-len", "32",
                          "--out", str(tmp_path / "auto.npy")], capsys)
    expected = rounded if compute_policy.cpu_bf16_flags() else docs
    np.testing.assert_array_equal(np.load(tmp_path / "auto.npy"), expected)


def test_pooling_and_normalize_flags_override_the_models_own(tiny_model_dir, tmp_path, capsys):
    """--pooling / --no-normalize (shared by encode, eval and mine) reach the encoder; the model's
    own settings (mean, normalised) are the default."""
    texts = ["a short sentence", "protein folding in the cell"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    base = ["--model", str(tiny_model_dir), "--input", str(tmp_path / "in.txt"), "--max-len", "32",
            "--matmul-dtype", "float32"]  # compared with float32 encodings
    _run_cli(encode_cmd, [*base, "--out", str(tmp_path / "mean.npy")], capsys)
    _run_cli(encode_cmd, [*base, "--pooling", "cls", "--no-normalize", "--out", str(tmp_path / "cls.npy")], capsys)
    cls = np.load(tmp_path / "cls.npy")
    expected = evaluate.load_text_encoder(tiny_model_dir, max_len=32, pooling="cls", normalize=False)
    assert (expected.encoder.pooling, expected.encoder.normalize) == ("cls", False)
    np.testing.assert_allclose(cls, expected.documents(texts), atol=1e-6)
    assert np.abs(np.linalg.norm(np.load(tmp_path / "mean.npy"), axis=1) - 1).max() < 1e-5
    assert np.abs(np.linalg.norm(cls, axis=1) - 1).min() > 1e-3  # not normalised
    assert not np.allclose(cls / np.linalg.norm(cls, axis=1, keepdims=True), np.load(tmp_path / "mean.npy"),
                           atol=1e-3)  # a different pooling, not only a different length
    for module in (eval_cmd, mine_cmd):  # the same flags, parsed by every encoding command
        with pytest.raises(SystemExit) as exit_info:
            module.main([f"bixse-jax {module.__name__.rsplit('.', 1)[1]}", "--model", "m", "--pooling", "max"])
        assert exit_info.value.code == 2 and "invalid choice: 'max'" in capsys.readouterr().err


@pytest.mark.parametrize("name,content,match", [
    ("in.txt", "first\n\nthird\n", r"in.txt:2: empty line"),
    ("in.txt", "first\n   \n", r"in.txt:2: empty line"),
    ("in.jsonl", '{"text": "ok"}\n{"title": "t"}\n', r'in.jsonl:2: field "text": missing'),
    ("in.jsonl", '{"text": "ok"}\n{"text": "  "}\n', r'in.jsonl:2: field "text": must not be empty'),
    ("in.jsonl", '{"text": "ok"}\n{"text": 3}\n', r'in.jsonl:2: field "text": must be a string'),
    ("in.jsonl", '{"text": "ok"}\n[1]\n', r"in.jsonl:2: expected a JSON object"),
    ("in.csv", "a\n", r"expected a .txt or .jsonl file"),
])
def test_encode_bad_input_names_file_and_line(tiny_model_dir, tmp_path, capsys, name, content, match):
    (tmp_path / name).write_text(content)
    err = _cli_error(encode_cmd, ["--model", str(tiny_model_dir), "--input", str(tmp_path / name),
                                  "--out", str(tmp_path / "e.npy")], capsys)
    assert re.search(match, err), err
    assert not (tmp_path / "e.npy").exists()


# ----------------------------------------------------------------------------
# eval: retrieval, re-ranking, STS
# ----------------------------------------------------------------------------


def test_eval_beir_retrieval_writes_metrics_and_run(tiny_model_dir, tiny_enc, beir_dir, tmp_path, capsys):
    args = ["--model", str(tiny_model_dir), "--beir", str(beir_dir), "--max-len", "32", "--matmul-dtype", "float32",
            "--query-prefix", "query: ",
            "--k", "5,20", "--top-k", "30", "--run-out", str(tmp_path / "run.trec"), "--out", str(tmp_path / "m.json")]
    result = _run_cli(eval_cmd, args + ["--skip-missing-docs"], capsys)
    assert result == json.loads((tmp_path / "m.json").read_text())
    assert result["task"] == "retrieval" and result["queries"] == 8 and result["documents"] == 39
    run = run_files.read_run(tmp_path / "run.trec")
    assert len(run) == 8 and all(len(docs) == 30 for docs in run.values())
    _, _, qrels = sources.read_beir_eval(beir_dir, "test", skip_missing_docs=True)
    assert result["metrics"] == pytest.approx(metrics.evaluate_run(run, qrels, ks=(5, 20)), abs=1e-12)
    # The same numbers as the library call training uses, with scores from a plain matmul.
    queries, corpus, _ = sources.read_beir_eval(beir_dir, "test", skip_missing_docs=True)
    want = tiny_enc.queries(list(queries.values())) @ tiny_enc.documents(list(corpus.values())).T
    got = np.array([[run[q].get(d, -np.inf) for d in corpus] for q in queries])
    top = np.isfinite(got)
    np.testing.assert_allclose(got[top], want[top], atol=1e-5)
    assert (want[top].reshape(8, 30).min(axis=1) >= np.where(top, -np.inf, want).max(axis=1) - 1e-5).all()
    assert result["skip_missing_docs"] is True and result["judged_without_text"] == 1
    # By default the qrels stay as given (trec_eval): q0's judged d39 has no text, so it cannot be
    # retrieved, yet it counts among q0's relevant documents.
    full = _run_cli(eval_cmd, args, capsys)
    assert full["skip_missing_docs"] is False and full["judged_without_text"] == 1
    assert run_files.read_run(tmp_path / "run.trec") == run
    _, _, given = sources.read_beir_eval(beir_dir, "test")
    assert given["q0"] == qrels["q0"] | {"d39": 3.0}
    assert full["metrics"] == pytest.approx(metrics.evaluate_run(run, given, ks=(5, 20)), abs=1e-12)
    assert full["metrics"]["recall@20"] < result["metrics"]["recall@20"]


def test_eval_rerank_judged_pool_and_run_file(tiny_model_dir, tiny_enc, beir_dir, tmp_path, capsys):
    base = ["--model", str(tiny_model_dir), "--beir", str(beir_dir), "--max-len", "32", "--query-prefix", "query: "]
    result = _run_cli(eval_cmd, base + ["--rerank", "qrels", "--run-out", str(tmp_path / "rr.trec")], capsys)
    assert result["task"] == "rerank" and result["skip_missing_docs"] is False
    assert result["judged_without_text"] == result["candidates_without_text"] == 1  # q0's d39
    run = run_files.read_run(tmp_path / "rr.trec")
    queries, corpus, qrels = sources.read_beir_eval(beir_dir, "test")  # the qrels as given
    # Exactly the judged documents with text; d39 stays in the qrels the metrics read.
    assert {q: set(d) for q, d in run.items()} == {q: set(d) - {"d39"} for q, d in qrels.items()}
    assert result["metrics"] == pytest.approx(metrics.evaluate_run(run, qrels) | {"mean_pool_size": 3.0})
    skipped = _run_cli(eval_cmd, base + ["--rerank", "qrels", "--skip-missing-docs"], capsys)
    assert skipped["skip_missing_docs"] is True and skipped["candidates_without_text"] == 0
    assert skipped["metrics"] == pytest.approx(
        metrics.evaluate_run(run, sources.judged_with_text(qrels, corpus)) | {"mean_pool_size": 3.0})
    assert skipped["metrics"]["ndcg@10"] > result["metrics"]["ndcg@10"]  # the ideal DCG lost d39's grade 3
    q = tiny_enc.queries([queries["q3"]])[0]
    d = tiny_enc.documents([corpus[x] for x in run["q3"]])
    np.testing.assert_allclose(list(run["q3"].values()), d @ q, atol=1e-5)
    assert result["metrics"]["mean_pool_size"] == pytest.approx(3.0)
    # A run file as candidates: a document without text is dropped and counted.
    (tmp_path / "cands.trec").write_text("".join(
        f"q{i} Q0 d{j} {r + 1} {10 - r} bm25\n" for i in range(8) for r, j in enumerate([i, 30, 31, 39][:4 - (i > 0)])))
    result = _run_cli(eval_cmd, base + ["--rerank", str(tmp_path / "cands.trec"), "--k", "1,3",
                                        "--run-out", str(tmp_path / "rr2.trec")], capsys)
    assert result["candidates_without_text"] == 1
    run2 = run_files.read_run(tmp_path / "rr2.trec")
    assert set(run2["q0"]) == {"d0", "d30", "d31"} and set(run2["q5"]) == {"d5", "d30", "d31"}
    assert result["metrics"] == pytest.approx(metrics.evaluate_run(run2, qrels, ks=(1, 3)) | {"mean_pool_size": 3.0})
    # A depth keeps each query's best candidates of the run.
    result = _run_cli(eval_cmd, base + ["--rerank", str(tmp_path / "cands.trec"), "--rerank-depth", "1"], capsys)
    # d_i of d_i, d_i+16 (and of q0's d39, which has no text)
    assert result["metrics"]["mean_pool_size"] == 1.0
    assert result["metrics"]["recall@10"] == pytest.approx((7 / 2 + 1 / 3) / 8)


def _ir_measures(run_file: pathlib.Path, qrels_tsv: pathlib.Path, ks: tuple[int, ...]) -> dict[str, float]:
    """ir-measures (trec_eval's C code through pytrec_eval) on a run file and a BEIR qrels file as given."""
    import ir_measures
    from ir_measures import AP, RR, R, nDCG

    rows = [line.split("\t") for line in qrels_tsv.read_text().splitlines()[1:]]
    qrels = [ir_measures.Qrel(q, d, int(g)) for q, d, g in rows]
    measures = {**{f"ndcg@{k}": nDCG @ k for k in ks}, **{f"recall@{k}": R @ k for k in ks}, "map": AP, "rr": RR}
    values = ir_measures.calc_aggregate(measures.values(), qrels, ir_measures.read_trec_run(str(run_file)))
    return {name: values[m] for name, m in measures.items()}


def test_eval_rerank_metrics_equal_ir_measures_on_the_qrels_as_given(tiny_model_dir, beir_dir, tmp_path, capsys):
    """Judged documents without text stay in the qrels, as trec_eval reads them: the numbers equal
    ir-measures on the written run and the qrels file, which --skip-missing-docs's do not."""
    root = tmp_path / "dl"
    (root / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl"):  # d0..d38 have text; d39..d42 have none
        (root / name).write_text((beir_dir / name).read_text())
    judged = {"q0": {"d0": 2, "d16": 1, "d24": 0, "d39": 3, "d40": 2},  # two relevant docs without text
              "q1": {"d41": 1, "d25": 0},  # its only relevant doc has no text
              "q2": {"d2": 0, "d18": 0},  # nothing relevant: 0 in both
              **{f"q{i}": {f"d{i}": 2, f"d{i + 16}": 1, f"d{i + 24}": 0} for i in range(3, 8)}}
    qrels_tsv = root / "qrels" / "test.tsv"
    qrels_tsv.write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{g}\n" for q, docs in judged.items() for d, g in docs.items()))
    cands = tmp_path / "bm25.trec"  # q7 is missing from the run: 0 in both
    cands.write_text("".join(f"{q} Q0 {d} {r + 1} {20 - r} bm25\n" for q in list(judged)[:7]
                             for r, d in enumerate([*judged[q], "d33", "d34", "d35", "d42"])))
    base = ["--model", str(tiny_model_dir), "--beir", str(root), "--max-len", "32", "--k", "5,10",
            "--rerank", str(cands), "--run-out", str(tmp_path / "rr.trec")]
    result = _run_cli(eval_cmd, base, capsys)
    assert result["skip_missing_docs"] is False and result["queries"] == 8
    assert result["judged_without_text"] == 3 and result["candidates_without_text"] == 3 + 2 + 5
    theirs = _ir_measures(tmp_path / "rr.trec", qrels_tsv, (5, 10))
    ours = result["metrics"]
    assert ours["mrr@10"] == pytest.approx(theirs.pop("rr"), abs=1e-6)  # pools of <= 9: RR@10 is RR
    assert {k: ours[k] for k in theirs} == pytest.approx(theirs, abs=1e-6)
    assert theirs["ndcg@10"] > 0 and theirs["recall@10"] < 1
    # Dropping the judgments without text inflates the numbers: no longer trec_eval's.
    skipped = _run_cli(eval_cmd, base + ["--skip-missing-docs"], capsys)["metrics"]
    assert skipped["ndcg@10"] > ours["ndcg@10"] + 0.05 and skipped["recall@10"] > ours["recall@10"] + 0.05


def test_real_trec_dl_rerank_equals_ir_measures(minilm_path, shared_data, tmp_path, capsys):
    """MiniLM re-ranking BM25's top 10 on TREC-DL 2019: nDCG@10, Recall@100 and MAP equal ir-measures
    on the written run with the official qrels (5,426 of 9,260 judged passages have no text)."""
    data = shared_data / "trec-dl19"
    result = _run_cli(eval_cmd, ["--model", str(minilm_path), "--beir", str(data), "--rerank",
                                 str(data / "runs" / "BM25.trec"), "--rerank-depth", "10", "--batch-size", "64",
                                 "--run-out", str(tmp_path / "rr.trec")], capsys)
    assert result["judged_without_text"] == 5426 and result["queries"] == 43
    theirs = _ir_measures(tmp_path / "rr.trec", data / "qrels" / "test.tsv", (10, 100))
    for name in ("ndcg@10", "recall@100", "map"):
        assert result["metrics"][name] == pytest.approx(theirs[name], abs=1e-6), name
    assert 0.4 < theirs["ndcg@10"] < 0.8


def test_eval_errors(tiny_model_dir, beir_dir, tmp_path, capsys):
    base = ["--model", str(tiny_model_dir), "--beir", str(beir_dir)]
    err = _cli_error(eval_cmd, base + ["--split", "dev"], capsys)
    assert "unknown split 'dev'" in err and "['test', 'train']" in err
    (tmp_path / "bad.trec").write_text("q0 Q0 d0 1 0.5 x\nq1 Q0 d1 1 oops x\n")
    err = _cli_error(eval_cmd, base + ["--rerank", str(tmp_path / "bad.trec")], capsys)
    assert 'bad.trec:2: field "score": must be a number' in err
    assert "--k values must be >= 1" in _cli_error(eval_cmd, base + ["--k", "10,0"], capsys)
    with pytest.raises(SystemExit) as e:
        eval_cmd.main(["bixse-jax eval", "--model", str(tiny_model_dir), "--sts", "x.csv", "--rerank", "qrels"])
    assert e.value.code == 2


def test_eval_max_len_beyond_the_model_is_a_user_error(tiny_model_dir, beir_dir, capsys):
    base = ["--model", str(tiny_model_dir), "--beir", str(beir_dir)]
    assert "outside 1..128" in _cli_error(eval_cmd, base + ["--max-len", "1000", "--skip-missing-docs"], capsys)


def test_eval_sts(tiny_model_dir, tiny_enc, tmp_path, capsys):
    rows = [("a cat sleeps", "a cat is sleeping", 4.5), ("a dog runs", "the market fell", 0.2),
            ("protein binds", "a protein is bound", 3.8), ("heart rate", "sleep diet", 1.0)]
    (tmp_path / "sts.csv").write_text("".join(f"g\tf\t2012\t{i}\t{s}\t{a}\t{b}\n" for i, (a, b, s) in enumerate(rows)))
    result = _run_cli(eval_cmd, ["--model", str(tiny_model_dir), "--sts", str(tmp_path / "sts.csv"),
                                 "--max-len", "32"], capsys)
    a, b = tiny_enc.documents([r[0] for r in rows]), tiny_enc.documents([r[1] for r in rows])
    assert result["metrics"]["spearman"] == pytest.approx(metrics.spearman(np.sum(a * b, 1), [r[2] for r in rows]))
    assert result["pairs"] == 4


def _sts_file(path, rows):
    path.write_text("".join(f"g\tf\t2012\t{i}\t{s}\t{a}\t{b}\n" for i, (a, b, s) in enumerate(rows)))
    return path


def test_eval_calibration_sts_with_given_t_b_and_platt(tiny_model_dir, tiny_enc, tmp_path, capsys):
    """ECE / Brier of sigmoid(exp(t) cos + b) and of Platt scaling fitted on other pairs, recomputed here
    from the encoder's own cosines (query side with its prefix, as training scores a pair)."""
    from bixse_jax.eval import calibration
    rows = [("a cat sleeps", "a cat is sleeping", 4.5), ("a dog runs", "the market fell", 0.2),
            ("protein binds", "a protein is bound", 3.8), ("heart rate", "sleep diet", 1.0)]
    cos = lambda pairs: np.sum(tiny_enc.queries([p[0] for p in pairs]) * tiny_enc.documents([p[1] for p in pairs]), 1)
    dev = [("gene", "a gene"), ("virus spreads", "diet and exercise"), ("brain", "the brain"),
           ("liver cells", "trial of a drug"), ("memory", "sleep memory"), ("cell", "cancer cell")]
    ranks = np.argsort(np.argsort(cos([(a, b, 0) for a, b in dev])))  # grades rising with the random model's cosine,
    dev = [(a, b, 5.0 * r / (len(dev) - 1)) for (a, b), r in zip(dev, ranks)]  # so that Platt's a > 0
    test, fit = _sts_file(tmp_path / "test.csv", rows), _sts_file(tmp_path / "dev.csv", dev)
    result = _run_cli(eval_cmd, ["--model", str(tiny_model_dir), "--sts", str(test), "--calibration", "--max-len", "32",
                                 "--matmul-dtype", "float32",
                                 "--query-prefix", "query: ", "--log-temperature", "1.5", "--bias", "-2",
                                 "--calibration-fit", str(fit), "--plot", str(tmp_path / "r.png"),
                                 "--out", str(tmp_path / "c.json")], capsys)
    target = np.array([r[2] / 5 for r in rows])
    p_model = calibration.sigmoid(np.exp(1.5) * cos(rows) - 2.0)
    assert result["metrics"]["model"]["ece"] == pytest.approx(calibration.expected_calibration_error(p_model, target),
                                                              abs=1e-5)
    assert result["metrics"]["model"]["brier"] == pytest.approx(calibration.brier_score(p_model, target), abs=1e-5)
    a, c = calibration.fit_platt(cos(dev), np.array([r[2] / 5 for r in dev]))
    assert a > 1e-3 and result["parameters"]["platt"]["scale"] == pytest.approx(a, rel=1e-3)
    p_platt = calibration.sigmoid(a * cos(rows) + c)
    assert result["metrics"]["platt"]["brier"] == pytest.approx(calibration.brier_score(p_platt, target), abs=1e-5)
    assert result["pairs"] == 4 and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "c.json").read_text())["metrics"] == result["metrics"]


def test_eval_calibration_beir_pairs_and_errors(tiny_model_dir, beir_dir, capsys):
    """BEIR: every judged pair with text (grade-0 ones too; d39 has no text), target grade / 3 (the file's
    largest grade, d39's, though d39 itself has no text)."""
    base = ["--model", str(tiny_model_dir), "--beir", str(beir_dir), "--calibration", "--max-len", "32"]
    result = _run_cli(eval_cmd, base + ["--log-temperature", "2.3", "--bias", "-5"], capsys)
    assert result["pairs"] == 24 and result["mean_target"] == pytest.approx((8 * 2 / 3 + 8 / 3) / 24)
    assert sum(b["count"] for b in result["reliability"]["model"]) == 24
    assert "has no learned t and b" in _cli_error(eval_cmd, base, capsys)  # a plain HF folder has none
    with pytest.raises(SystemExit) as e:
        eval_cmd.main(["bixse-jax eval", "--model", str(tiny_model_dir), "--beir", str(beir_dir), "--plot", "x.png"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------
# mine
# ----------------------------------------------------------------------------


def test_mine_writes_top_k_candidates_that_are_not_training_pairs(tiny_model_dir, tiny_enc, beir_dir, tmp_path,
                                                                  capsys):
    out = tmp_path / "mined.jsonl"
    info = _run_cli(mine_cmd, ["--model", str(tiny_model_dir), "--beir", str(beir_dir), "--k", "7", "--max-len", "32",
                               "--query-prefix", "query: ", "--skip-missing-docs", "--out", str(out)], capsys)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert info["lines"] == len(rows) == 8 * 7
    assert set(rows[0]) == {"query_id", "doc_id", "query", "document", "rank", "retrieval_score", "qrels_grade"}
    queries, corpus, qrels = sources.read_beir_eval(beir_dir, "train", skip_missing_docs=True)
    q0 = [r for r in rows if r["query_id"] == "q0"]
    assert [r["rank"] for r in q0] == list(range(1, 8))
    assert all(a["retrieval_score"] >= b["retrieval_score"] for a, b in zip(q0, q0[1:]))
    scores = tiny_enc.documents(list(corpus.values())) @ tiny_enc.queries([queries["q0"]])[0]
    assert q0[0]["doc_id"] == list(corpus)[int(np.argmax(scores))]
    assert q0[0]["document"] == corpus[q0[0]["doc_id"]] and q0[0]["query"] == queries["q0"]
    assert all(r["qrels_grade"] == qrels[r["query_id"]].get(r["doc_id"]) for r in rows)
    # No "score" field: training refuses the file until a labeller adds grades.
    with pytest.raises(sources.DataError, match=r'mined.jsonl:1: field "score": missing'):
        sources.read_jsonl_pairs(out)


# ----------------------------------------------------------------------------
# Training's evaluator and training workdirs
# ----------------------------------------------------------------------------


def _tiny_config(tiny_model_dir, beir_dir):
    """A 2-step BEIR run whose evaluator `held_out` retrieves for the test split."""
    c = base_config()
    c.model.name_or_path = str(tiny_model_dir)
    c.model.dropout = 0.0
    c.model.query_prefix = "query: "
    c.data.kind = "beir"
    c.data.path = str(beir_dir)
    c.data.skip_missing_docs = True
    c.data.query_max_len = c.data.doc_max_len = 32
    c.data.buckets = (16, 32)
    c.train.global_batch_size = 8
    c.train.num_steps = 2
    c.train.warmup_steps = 1
    c.train.learning_rate = 1e-2
    c.train.checkpoint_every = 2
    c.evals.held_out = evaluator("beir", path=str(beir_dir), ks=(5, 20))  # qrels as given (the default)
    return c


def test_training_evaluators_by_kind_match_the_cli_functions(tiny_model_dir, tiny_enc, beir_dir, tmp_path):
    from bixse_jax import experiment

    config = _tiny_config(tiny_model_dir, beir_dir)
    model = experiment.load_model(config.model)
    queries, corpus, qrels = sources.read_beir_eval(beir_dir, "test")  # skip_missing_docs=False: as given
    assert "d39" in qrels["q0"] and "d39" not in corpus
    got = experiment.make_evaluators(config, model)["held_out"].evaluate(model.params)
    assert got == pytest.approx(evaluate.evaluate_retrieval(tiny_enc, queries, corpus, qrels, ks=(5, 20), top_k=100)[0])
    config.evals.held_out.kind = "rerank"
    got = experiment.make_evaluators(config, model)["held_out"].evaluate(model.params)
    pools = evaluate.judged_pool(qrels, corpus)
    assert pools["q0"] == ["d0", "d16", "d24"]  # d39 cannot be scored, but counts in the metrics
    want = evaluate.evaluate_rerank(tiny_enc, queries, corpus, qrels, pools, ks=(5, 20))[0]
    assert got == pytest.approx(want) and got["mean_pool_size"] == 3.0
    config.evals.held_out.skip_missing_docs = True
    skipped = experiment.make_evaluators(config, model)["held_out"].evaluate(model.params)
    assert skipped == pytest.approx(evaluate.evaluate_rerank(
        tiny_enc, queries, corpus, sources.judged_with_text(qrels, corpus), pools, ks=(5, 20))[0])
    assert skipped["recall@5"] > got["recall@5"]
    config.evals.held_out.kind, config.evals.held_out.skip_missing_docs = "beir", False

    run_files.write_run(tmp_path / "c.trec", {"q1": {"d1": 2.0, "d9": 1.0}, "q2": {"d2": 1.0}})
    common = {"path": str(beir_dir), "skip_missing_docs": True, "ks": (5, 20)}
    config.evals.pool = evaluator("rerank", **common)
    config.evals.run = evaluator("rerank", run_file=str(tmp_path / "c.trec"), **common, every_steps=5)
    config.evals.off = evaluator("none")
    model = experiment.load_model(config.model)
    built = experiment.make_evaluators(config, model)
    assert list(built) == ["held_out", "pool", "run"]  # name order; kind 'none' is skipped
    assert (built["run"].every_steps, built["run"].before_training) == (5, True)
    got = {name: e.evaluate(model.params) for name, e in built.items()}
    assert got["held_out"] == pytest.approx(  # qrels as given
        evaluate.evaluate_retrieval(tiny_enc, queries, corpus, qrels, ks=(5, 20), top_k=100)[0])
    queries, corpus, qrels = sources.read_beir_eval(beir_dir, "test", skip_missing_docs=True)
    want = evaluate.evaluate_rerank(tiny_enc, queries, corpus, qrels, evaluate.judged_pool(qrels, corpus),
                                    ks=(5, 20))[0]
    assert got["pool"] == pytest.approx(want) and got["pool"]["mean_pool_size"] == 3.0
    assert got["run"]["mean_pool_size"] == 1.5 and got["run"]["recall@5"] == pytest.approx(1 / 8)  # 2 of 8 queries

    config.evals.pool.kind = "nope"
    with pytest.raises(ValueError, match="evals.pool.kind 'nope' is not one of .*'rerank'"):
        experiment.make_evaluators(config, model)
    config.evals.pool.kind = "sts"  # the rerank keys it kept are not read by sts: refused, each named
    with pytest.raises(ValueError, match=r"evals.pool: kind sts reads path, dims, not evals.pool.ks = \(5, 20\) "
                                         r"\(read by demo / beir / rerank evaluators\); evals.pool.skip_missing_docs = True"):
        experiment.make_evaluators(config, model)
    config.evals.pool = evaluator("sts")
    with pytest.raises(ValueError, match=r"evals.pool \(sts\): needs path=STS_FILE"):
        experiment.make_evaluators(config, model)
    del config.evals["pool"]
    config.evals.bare = ml_collections.ConfigDict({"kind": "beir", "path": str(beir_dir), "spilt": "test"})
    with pytest.raises(ValueError, match=r"evals.bare: keys .*'split'.* are missing and \['spilt'\] unknown"):
        experiment.make_evaluators(config, model)
    with pytest.raises(KeyError, match="spilt"):
        evaluator("beir", spilt="test")


def test_each_evaluator_is_handed_only_the_keys_its_kind_reads(tiny_model_dir, beir_dir, monkeypatch):
    from bixse_jax import default_config, experiment
    from bixse_jax.eval import registry

    assert set(registry.BUILDERS) == set(default_config.EVAL_KINDS) - {"none"}  # every kind has a builder
    seen = {}

    def spy(kind):
        def build(entry, model, config):
            seen[kind] = entry
            return lambda params, logit_params=None: {}
        return build

    for kind in registry.BUILDERS:
        monkeypatch.setitem(registry.BUILDERS, kind, spy(kind))
    config = _tiny_config(tiny_model_dir, beir_dir)
    config.evals.held_out = evaluator("rerank", path=str(beir_dir), run_file="run.trec", top_k=7)
    config.evals.sts = evaluator("sts", path="sts.csv", batch_size=8)
    config.evals.off = evaluator("none", run_file="anything")  # switched off: nothing in it is checked
    experiment.make_evaluators(config, experiment.load_model(config.model))
    assert set(seen) == {"rerank", "sts"}
    assert set(seen["sts"].keys()) == {"kind", "every_steps", "before_training", "batch_size", "path", "dims"}
    assert (seen["sts"].path, seen["sts"].batch_size) == ("sts.csv", 8)
    with pytest.raises(AttributeError):
        seen["sts"].run_file  # noqa: B018 (another kind's key cannot be read by mistake)
    assert (seen["rerank"].run_file, seen["rerank"].top_k) == ("run.trec", 7)


def test_evaluators_of_judged_pairs_report_calibration_at_the_runs_t_and_b(tiny_model_dir, tiny_enc, beir_dir,
                                                                           tmp_path):
    """Given (t, b), rerank and sts evaluators add the ECE and Brier score of sigmoid(exp(t) cos + b)
    against grade / top grade, worked here from the run's own scores; the ranking metrics stay."""
    from bixse_jax import experiment
    from bixse_jax.eval import calibration

    config = _tiny_config(tiny_model_dir, beir_dir)
    config.evals.held_out = evaluator("rerank", path=str(beir_dir), skip_missing_docs=True)
    (tmp_path / "sts.csv").write_text("".join(f"g\tf\ty\t0\t{s}\t{a}\t{b}\n" for s, a, b in
                                              [(0.5, "a cat sat", "a dog ran"), (4.0, "red fish", "red fish swim"),
                                               (2.5, "the sun", "a star"), (5.0, "one two", "one two")]))
    config.evals.sts = evaluator("sts", path=str(tmp_path / "sts.csv"))
    model = experiment.load_model(config.model)
    built = experiment.make_evaluators(config, model)
    t, b = 1.5, -2.0
    plain, got = built["held_out"].evaluate(model.params), built["held_out"].evaluate(model.params, (t, b))
    assert "ece" not in plain and {k: got[k] for k in plain} == pytest.approx(plain)
    queries, corpus, qrels = sources.read_beir_eval(beir_dir, "test", skip_missing_docs=True)
    _, run = evaluate.evaluate_rerank(tiny_enc, queries, corpus, qrels, evaluate.judged_pool(qrels, corpus))
    scores = np.array([s for q in run for s in run[q].values()])
    targets = np.array([qrels[q][d] for q in run for d in run[q]]) / max(g for r in qrels.values() for g in r.values())
    assert len(scores) > 4 and len(set(targets.tolist())) > 1
    probs = 1 / (1 + np.exp(-(np.exp(t) * scores + b)))
    assert got["ece"] == pytest.approx(calibration.expected_calibration_error(probs, targets), abs=1e-9)
    assert got["brier"] == pytest.approx(np.mean((probs - targets) ** 2), abs=1e-9)
    sts = built["sts"].evaluate(model.params, (t, b))
    pairs = sources.read_sts(tmp_path / "sts.csv")
    a, c = (np.asarray(tiny_enc.documents([getattr(p, side) for p in pairs]), np.float64) for side in ("query", "document"))
    cos = np.sum(a * c, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(c, axis=1)  # both sides as documents
    gold = np.array([p.grade for p in pairs])
    assert sts["brier"] == pytest.approx(np.mean((1 / (1 + np.exp(-(np.exp(t) * cos + b))) - gold) ** 2), abs=1e-6)
    assert sts["brier"] != built["sts"].evaluate(model.params, (t, b + 1.0))["brier"]


def test_workdir_loads_the_latest_checkpoint(tiny_model_dir, beir_dir, tmp_path, capsys):
    import jax

    from bixse_jax import checkpoint, train

    config = _tiny_config(tiny_model_dir, beir_dir)
    config.evals.held_out.kind = "none"
    summary, state = train.train(config, tmp_path / "run", show_progress=False)
    assert "before" not in summary and "after" not in summary
    assert checkpoint.is_workdir(tmp_path / "run") and not checkpoint.is_workdir(tiny_model_dir)
    enc = evaluate.load_text_encoder(tmp_path / "run")
    for a, b in zip(jax.tree.leaves(enc.params), jax.tree.leaves(jax.device_get(state.params["encoder"]))):
        np.testing.assert_array_equal(a, b)
    assert (enc.query_prefix, enc.query_max_len, enc.doc_max_len) == ("query: ", 32, 32)
    assert "checkpoint 2" in enc.source
    with pytest.raises(ValueError, match="no checkpoint of step 5"):
        evaluate.load_text_encoder(tmp_path / "run", step=5)
    base = evaluate.load_text_encoder(tiny_model_dir, max_len=32, query_prefix="query: ")
    assert not np.allclose(enc.documents(["protein cell"]), base.documents(["protein cell"]), atol=1e-4)
    result = _run_cli(eval_cmd, ["--model", str(tmp_path / "run"), "--step", "2", "--beir", str(beir_dir),
                                 "--rerank", "qrels"], capsys)
    queries, corpus, qrels = sources.read_beir_eval(beir_dir, "test")
    want = evaluate.evaluate_rerank(enc, queries, corpus, qrels, evaluate.judged_pool(qrels, corpus))[0]
    assert result["metrics"] == pytest.approx(want)
    assert result["model_source"] == enc.source


def test_cross_validation_trains_on_other_folds_and_evaluates_the_held_out_one(tiny_model_dir, tiny_enc, beir_dir,
                                                                               tmp_path):
    from bixse_jax import experiment, train
    from bixse_jax.data import folds

    config = _tiny_config(tiny_model_dir, beir_dir)
    config.data.split = "test"
    config.data.folds, config.data.fold = 4, 1
    config.evals.held_out.kind = "rerank"
    config.evals.held_out.path = str(beir_dir) + "/"  # the same folder, however it is spelled
    # Another split of the same folder is not the training split: all of its queries are scored.
    config.evals.other = evaluator("rerank", path=str(beir_dir), split="train", skip_missing_docs=True,
                                   ks=(5, 20), before_training=False)
    held_out = folds.held_out_queries(beir_dir, "test", 4, 1)
    assert len(held_out) == 2
    pairs = experiment.load_train_pairs(config.data)
    assert {p.query_id for p in pairs} == {f"q{i}" for i in range(8)} - held_out

    model = experiment.load_model(config.model)
    built = experiment.make_evaluators(config, model)
    queries, corpus, qrels = sources.read_beir_eval(beir_dir, "test")  # held_out: qrels as given
    qrels = {q: r for q, r in qrels.items() if q in held_out}
    want = evaluate.evaluate_rerank(tiny_enc, queries, corpus, qrels, evaluate.judged_pool(qrels, corpus),
                                    ks=(5, 20))[0]
    assert built["held_out"].evaluate(model.params) == pytest.approx(want)
    train_q, train_corpus, train_qrels = sources.read_beir_eval(beir_dir, "train", skip_missing_docs=True)
    assert built["other"].evaluate(model.params) == pytest.approx(evaluate.evaluate_rerank(
        tiny_enc, train_q, train_corpus, train_qrels, evaluate.judged_pool(train_qrels, train_corpus), ks=(5, 20))[0])

    config.evals.held_out.before_training = False
    config.evals.held_out.every_steps = 1
    config.train.checkpoint_every = 0  # a sweep's run: metrics only, nothing saved
    summary, _ = train.train(config, tmp_path / "run", show_progress=False)
    assert "before" not in summary and set(summary["after"]) == {"held_out", "other"}
    assert set(summary["after"]["held_out"]) == set(want) | {"ece", "brier"}  # calibration at the run's t, b
    assert not list((tmp_path / "run").glob("checkpoints/*")) and not list((tmp_path / "run").glob("[0-9]*"))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], sorted(k for k in r if k.startswith("eval/"))) for r in logged if "eval/held_out/ndcg@5" in r]
    assert [step for step, _ in evals] == [1, 2]  # every step, and after training
    assert "eval/other/map" in evals[1][1] and "eval/other/map" not in evals[0][1]

    config.data.kind = "jsonl"
    with pytest.raises(ValueError, match="needs data.kind='beir'"):
        experiment.load_train_pairs(config.data)


_DEVICE_SPLIT = """
import jax
from bixse_jax import parallel
set_to = parallel.one_cpu_device_per_core()
print(set_to, jax.device_count(), parallel.one_cpu_device_per_core())
"""


@pytest.mark.parametrize("xla_flags, expected", [("", "2 2 None"),
                                                 ("--xla_force_host_platform_device_count=3", "None 3 None")])
def test_encoding_commands_split_the_cpu_one_device_per_core(xla_flags, expected):
    """Two cores -> two devices; a count the user chose, or JAX already running, is left alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    run = subprocess.run(["taskset", "-c", "0,1", sys.executable, "-c", _DEVICE_SPLIT], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[-2] == expected


def test_dense_impl_auto_takes_mkl_only_for_float32_where_it_runs(monkeypatch):
    from bixse_jax.models import cpu_blas
    monkeypatch.setattr(cpu_blas, "available", lambda: False)
    monkeypatch.setattr(cpu_blas, "unavailable_reason", lambda: "Intel MKL (libmkl_rt) was not found")
    assert compute_policy.resolve_dense_impl("auto", "float32", None) == "xla"
    with pytest.raises(ValueError, match="--dense-impl mkl: Intel MKL"):
        compute_policy.resolve_dense_impl("mkl", "float32", None)
    monkeypatch.setattr(cpu_blas, "available", lambda: True)
    monkeypatch.setattr(cpu_blas, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cpu_blas, "faster_impl", lambda: {"choice": "mkl"})  # tests/test_dense_impl_auto.py
    assert compute_policy.resolve_dense_impl("auto", "float32", None) == "mkl"
    assert compute_policy.resolve_dense_impl("mkl", "float32", "float32") == "mkl"
    assert compute_policy.resolve_dense_impl("auto", "float32", "bfloat16") == "xla"
    assert compute_policy.resolve_dense_impl("auto", "bfloat16", None) == "xla"
    assert compute_policy.resolve_dense_impl("xla", "float32", None) == "xla"
    with pytest.raises(ValueError, match="multiplies in float32"):
        compute_policy.resolve_dense_impl("mkl", "bfloat16", None)
