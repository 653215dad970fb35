"""bixse-jax label: the in-process JAX teacher against transformers, grades, prompts, the writer, agreement.

Tiny random Llama / Qwen2 models are written by transformers; the expected grade bixse-jax reads
from its own forward must equal a float64 computation from transformers' logits on the same
prompt ids, whatever the batch size and padding.
"""

import json

import numpy as np
import pytest

from conftest import skip_unless_ci

try:
    import torch
    import transformers
except ImportError:
    skip_unless_ci("torch and transformers are needed for the teacher parity tests (pip install -e .[test])")

from bixse_jax.data import sources
from bixse_jax.label import agreement, grades, prompts, rows
from bixse_jax.label.grades import GradeError

WORDS = ["query", "passage", "grade", "red", "blue", "cat", "dog", "runs", "sleeps", "fast", "big", "small",
         "0", "1", "2", "3", ":", "?", "."]
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=256, eos_token_id=2, bos_token_id=1)
CHAT = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEMPLATE = "query : {query} passage : {document} grade ?"


def _write_teacher(out, config_cls, model_cls, chat: bool, seed: int = 0, **extra):
    import tokenizers
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**TINY, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|user|>": 3, "<|assistant|>": 4,
             **{w: i + 5 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.Whitespace(), tokenizers.pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tok.add_special_tokens(["<|user|>", "<|assistant|>"])
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(out / "tokenizer.json"))
    if chat:
        (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT, "bos_token": "<s>"}))
    return model


CASES = {"llama_chat": ("LlamaConfig", "LlamaForCausalLM", True, {}),
         "qwen2_plain": ("Qwen2Config", "Qwen2ForCausalLM", False, {}),
         "llama_tied": ("LlamaConfig", "LlamaForCausalLM", False, {"tie_word_embeddings": True})}


def _rows(n=13, seed=0):
    rng = np.random.default_rng(seed)
    words = WORDS[3:12]
    return [{"query_id": f"q{i % 4}", "doc_id": f"d{i}", "query": " ".join(rng.choice(words, 1 + i % 3)),
             "document": " ".join(rng.choice(words, 1 + (7 * i) % 23))} for i in range(n)]


@pytest.fixture(scope="module", params=list(CASES))
def teacher_dir(request, tmp_path_factory):
    config_cls, model_cls, chat, extra = CASES[request.param]
    out = tmp_path_factory.mktemp(request.param)
    model = _write_teacher(out, config_cls, model_cls, chat, **extra)
    return out, model, chat


def _reference(model, seqs, grade_ids):
    """float64 expected grade and grade mass from transformers' last-position logits, one prompt at a time."""
    expected, mass = [], []
    for ids in seqs:
        with torch.no_grad():
            logits = model(torch.tensor(ids[None], dtype=torch.long)).logits[0, -1].double().numpy()
        full = np.exp(logits - logits.max())
        full /= full.sum()
        g = logits[grade_ids] - logits[grade_ids].max()
        p = np.exp(g) / np.exp(g).sum()
        expected.append(float(p @ np.arange(4)))
        mass.append(float(full[grade_ids].sum()))
    return np.array(expected), np.array(mass)


def test_expected_grades_match_transformers_in_float64_whatever_the_batching(teacher_dir):
    from bixse_jax.label.jax_teacher import JaxTeacher
    path, model, chat = teacher_dir
    data = _rows()
    results = {}
    for batch_size in (8, 16):
        teacher = JaxTeacher(path, grades=[0, 1, 2, 3], template=TEMPLATE, batch_size=batch_size)
        assert teacher.prompt.uses_chat_template == chat
        seqs = teacher.prompt_ids(data)
        if chat:  # the template's tokens, no second BOS: the chat template does not add one here
            assert seqs[0][0] == 3 and seqs[0][-1] == 4
        else:
            assert seqs[0][0] == 1
        assert len({len(s) for s in seqs}) > 3  # padding differs between rows and batchings
        labelled = {}
        for outcomes in teacher.label(data):
            for o in outcomes:
                labelled[o.row["doc_id"]] = grades.labelled_row(o.row, o.grade_logits, [0, 1, 2, 3], "t", o.grade_mass)
        results[batch_size] = labelled
    expected, mass = _reference(model, seqs, teacher.grade_ids)
    assert teacher.stats["batches"] == 1
    for labelled in results.values():
        ours = np.array([labelled[r["doc_id"]]["score"] * 3 for r in data])
        np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose([labelled[r["doc_id"]]["grade_mass"] for r in data], mass, atol=1e-5)
    assert expected.std() > 0.05  # the rows really differ, so the comparison can fail
    for r in data:  # batching does not change a row's label
        a, b = results[8][r["doc_id"]], results[16][r["doc_id"]]
        assert a["grade"] == b["grade"] and abs(a["score"] - b["score"]) < 1e-6


