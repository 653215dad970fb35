"""The LLM teacher (`bixse-jax label`): graded relevance from a decoder's token probabilities.

  prompts.py     the prompt template ({query}, {document}) and the model's chat template
  grades.py      grade tokens, p(grade) = softmax over the grade tokens only, the output row
  rows.py        candidate rows in; the resumable JSONL writer; SIGTERM / Ctrl-C between batches
  jax_teacher.py a decoder run here: last-position logits, left-padded length buckets, the mesh
  http_teacher.py an OpenAI-compatible server: logprobs, bounded concurrency, retries
  run.py         the loop both teachers share: skip what is done, label, write per batch
  agreement.py   expected and argmax grades against human qrels: correlations, kappa, plot
"""
