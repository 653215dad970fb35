"""The paper's comparison: seven losses x three data sets x three seeds, from all-MiniLM-L6-v2.

  python experiments/reproduce.py --out runs/repro --workers 8     # everything (a GPU job: docs/results.md)
  python experiments/reproduce.py --print-commands                 # the `bixse-jax train` line of each run
  python experiments/make_results.py runs/repro/results.jsonl      # docs/results.md table and plot

Every setting of a run (steps, batch, lengths, buckets, evaluation, the chosen learning rate) is in
configs/paper/minilm.py, one `get_config(ARG)` per data set (ARG_dev for the selection); this driver
only loops over it: seeds, losses (VARIANTS), TREC-DL's folds and the selection's candidate rates,
and turns off what a sweep run does not need (checkpoints, a zero-shot evaluation per run). Every
run is one `bixse-jax train --config configs/paper/minilm.py:ARG` command (`--print-commands`
lists them); this driver executes the same configs in-process, in `--workers` processes that share
a JAX compilation cache, because 160-odd runs of a few seconds each would otherwise spend most of
their time starting up. A run's value is its config's `test` (or `dev`) evaluator's metric.

Protocol (docs/results.md says why):
  (a) TREC-DL 2019, grades 0-3 as g/3: 5-fold cross-validation by query, nDCG@10 of re-ranking
      each held-out query's judged pool (judged passages without text are left out);
  (b) STS-B train (score/5), Spearman on STS-B test;
  (c) SciFact train (binary qrels), nDCG@10 of retrieval over the whole corpus for the test queries.
Steps and batch size are fixed per data set (about one epoch of STS-B and TREC-DL, three of
SciFact, batch 32). The learning rate is chosen first, on dev data only: for each of STS-B (its dev
split) and SciFact (fold 0 of 5 of its *train* queries, retrieval over the corpus), the rate of
LEARNING_RATES with the best mean dev score of BiXSE and InfoNCE at seed 0. TREC-DL, whose one
split is the cross-validation's test data, takes SciFact's rate. All losses then use that rate.
The grid stays here, as the sweep's axis; the config keeps the rate the selection chose, so that
running it alone gives the table's BiXSE cell.

Per-loss selection (`--per-loss-lr`, issue 16; grid PER_LOSS_LEARNING_RATES, 3e-6 to 3e-4): every
loss gets its own rate, the best dev score of that loss at seed 0. STS-B and SciFact select on their
dev data as above. TREC-DL's selection is nested inside its cross-validation: for outer test fold k,
each candidate rate trains on the three folds other than k and its dev fold (k + 1) % 5
(`data.fold` = the dev fold, which the config's evaluator scores; `data.exclude_folds` = (k,)), and the
rate chosen for fold k is the one best on that dev fold, so fold k's queries never influence the
choice of the rate its test score is reported at. One inner fold per outer fold, not an inner
cross-validation, to keep the cost at 5 x losses x rates runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shlex
import shutil
import sys
import threading
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAPERS = ("minilm", "smollm2")  # configs/paper/NAME.py: every setting of a run; get_config(ARG) per data set
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
LEARNING_RATES = (1e-5, 3e-5, 1e-4)  # the selection's candidates (the config holds the chosen one)
PER_LOSS_LEARNING_RATES = (3e-6, 1e-5, 3e-5, 1e-4, 3e-4)  # --per-loss-lr: each loss's own selection
SEEDS = (0, 1, 2)
FOLDS = 5
SELECTION_VARIANTS = ("BiXSE", "InfoNCE")

# Loss settings of each row of the table (config overrides on top of the data set's config).
VARIANTS: dict[str, dict[str, Any]] = {
    "BiXSE": {},
    "BiXSE diagonal-only": {"loss.diagonal_only": True},
    "BiXSE binarised": {"loss.binarize_threshold": 0.5},
    "BiXSE no bias": {"loss.learn_bias": False, "loss.init_bias": 0.0},
    "InfoNCE": {"loss.name": "infonce"},
    "graded InfoNCE": {"loss.name": "graded_infonce"},  # soft_infonce (row-normalised) is degenerate: issue 16
    "pairwise BCE": {"loss.name": "pairwise_bce"},
}
ZERO_SHOT = "zero-shot"


@dataclasses.dataclass(frozen=True)
class Dataset:
    folder: str  # under --data-root
    metric: str  # the metric of the table, as the config's evaluator reports it
    dev: bool  # the config has an ARG_dev variant for the learning-rate selection (else: `dev_from`'s rate)
    dev_from: str | None = None
    folds: int = 0  # > 0: one run per held-out fold (data.fold); configs/paper sets data.folds to this


# Keys are the config's arguments (configs/paper/minilm.py:KEY), which hold every setting of a run.
DATASETS: dict[str, Dataset] = {
    "trecdl": Dataset(folder="trec-dl19", metric="ndcg@10", dev=False, dev_from="scifact", folds=FOLDS),
    "stsb": Dataset(folder="stsbenchmark", metric="spearman", dev=True),
    "scifact": Dataset(folder="scifact", metric="ndcg@10", dev=True),
}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run (or, for ZERO_SHOT, one evaluation of the untrained model)."""

    dataset: str
    variant: str
    seed: int
    learning_rate: float
    phase: str  # "select" (dev data) | "test"
    fold: int | None = None  # the evaluated fold (in a nested selection: the dev fold)
    outer_fold: int | None = None  # nested selection: the outer test fold, left out of training too
    # How t and b start and follow the encoder (--logit-init): auto, the library's default (BiXSE: fitted to
    # the starting model, then refitted every step); fixed, the MiniLM table's (log 10, -10, then Adam).
    logit_init: str = "auto"
    paper: str = "minilm"  # the config file, configs/paper/PAPER.py (--paper)

    @property
    def name(self) -> str:
        fold = "" if self.fold is None else f"-fold{self.fold}"
        if self.outer_fold is not None:
            fold = f"-outer{self.outer_fold}{fold}"
        if self.logit_init != "fixed":
            fold += f"-tb{self.logit_init}"
        variant = self.variant.replace(" ", "_")
        paper = "" if self.paper == "minilm" else f"{self.paper}-"
        return f"{paper}{self.phase}-{self.dataset}-{variant}-lr{self.learning_rate:g}-seed{self.seed}{fold}"

    @property
    def config_file(self) -> str:
        return f"configs/paper/{self.paper}.py"


