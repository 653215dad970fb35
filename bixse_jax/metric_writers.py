"""Training metrics as TensorBoard events and JSON lines in the workdir (local or gs://).

Appending, so a resumed run continues the same history; only process 0 writes.
"""

from __future__ import annotations

import json
from typing import Any

from etils import epath


class MetricsWriter:
    def __init__(self, workdir: epath.Path, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(workdir / "tensorboard"))
            self._jsonl = (workdir / "metrics.jsonl").open("a")

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
