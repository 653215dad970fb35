"""Cross-validation folds by query (bixse_jax/data/folds.py)."""

import pytest

from bixse_jax.data import folds
from bixse_jax.data.sources import DataError


def test_folds_partition_the_queries_evenly_and_repeatably():
    ids = [f"q{i}" for i in range(43)]
    a = folds.assign_folds(ids, 5, seed=0)
    assert set(a) == set(ids)
    sizes = sorted(sum(f == k for f in a.values()) for k in range(5))
    assert sizes == [8, 8, 9, 9, 9]
    assert folds.assign_folds(list(reversed(ids)) + ids[:3], 5, seed=0) == a  # order and repeats do not matter
    assert folds.assign_folds(ids, 5, seed=1) != a


def test_fold_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="at least 2 folds"):
        folds.assign_folds(["a", "b"], 1)
    with pytest.raises(ValueError, match="3 queries cannot fill 5 folds"):
        folds.assign_folds(["a", "b", "c"], 5)
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2 d2 1\n")
    with pytest.raises(DataError, match=r"test.tsv:3: field \"query-id\""):
        folds.qrels_query_ids(tmp_path, "test")
    with pytest.raises(ValueError, match=r"fold must be in \[0, 2\)"):
        folds.held_out_queries(tmp_path, "test", 2, 2)


def test_exclude_folds_keeps_more_folds_out_of_training(tmp_path):
    """data.exclude_folds: training drops fold `fold` and every excluded fold; bad settings are refused."""
    from bixse_jax import experiment
    from bixse_jax.default_config import base_config
    from bixse_jax.errors import ConfigError
    from tiny_data import tiny_data_root

    cfg = base_config().data
    cfg.kind, cfg.path, cfg.split, cfg.folds, cfg.fold = "beir", str(tiny_data_root(tmp_path) / "trec-dl19"), "test", 5, 1
    cfg.skip_missing_docs = True
    only_fold = {p.query_id for p in experiment.load_train_pairs(cfg)}
    cfg.exclude_folds = (3,)
    both = {p.query_id for p in experiment.load_train_pairs(cfg)}
    fold3 = folds.held_out_queries(cfg.path, "test", 5, 3)
    assert both == only_fold - fold3 and fold3 <= only_fold and both
    cfg.exclude_folds = (1,)
    with pytest.raises(ConfigError, match="holds data.fold=1"):
        experiment.load_train_pairs(cfg)
    cfg.folds, cfg.exclude_folds = 0, (3,)
    with pytest.raises(ConfigError, match="needs data.folds"):
        experiment.load_train_pairs(cfg)