def test_grade_tokens_must_each_be_one_token(teacher_dir):
    from bixse_jax.data.tokenizer import Tokenizer
    tok = Tokenizer.from_model_dir(teacher_dir[0])
    assert grades.grade_token_ids(tok, [0, 1, 2, 3]) == [17, 18, 19, 20]
    with pytest.raises(GradeError, match=r"'12' -> 2 tokens"):
        grades.grade_token_ids(tok, [0, 12])
    with pytest.raises(GradeError, match=r"'5' -> token 0 which reads"):  # the unknown token
        grades.grade_token_ids(tok, [0, 5])
    for bad in ("0", "1,0", "a,b", "-1,2", "0,0"):
        with pytest.raises(GradeError):
            grades.parse_grades(bad)


def test_grade_distribution_is_the_softmax_over_grade_tokens_only():
    row = grades.labelled_row({"query": "q", "document": "d", "x": 1}, np.log([0.1, 0.2, 0.3, 0.4]) + 7.0,
                              [0, 1, 2, 3], "teach")
    assert row["x"] == 1 and row["teacher"] == "teach" and row["grade"] == 3
    np.testing.assert_allclose(list(row["grade_probs"].values()), [0.1, 0.2, 0.3, 0.4], atol=1e-12)
    assert row["score"] == pytest.approx((0.2 + 0.6 + 1.2) / 3)


def test_prompt_template_and_chat_template(tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_text("only {query}")
    with pytest.raises(prompts.PromptError, match="lacks {document}"):
        prompts.load_template(bad)
    good = tmp_path / "g.txt"
    good.write_text("Q={query} {braces} D={document}")
    builder = prompts.PromptBuilder(prompts.load_template(good), CHAT)
    assert builder.build("a {document}", "b") == "<|user|> Q=a {document} {braces} D=b <|assistant|>"
    assert prompts.PromptBuilder(prompts.DEFAULT_TEMPLATE).build("x", "y").endswith("a single digit from 0 to 3.")


def test_writer_resumes_drops_a_cut_line_and_skips_done_rows(tmp_path):
    out = tmp_path / "out.jsonl"
    done = {"query_id": "q", "doc_id": "d1", "query": "a", "document": "b", "teacher": "t", "score": 0.5}
    out.write_text(json.dumps(done) + "\n" + '{"query_id": "q", "doc_')  # kill -9 mid-line
    with rows.ResumableWriter(out) as writer:
        assert writer.done == {("q", "d1", "t")}
        assert out.read_text().count("\n") == 1 and out.read_text().endswith("}\n")
        writer.write([dict(done, doc_id="d2")], [{"query_id": "q", "doc_id": "d3", "reason": "x"}])
    assert [json.loads(line)["doc_id"] for line in out.read_text().splitlines()] == ["d1", "d2"]
    assert json.loads((tmp_path / "out.jsonl.failed.jsonl").read_text())["reason"] == "x"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a"}\n')
    with pytest.raises(rows.LabelInputError, match="bad.jsonl:1: field 'document'"):
        rows.read_candidates(bad)


def test_agreement_figures_on_known_rows(tmp_path):
    human = [0, 0, 1, 2, 3, 3]
    teacher = [0, 1, 1, 2, 2, 3]
    data = []
    for i, (h, t) in enumerate(zip(human, teacher)):
        probs = np.full(4, 0.1)
        probs[t] = 0.7
        data.append(grades.labelled_row({"query_id": "q", "doc_id": f"d{i}", "query": "a", "document": "b"},
                                        np.log(probs), [0, 1, 2, 3], "t"))
    qrels = {("q", f"d{i}"): h for i, h in enumerate(human)}
    result = agreement.agreement(data, qrels)
    assert result["pairs"] == 6
    assert result["confusion_human_x_teacher"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    # kappa by hand: p_o = 4/6; p_e = sum(row_i * col_i) / 36 = (2*1 + 1*2 + 1*2 + 2*1) / 36
    assert result["cohen_kappa"] == pytest.approx((4 / 6 - 8 / 36) / (1 - 8 / 36))
    from scipy import stats
    assert result["spearman"] == pytest.approx(stats.spearmanr([r["score"] for r in data], human).statistic)
    assert result["mean_expected_grade_by_human_grade"]["3"] == pytest.approx((1.8 + 2.4) / 2)  # argmax 2, 3

def test_read_qrels_takes_beir_and_trec_and_names_the_bad_line(tmp_path):
    beir, trec, bad = tmp_path / "test.tsv", tmp_path / "qrels.txt", tmp_path / "bad.tsv"
    beir.write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\n")
    trec.write_text("q1 0 d1 3\nq2 Q0 d9 1\n")
    assert agreement.read_qrels(beir) == {("q1", "d1"): 2, ("q1", "d2"): 0}
    assert agreement.read_qrels(trec) == {("q1", "d1"): 3, ("q2", "d9"): 1}
    bad.write_text("q1\td1\t2\nq1\td2\thigh\n")
    with pytest.raises(sources.DataError, match=r'bad.tsv:2: field "score": \'high\' is not a number'):
        agreement.read_qrels(bad)
    bad.write_text("q1\td1\n")
    with pytest.raises(sources.DataError, match="bad.tsv:1: expected"):
        agreement.read_qrels(bad)



@pytest.fixture(scope="module")
def chat_teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat_teacher")
    _write_teacher(out, "LlamaConfig", "LlamaForCausalLM", True, seed=1)
    return out


def test_cli_labels_resumes_and_compares(chat_teacher_dir, tmp_path, capsys):
    from bixse_jax.cli import main
    path = chat_teacher_dir
    data = _rows(9)
    inp, out, qrels = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "qrels.tsv"
    inp.write_text("".join(json.dumps(r) + "\n" for r in data + data[:2]))  # two repeated rows
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{r['query_id']}\t{r['doc_id']}\t{i % 4}\n"
                                                               for i, r in enumerate(data)))
    args = ["bixse-jax", "label", "--teacher", str(path), "--input", str(inp), "--out", str(out),
            "--batch-size", "8", "--teacher-name", "tiny"]
    main(args)
    first = json.loads(capsys.readouterr().out)["label"]
    assert (first["labelled"], first["repeated_in_input"], first["failed"]) == (9, 2, 0)
    main(args + ["--compare-qrels", str(qrels)])
    report = json.loads(capsys.readouterr().out)
    assert (report["label"]["labelled"], report["label"]["already_labelled"]) == (0, 11)
    assert report["agreement"]["pairs"] == 9 and -1 <= report["agreement"]["spearman"] <= 1
    assert (tmp_path / "out.jsonl.agreement.png").stat().st_size > 1000
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["doc_id"] for r in lines) == sorted(r["doc_id"] for r in data)
    assert all(set(r) >= {"score", "grade_probs", "grade", "teacher", "grade_mass"} for r in lines)


