"""One of two JAX processes (4 CPU devices each) computing the ring loss over their 8 devices.

Run by tests/test_blocked_loss.py: `python two_process_ring.py PORT PROCESS_ID LOSS VARIANT`; process 0
prints the loss, metrics and gradients (gathered whole) as JSON.
"""

import json
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, process_id, name, variant = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id, initialization_timeout=60)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from bixse_jax import parallel, step  # noqa: E402
from test_blocked_loss import B, PARAMS, _batch, _cfg, _embeddings  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 8
mesh = parallel.make_mesh(8)
half = slice(process_id * B // 2, (process_id + 1) * B // 2)  # this process's devices hold these rows
q, d = _embeddings()
local = {**{k: v[half] for k, v in _batch().items()}, "q": q[half], "d": d[half]}
arrays = parallel.global_batch(local, mesh)
q, d = arrays.pop("q"), arrays.pop("d")
objective = step.make_objective(_cfg(name, "ring", variant), mesh)
fn = jax.value_and_grad(lambda p, q, d, batch: objective(p, q, d, batch), argnums=(0, 1, 2), has_aux=True)
(loss, metrics), grads = jax.jit(fn)(jax.device_put(PARAMS, parallel.replicated(mesh)), q, d, arrays)
whole = multihost_utils.process_allgather((loss, metrics, grads), tiled=True)
if process_id == 0:
    print(json.dumps(jax.tree.map(lambda x: np.asarray(x).tolist(), whole)))
