"""Orbax checkpoints under WORKDIR/checkpoints: train state and the data iterator's position.

Async (training goes on while the write finishes), keep-K, and saved every N steps plus the last
step; `restore_latest` is how `train` resumes after an interruption or preemption.
"""

from __future__ import annotations

import pathlib
from typing import Any

import orbax.checkpoint as ocp


def make_manager(workdir: str | pathlib.Path, *, keep: int,
                 async_save: bool = True) -> ocp.CheckpointManager:
    directory = pathlib.Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict[str, Any]) -> None:
    """Starts an (async) save of `step`; the caller decides when (every N steps and the last)."""
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[Any, dict[str, Any], int] | None:
    """(state, data_state, step) of the newest complete checkpoint, or None if there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, dict(restored.data), step