def test_fsdp_mesh_document_cut_and_over_long_prompts(chat_teacher_dir):
    """Parameters split over fsdp=2 give the same labels; long documents are cut to max_doc_tokens
    before the prompt is built; a prompt still over max_len fails alone, with its reason."""
    from bixse_jax import parallel
    from bixse_jax.label.jax_teacher import JaxTeacher
    data = _rows(6)
    data[0] = dict(data[0], query=" ".join(["cat"] * 60))  # the query is never cut
    plain = JaxTeacher(chat_teacher_dir, grades=[0, 1, 2, 3], template=TEMPLATE, batch_size=8, max_len=48,
                       max_doc_tokens=5)
    split = JaxTeacher(chat_teacher_dir, grades=[0, 1, 2, 3], template=TEMPLATE, batch_size=8, max_len=48,
                       max_doc_tokens=5, mesh=parallel.make_mesh(fsdp=2))
    embed = split.params["model"]["embed_tokens"]["embedding"]
    assert tuple(embed.sharding.spec) == (None, "fsdp")  # the embedding width is split
    long_doc = dict(data[1], document=" ".join(["dog"] * 40))
    assert len(plain.prompt_ids([long_doc])[0]) == len(plain.prompt_ids([dict(long_doc, document="dog " * 5)])[0])
    outcomes = {}
    for teacher in (plain, split):
        outcomes[teacher] = {o.row["doc_id"]: o for batch in teacher.label(data) for o in batch}
    assert outcomes[plain]["d0"].error == "prompt has more than 48 tokens (--max-len)"
    for doc_id, o in outcomes[plain].items():
        if doc_id != "d0":
            np.testing.assert_allclose(o.grade_logits, outcomes[split][doc_id].grade_logits, atol=1e-5)


def test_cli_input_errors_are_one_line_exit_2(chat_teacher_dir, tmp_path, capsys):
    from bixse_jax.cli import main
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(_rows(1)[0]) + "\n")
    cases = [(["--grades", "0,12"], "'12' -> 2 tokens"),
             (["--prompt", str(tmp_path / "missing.txt")], "missing.txt"),
             (["--batch-size", "0"], "--batch-size must be >= 1")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["bixse-jax", "label", "--teacher", str(chat_teacher_dir), "--input", str(inp),
                  "--out", str(tmp_path / "o.jsonl"), *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["bixse-jax", "label", "--teacher", "http://127.0.0.1:9/v1", "--input", str(inp), "--out", "o"])
    assert "--model is required" in capsys.readouterr().err


def test_bfloat16_teacher_runs_and_stays_close(chat_teacher_dir):
    from bixse_jax.label.grades import grade_distribution
    from bixse_jax.label.jax_teacher import JaxTeacher
    data = _rows(8)
    probs = {}
    for dtype in ("float32", "bfloat16"):
        teacher = JaxTeacher(chat_teacher_dir, grades=[0, 1, 2, 3], template=TEMPLATE, batch_size=8, dtype=dtype)
        probs[dtype] = {o.row["doc_id"]: grade_distribution(o.grade_logits) for b in teacher.label(data) for o in b}
    assert teacher.params["model"]["norm"]["weight"].dtype == np.dtype("bfloat16")
    diff = max(np.abs(probs["float32"][k] - probs["bfloat16"][k]).max() for k in probs["float32"])
    assert 0 < diff < 0.05  # bfloat16 really ran (not identical) and stays close
