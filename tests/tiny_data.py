"""Miniature copies of the real data folders (STS-B, SciFact, TREC-DL 2019) in their real layouts,
for runs of the paper's configs and the reproduction driver in seconds."""

import json
import pathlib

import numpy as np


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def tiny_data_root(root: pathlib.Path) -> pathlib.Path:
    """Miniature STS-B, SciFact and TREC-DL folders in the real layouts (ROOT/stsbenchmark, ...)."""
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
            if name == "trec-dl19":  # a judged passage without text, as TREC-DL has: skip_missing_docs
                rows.append("q0\td99\t2")
            (folder / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def scifact_subset(src: pathlib.Path, out: pathlib.Path, split: str, queries: int, others: int) -> pathlib.Path:
    """A small BEIR folder cut from the real SciFact at `src`: the first `queries` judged queries of
    `split`, their judged abstracts and `others` more, with their qrels."""
    rows = [line.split("\t") for line in (src / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]]
    qids = list(dict.fromkeys(q for q, _, _ in rows))[:queries]
    rows = [r for r in rows if r[0] in qids]
    judged = {d for _, d, _ in rows}
    corpus = [json.loads(line) for line in (src / "corpus.jsonl").read_text().splitlines()]
    all_queries = [json.loads(line) for line in (src / "queries.jsonl").read_text().splitlines()]
    (out / "qrels").mkdir(parents=True)
    _write_jsonl(out / "corpus.jsonl", [c for c in corpus if c["_id"] in judged]
                 + [c for c in corpus if c["_id"] not in judged][:others])
    _write_jsonl(out / "queries.jsonl", [q for q in all_queries if q["_id"] in qids])
    (out / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in rows))
    return out