def config_arg(cell: Cell) -> str:
    """The argument of configs/paper/PAPER.py: the data set's reported runs, or its dev variant."""
    if cell.phase == "test" or cell.outer_fold is not None:  # a nested selection runs the data set's own config
        return cell.dataset
    if not DATASETS[cell.dataset].dev:
        raise ValueError(f"{cell.dataset} has no dev data; its learning rate comes from {DATASETS[cell.dataset].dev_from}")
    return f"{cell.dataset}_dev"


def eval_name(cell: Cell) -> str:
    """The config's evaluator whose score is the run's value: `test`, or `dev` in the selection (a nested
    selection's is the config's `test` evaluator, which scores `data.fold`, there the dev fold)."""
    return "test" if cell.phase == "test" or cell.outer_fold is not None else "dev"


def overrides(cell: Cell, data_root: str, model: str | None, steps: int | None = None) -> dict[str, Any]:
    """The `--config.KEY=VALUE` settings of a cell, in the order the command prints them: the sweep's
    axes (seed, rate, loss, fold) and what a sweep run skips; everything else is the config's (model
    None: the config's own model)."""
    out: dict[str, Any] = {"data_dir": f"{data_root}/{DATASETS[cell.dataset].folder}"}
    if model is not None:
        out["model.name_or_path"] = model
    out.update({"seed": cell.seed, "train.learning_rate": cell.learning_rate,
                "train.checkpoint_every": 0, f"evals.{eval_name(cell)}.before_training": False})
    if steps is not None:  # smoke tests
        out.update({"train.num_steps": steps, "train.warmup_steps": max(steps // 10, 1) if steps else 0})
    if cell.variant == ZERO_SHOT:  # no steps: the "after" evaluation is of the pretrained model
        out.update({"train.num_steps": 0, "train.warmup_steps": 0})
    else:
        out.update(VARIANTS[cell.variant])
        if cell.logit_init == "fixed":  # the table's runs of docs/results.md, made before auto was the default
            out.update({"loss.init_logit_params": "fixed", "loss.follow_logit_params": "adam"})
    if cell.fold is not None:
        out["data.fold"] = cell.fold
    if cell.outer_fold is not None:
        out["data.exclude_folds"] = (cell.outer_fold,)
    return out


def _flag_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + "".join(f"{v}," for v in value) + ")"
    return str(value)


def command(cell: Cell, data_root: str, model: str | None, workdir: str, steps: int | None = None) -> str:
    flags = " ".join(shlex.quote(f"--config.{k}={_flag_value(v)}")
                     for k, v in overrides(cell, data_root, model, steps).items())
    return f"bixse-jax train --config {cell.config_file}:{config_arg(cell)} --workdir {workdir}/{cell.name} {flags}"


def paper_module(paper: str = "minilm"):
    """configs/paper/PAPER.py as a module, loaded by path as `--config configs/paper/PAPER.py:ARG` does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"paper_{paper}", ROOT / "configs" / "paper" / f"{paper}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_paper_config(arg: str, paper: str = "minilm"):
    """configs/paper/PAPER.py's get_config(arg), as `--config configs/paper/PAPER.py:ARG` builds it."""
    return paper_module(paper).get_config(arg)


def build_config(cell: Cell, data_root: str, model: str | None, steps: int | None = None):
    """The ConfigDict that `command(cell)` would build (tests/test_reproduce.py checks they agree)."""
    config = load_paper_config(config_arg(cell), cell.paper)
    for key, value in overrides(cell, data_root, model, steps).items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def selection_cells(datasets: list[str], lrs: tuple[float, ...], variants: tuple[str, ...] = SELECTION_VARIANTS,
                    per_loss: bool = False) -> list[Cell]:
    """The selection's runs (seed 0): dev data for each of `variants` and rate; with `per_loss`, also
    the nested runs of a cross-validated data set (outer fold k: dev fold (k + 1) % folds)."""
    cells = [Cell(d, v, 0, lr, "select") for d in datasets if DATASETS[d].dev for v in variants for lr in lrs]
    if per_loss:
        for d in datasets:
            k = DATASETS[d].folds
            cells += [Cell(d, v, 0, lr, "select", fold=(outer + 1) % k, outer_fold=outer)
                      for outer in range(k) for v in variants for lr in lrs]
    return cells


ChosenRates = dict  # dataset -> rate, or (dataset, variant, outer fold | None) -> rate (per loss)


def rate_for(chosen: ChosenRates, dataset: str, variant: str, fold: int | None) -> float:
    """A test run's rate: its loss's for its fold, else its loss's, else its data set's; zero-shot 0."""
    for key in ((dataset, variant, fold), (dataset, variant, None), dataset):
        if key in chosen:
            return chosen[key]
    if variant == ZERO_SHOT:
        return 0.0
    raise KeyError(f"no learning rate chosen for {dataset} / {variant} / fold {fold}")


def test_cells(datasets: list[str], variants: list[str], seeds: tuple[int, ...], lr: ChosenRates) -> list[Cell]:
    """Zero-shot rows first, then seed by seed (so a deadline leaves whole seeds), then the rest."""
    def folds(d: str) -> list[int | None]:
        return list(range(DATASETS[d].folds)) if DATASETS[d].folds else [None]

    cells = [Cell(d, ZERO_SHOT, 0, rate_for(lr, d, ZERO_SHOT, f), "test", f) for d in datasets for f in folds(d)]
    for seed in seeds:
        cells += [Cell(d, v, seed, rate_for(lr, d, v, f), "test", f) for d in datasets for v in variants
                  for f in folds(d)]
    return cells


def choose_per_loss_rates(results: list[dict], datasets: list[str], variants: list[str]) -> ChosenRates:
    """(dataset, variant, outer fold) -> the rate with the best dev score of that loss (ties: the
    smaller rate); outer fold None for a data set with dev data. Only complete grids count."""
    scores: dict[tuple, dict[float, float]] = {}
    for r in results:
        if r["phase"] == "select" and "value" in r and r["dataset"] in datasets and r["variant"] in variants:
            key = (r["dataset"], r["variant"], r.get("outer_fold"))
            scores.setdefault(key, {})[r["learning_rate"]] = r["value"]
    chosen: ChosenRates = {}
    for d in datasets:
        outers = range(DATASETS[d].folds) if DATASETS[d].folds and not DATASETS[d].dev else [None]
        for v in variants:
            for outer in outers:
                grid = scores.get((d, v, outer))
                if not grid:
                    raise RuntimeError(f"no learning-rate selection for {d} / {v} / outer fold {outer}")
                chosen[d, v, outer] = max(sorted(grid), key=lambda lr: grid[lr])  # first best: the smaller rate
    return chosen


def rates_json(chosen: ChosenRates) -> dict[str, float]:
    """JSON keys: DATASET, or DATASET/VARIANT[/outerK]."""
    name = lambda k: k if isinstance(k, str) else "/".join([k[0], k[1]] + ([] if k[2] is None else [f"outer{k[2]}"]))
    return {name(k): v for k, v in chosen.items()}


def choose_learning_rates(results: list[dict], datasets: list[str]) -> dict[str, float]:
    """Per data set with dev data: the rate with the best mean dev score over SELECTION_VARIANTS."""
    chosen: dict[str, float] = {}
    for d in datasets:
        if not DATASETS[d].dev:
            continue
        scores: dict[float, list[float]] = {}
        for r in results:
            if r["dataset"] == d and r["phase"] == "select" and "value" in r:
                scores.setdefault(r["learning_rate"], []).append(r["value"])
        complete = {lr: sum(v) / len(v) for lr, v in scores.items() if len(v) == len(SELECTION_VARIANTS)}
        if not complete:
            raise RuntimeError(f"no complete learning-rate selection for {d}: {scores}")
        chosen[d] = max(complete, key=complete.get)
    for d in datasets:
        if not DATASETS[d].dev:
            source = DATASETS[d].dev_from
            if source not in chosen:
                raise RuntimeError(f"{d} takes its learning rate from {source}, which was not selected")
            chosen[d] = chosen[source]
    return chosen


# ----------------------------------------------------------------------------
# Running cells.
# ----------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def init_worker(compile_cache: str | None, worker_env: dict[str, str]) -> None:
    """Runs first in each worker process: its environment (the GPU memory share, set before JAX
    loads) and the shared compilation cache.

    Never raises: a Pool respawns a worker whose initializer fails, forever, so an error is kept
    and each run of this worker reports it instead.
    """
    os.environ.update(worker_env)
    try:
        import jax
        from absl import logging
        logging.set_verbosity(logging.WARNING)
        if compile_cache:
            jax.config.update("jax_compilation_cache_dir", compile_cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except Exception as e:
        _WORKER["error"] = f"worker set-up failed: {type(e).__name__}: {e}"


def run_cell(cell: Cell, data_root: str, model: str, workroot: str, steps: int | None,
             deadline: float | None) -> dict[str, Any]:
    """Trains and evaluates one cell in this process; its workdir is deleted afterwards."""
    record: dict[str, Any] = {**dataclasses.asdict(cell), "name": cell.name}
    if deadline is not None and time.time() > deadline:
        return {**record, "skipped": "deadline"}
    if "error" in _WORKER:
        return {**record, "error": _WORKER["error"]}
    import jax

    from bixse_jax.train import train

    start = time.time()
    workdir = pathlib.Path(workroot) / cell.name
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        config = build_config(cell, data_root, model, steps)
        summary, state = train(config, workdir, show_progress=False)
    except Exception as e:  # one broken cell must not take the table down; it is reported as failed
        return {**record, "error": f"{type(e).__name__}: {e}", "wall_s": round(time.time() - start, 2)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    metrics = summary["after"][eval_name(cell)]
    params = jax.device_get(state.params)
    return {**record, "metric": DATASETS[cell.dataset].metric, "value": metrics[DATASETS[cell.dataset].metric],
            "metrics": metrics, "steps": summary["steps"], "log_temperature": float(params["log_temperature"]),
            "bias": float(params["bias"]), "wall_s": round(time.time() - start, 2),
            "device": jax.devices()[0].device_kind}


class Runner:
    """Runs cells in `workers` spawned processes (0: in this process) and appends results to a file."""

    def __init__(self, args: argparse.Namespace, results_path: pathlib.Path):
        self.args = args
        self.results_path = results_path
        self.lock = threading.Lock()
        self.done = 0
        self.total = 0
        self.pool = None
        if args.workers > 0:
            import multiprocessing
            mem = args.mem_fraction or (0.9 / args.workers)
            env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{mem:.3f}"}
            self.pool = multiprocessing.get_context("spawn").Pool(
                args.workers, initializer=init_worker, initargs=(args.compile_cache, env))
        else:
            init_worker(args.compile_cache, {})

    def run(self, cells: list[Cell], deadline: float | None) -> list[dict]:
        self.total += len(cells)
        call = (self.args.data_root, self.args.model, self.args.workroot, self.args.steps, deadline)
        if self.pool is None:
            return [self._record(run_cell(c, *call)) for c in cells]
        pending = [self.pool.apply_async(run_cell, (c, *call), callback=self._record) for c in cells]
        return [p.get() for p in pending]

    def _record(self, result: dict) -> dict:
        with self.lock:
            self.done += 1
            with self.results_path.open("a") as f:
                f.write(json.dumps(result) + "\n")
            if "value" in result:
                status = f"{result['metric']}={result['value']:.4f} ({result['wall_s']:.1f} s)"
            else:
                status = result.get("skipped") or result.get("error")
            print(f"[{self.done}/{self.total}] {result['name']}: {status}", flush=True)
        return result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=os.path.relpath(ROOT.parent / "shared" / "data"))
    parser.add_argument("--paper", default="minilm", choices=PAPERS,
                        help="configs/paper/PAPER.py: minilm (the table of docs/results.md) or smollm2 (the "
                             "paper's regime: a base decoder at batch 128, issue 16)")
    parser.add_argument("--model", default=None,
                        help="HF / sentence-transformers folder, hub name or GGUF file (default: minilm: "
                             f"{MINILM}; smollm2: the config's, the packaged GGUF)")
    parser.add_argument("--out", default="runs/repro", help="results.jsonl and selection.json go here")
    parser.add_argument("--workroot", default=None, help="run folders (deleted after each run); default OUT/work")
    parser.add_argument("--workers", type=int, default=0, help="processes (0: this one); a GPU takes ~8")
    parser.add_argument("--mem-fraction", type=float, default=None, help="GPU memory per worker (default 0.9/N)")
    parser.add_argument("--compile-cache", default=None, help="persistent JAX compilation cache folder")
    parser.add_argument("--deadline-s", type=float, default=None, help="start no run after this many seconds")
    parser.add_argument("--datasets", default=None, help="default: every data set the paper's config has")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--learning-rates", default=None,
                        help="candidates for the selection; one value skips it (default: LEARNING_RATES, "
                             "with --per-loss-lr PER_LOSS_LEARNING_RATES)")
    parser.add_argument("--logit-init", default="auto", choices=("fixed", "auto"),
                        help="t and b: auto, the library's default (BiXSE's fitted to the starting model and refitted "
                             "every step, bixse_jax/logit_init.py); fixed, as the MiniLM table ran (log 10, -10, Adam)")
    parser.add_argument("--per-loss-lr", action="store_true",
                        help="select every loss's own rate on dev data, nested in the folds of cross-validated data")
    parser.add_argument("--chosen", default=None,
                        help="DATASET=LR,... : skip the selection and use these rates (an earlier selection.json)")
    parser.add_argument("--skip-results", default=None,
                        help="results.jsonl files or folders of them (comma-separated) of earlier sweeps: "
                             "runs finished there are not redone")
    parser.add_argument("--steps", type=int, default=None, help="override every data set's steps (smoke tests)")
    parser.add_argument("--print-commands", action="store_true")
    args = parser.parse_args(argv)
    paper_datasets = [a for a in paper_module(args.paper).ARGS if a in DATASETS]
    args.datasets = args.datasets.split(",") if args.datasets else paper_datasets
    if args.model is None and args.paper == "minilm":
        args.model = MINILM
    args.variants = args.variants.split(",")
    args.seeds = tuple(int(s) for s in args.seeds.split(","))
    default_rates = PER_LOSS_LEARNING_RATES if args.per_loss_lr else LEARNING_RATES
    args.learning_rates = (tuple(float(x) for x in args.learning_rates.split(",")) if args.learning_rates
                           else default_rates)
    for name, known in (("datasets", paper_datasets), ("variants", VARIANTS)):
        unknown = [x for x in getattr(args, name) if x not in known]
        if unknown:
            parser.error(f"unknown {name} {unknown}; known: {list(known)}")
    args.workroot = args.workroot or os.path.join(args.out, "work")
    if args.chosen:
        args.chosen = {d: float(lr) for d, lr in (item.split("=") for item in args.chosen.split(","))}
        missing = [d for d in args.datasets if d not in args.chosen]
        if missing:
            parser.error(f"--chosen lacks {missing}")
    borrowed = [d for d in args.datasets if DATASETS[d].dev_from and DATASETS[d].dev_from not in args.datasets]
    if borrowed and not (args.chosen or args.per_loss_lr or len(args.learning_rates) == 1):
        parser.error(f"{borrowed} take the learning rate selected on {DATASETS[borrowed[0]].dev_from}, which is not "
                     "in --datasets: add it, or select per loss (--per-loss-lr, nested in the folds), or give --chosen")
    return args


def finished_names(paths: str | None) -> set[str]:
    """Names of the runs that finished (have a value) in comma-separated results.jsonl files or
    folders of them (every *.jsonl inside, e.g. docs/results_runs)."""
    files: list[pathlib.Path] = []
    for path in map(pathlib.Path, filter(None, (paths or "").split(","))):
        files += sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    return {r["name"] for r in rows if "value" in r}


def _selection(args: argparse.Namespace) -> list[Cell]:
    if args.per_loss_lr:
        cells = selection_cells(args.datasets, args.learning_rates, tuple(args.variants), per_loss=True)
    else:
        cells = selection_cells(args.datasets, args.learning_rates)
    return _with_run_settings(cells, args)


def _with_run_settings(cells: list[Cell], args: argparse.Namespace) -> list[Cell]:
    return [dataclasses.replace(c, logit_init=args.logit_init, paper=args.paper) for c in cells]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.time()
    deadline = None if args.deadline_s is None else start + args.deadline_s
    out = pathlib.Path(args.out)
    if args.print_commands:  # with --chosen: the test runs at those rates; else the selection runs too
        lrs = args.chosen or {d: args.learning_rates[0] for d in args.datasets}
        select = [] if args.chosen else _selection(args)
        for cell in select + _with_run_settings(test_cells(args.datasets, args.variants, args.seeds, lrs), args):
            print(command(cell, args.data_root, args.model, os.path.join(args.out, "runs"), args.steps))
        return {}
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    runner = Runner(args, results_path)
    done = finished_names(args.skip_results)
    try:
        if args.chosen:
            chosen, selected = args.chosen, []
        elif len(args.learning_rates) == 1:
            chosen = {d: args.learning_rates[0] for d in args.datasets}
            selected: list[dict] = []
        else:
            selected = runner.run(_selection(args), deadline)
            chosen = (choose_per_loss_rates(selected, args.datasets, args.variants) if args.per_loss_lr
                      else choose_learning_rates(selected, args.datasets))
        selection = {"learning_rates": rates_json(chosen), "candidates": args.learning_rates,
                     "per_loss": args.per_loss_lr,
                     "seconds": round(time.time() - start, 1)}
        (out / "selection.json").write_text(json.dumps(selection, indent=1) + "\n")
        print(f"learning rates: {rates_json(chosen)}", flush=True)
        cells = [c for c in _with_run_settings(test_cells(args.datasets, args.variants, args.seeds, chosen), args)
                 if c.name not in done]
        results = runner.run(cells, deadline)
    finally:
        runner.close()
    summary = {"selection": selection, "runs": len(selected) + len(results),
               "finished": sum("value" in r for r in selected + results),
               "failed": sum("error" in r for r in selected + results),
               "skipped": sum("skipped" in r for r in selected + results),
               "wall_s": round(time.time() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
