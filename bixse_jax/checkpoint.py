"""Orbax checkpoints under WORKDIR/checkpoints: train state and the data iterator's position.

Async (training goes on while the write finishes) and keep-K. Orbax writes each step into a
temporary folder and renames it when complete, so a process killed mid-write leaves no partial
checkpoint behind; `restore_latest` also falls back to an older step when the newest is damaged.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import orbax.checkpoint as ocp
from absl import logging
from etils import epath


def make_manager(workdir: str | os.PathLike, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict[str, Any]) -> None:
    """Starts an (async) save of `step`; the caller decides when (every N steps, the last, on SIGTERM)."""
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, dict[str, Any], int] | None:
    """(state, data_state, step) of the newest readable checkpoint, or None if there is none.

    `target` (a state of the right structure and shardings) says how to lay the arrays out.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    damaged: list[int] = []
    for i, step in enumerate(steps):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        except Exception as e:  # damaged files: say so and try the one before
            older = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint left"
            logging.warning("checkpoint %d in %s cannot be restored (%s: %s); %s",
                            step, manager.directory, type(e).__name__, e, older)
            print(f"[bixse-jax] checkpoint {step} is damaged ({type(e).__name__}); {older}", file=sys.stderr, flush=True)
            damaged.append(step)
            continue
        _set_aside(manager, damaged)
        return restored.state, dict(restored.data), step
    if steps:
        raise RuntimeError(f"{manager.directory}: none of the checkpoints {steps} can be restored")
    return None


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves damaged steps to WORKDIR/damaged_checkpoints/ (kept for inspection, never deleted), so
    that training can write those step numbers again."""
    if not steps:
        return
    directory = epath.Path(manager.directory)
    aside = directory.parent / "damaged_checkpoints"
    aside.mkdir(parents=True, exist_ok=True)
    for step in steps:
        target = aside / f"{step}-{int(time.time())}"
        (directory / str(step)).rename(target)
        logging.warning("moved damaged checkpoint %d to %s", step, target)
    manager.reload()
