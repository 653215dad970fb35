"""The checkpoint format, its one writer and its one reader: Orbax under WORKDIR/checkpoints.

A run's workdir holds `config.json` (the config of its first start) and `checkpoints/STEP/` with
two items: `state` (the whole TrainState: params {"encoder", "log_temperature", "bias"}, optimiser
state, step, rng) and `data` (the input's position, {"next_batch": STEP}).

  save / restore_latest     training: the whole state, laid out like a target state
  restore_model             everything else: the encoder, t and b of one step as a SentenceModel
                            (Orbax partial restore to numpy, whatever the run's device count)
  read_run_config, check_config, write_config    WORKDIR/config.json

Async (training goes on while the write finishes) and keep-K. Orbax writes each step into a
temporary folder and renames it when complete, so a process killed mid-write leaves no partial
checkpoint behind; `restore_latest` also falls back to an older step when the newest is damaged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util

from bixse_jax import matryoshka
from bixse_jax.default_config import base_config
from bixse_jax.errors import UserError
from bixse_jax.models import lora
from bixse_jax.models.architectures import param_shapes
from bixse_jax.models.sentence_model import SentenceModel, load_encoder, with_adapters

CONFIG_NAME = "config.json"
# Keys a resumed run may change: how long, how often to log/save/evaluate, and the device layout.
RESUMABLE_CHANGES = ("train.num_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.async_checkpoints", "train.on_nonfinite", "train.grad_cache_chunk",
                     "data.grain_workers", "evals.", "mesh.", "model.attention_impl", "model.remat",
                     "model.matmul_dtype")


class CheckpointError(UserError):
    """A workdir or checkpoint that cannot be read: no config.json, no such step, another model."""


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """Local folders become absolute (Orbax wants that); gs:// and other URLs pass through epath."""
    text = os.fspath(workdir)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def is_workdir(path: str | os.PathLike) -> bool:
    """A training run folder: `checkpoints/` next to the `config.json` the run wrote."""
    root = workdir_path(path)
    return (root / "checkpoints").is_dir() and (root / CONFIG_NAME).is_file()


# --- training: the whole state -------------------------------------------------------------------


def make_manager(workdir: str | os.PathLike, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict[str, Any]) -> None:
    """Starts an (async) save of `step`; the caller decides when (every N steps, the last, on SIGTERM).
    A LoRA run's frozen base is not saved: `data_state["lora_base"]` names it and its hash instead."""
    state = state.replace(frozen={}) if getattr(state, "frozen", None) else state
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, dict[str, Any], int] | None:
    """(state, data_state, step) of the newest readable checkpoint, or None if there is none.

    `target` (a state of the right structure and shardings) says how to lay the arrays out; its
    frozen LoRA base, never saved, is put back into the restored state.
    """
    frozen = getattr(target, "frozen", None)
    if frozen:
        target = target.replace(frozen={})
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
        state = restored.state.replace(frozen=frozen) if frozen else restored.state
        return state, dict(restored.data), step
    if steps:
        raise RuntimeError(f"{manager.directory}: none of the checkpoints {steps} can be restored")
    return None


def check_base(data_state: dict[str, Any], expected: dict[str, Any], where: Any) -> None:
    """LoRA adapters belong to the base they were trained on ({"lora_base": {"model", "sha256"}}, as
    `save` records it; {}: no LoRA): a checkpoint of another base, or of none, is refused."""
    saved, now = data_state.get("lora_base"), expected.get("lora_base")
    if (saved or {}).get("sha256") == (now or {}).get("sha256"):
        return
    describe = lambda b: f"{b['model']} (sha256 {b['sha256']})" if b else "no LoRA base (full fine-tuning)"
    raise CheckpointError(f"{where}: the checkpoint was trained on {describe(saved)}, but the run now has "
                          f"{describe(now)}; LoRA adapters only fit their own base: restore that base or use a new workdir")


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


# --- the run's config ----------------------------------------------------------------------------

def write_config(workdir: epath.Path, config_json: str) -> None:
    (workdir / CONFIG_NAME).write_text(config_json)


def check_config(workdir: epath.Path, config_json: str) -> bool:
    """False for a new workdir; True if its saved config matches, else a CheckpointError naming
    every key that differs and may not change across a resume."""
    path = workdir / CONFIG_NAME
    if not path.exists():
        return False
    differences = config_differences(json.loads(path.read_text()), json.loads(config_json))
    if differences:
        raise CheckpointError(f"{workdir} holds a run of a different config; use a new workdir or the same "
                              "settings. Differing keys:\n  " + "\n  ".join(differences))
    return True


def config_differences(saved: dict, current: dict, allowed: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
    """'key: checkpoint X, now Y' for every key that differs and may not change across a resume. A key
    the checkpoint's config lacks (added to bixse-jax since, e.g. model.lora.*) at its default now is no difference."""
    flat = lambda d: {".".join(k): v for k, v in traverse_util.flatten_dict(d).items()}
    old, new = flat(saved), flat(current)
    defaults = flat(json.loads(base_config().to_json_best_effort()))
    newer = lambda k: k not in old and k in defaults and new.get(k) == defaults[k]
    return [f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and not k.startswith(allowed) and not newer(k)]


# --- everything else: the model of one step ------------------------------------------------------

def read_run_config(workdir: str | os.PathLike) -> dict[str, Any]:
    """WORKDIR/config.json, the run's config as written at its first start."""
    path = workdir_path(workdir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: not found; is {workdir} a bixse-jax training workdir?")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: cannot read JSON: {e}") from e
    for section, key in (("model", "name_or_path"), ("data", "query_max_len"), ("data", "doc_max_len")):
        if key not in (cfg.get(section) or {}):
            raise CheckpointError(f"{path}: field '{section}.{key}' is missing")
    return cfg


def restore_model(workdir: str | os.PathLike, step: int | None = None) -> SentenceModel:
    """The encoder, t and b of a run's checkpoint (newest, or `step`), with the run's settings.

    Only the "params" subtree of the saved TrainState is read (Orbax partial restore, to numpy):
    the optimiser state's layout never matters, and any device count can read any checkpoint.
    The target's shapes come from the run's base model (model.name_or_path), whose folder also
    provides the tokenizer and config.json of the export. A LoRA run's checkpoint holds adapters:
    they are joined to that base (refused unless its weights hash as the run's did), unmerged.
    """
    root = workdir_path(workdir)
    cfg = read_run_config(root)
    model_cfg = cfg["model"]
    try:
        base = load_encoder(model_cfg["name_or_path"], pooling=model_cfg.get("pooling"),
                            normalize=model_cfg.get("normalize"), query_prompt=model_cfg.get("query_prefix") or "",
                            append_eos=bool(model_cfg.get("append_eos")),
                            **({"bidirectional": True} if model_cfg.get("bidirectional") else {}))
        base = with_adapters(base, lora.spec_from_config(model_cfg.get("lora") or {}), seed=0)  # shapes only
    except (UserError, FileNotFoundError) as e:
        raise CheckpointError(f"{root / 'config.json'}: the run's base model (model.name_or_path) cannot be "
                          f"loaded: {e}") from e
    if not (root / "checkpoints").exists():
        raise CheckpointError(f"{root / 'checkpoints'}: no checkpoint to export (has the run saved one yet?)")
    manager = ocp.CheckpointManager(
        root / "checkpoints",
        options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})
    try:
        lora_base = _lora_source(base, model_cfg["name_or_path"])
        restored, step = _restore_params(manager, root, base, model_cfg["name_or_path"], step, lora_base)
    finally:
        manager.close()
    params = restored.state["params"]
    encoder_params = {k: _float32_tree(v) for k, v in params["encoder"].items()}
    if base.config.lora is not None:  # the adapters onto the base as the run stored it (base_dtype)
        frozen = lora.cast_base(lora.split(base.params)[1], (model_cfg.get("lora") or {}).get("base_dtype", "float32"))
        encoder_params = lora.join(_float32_tree(frozen), encoder_params)
    return dataclasses.replace(
        base, params=encoder_params,
        settings=dataclasses.replace(base.settings, max_seq_length=int(cfg["data"]["doc_max_len"])),
        log_temperature=float(np.float32(params["log_temperature"])), bias=float(np.float32(params["bias"])),
        query_max_len=int(cfg["data"]["query_max_len"]), doc_max_len=int(cfg["data"]["doc_max_len"]),
        source={"workdir": str(root), "step": int(step), "base_model": model_cfg["name_or_path"],
                "loss": (cfg.get("loss") or {}).get("name"), **lora_base},
        matryoshka_dims=matryoshka.resolve_dims((cfg.get("loss") or {}).get("matryoshka_dims") or (),
                                                base.config.hidden_size))


def _restore_params(manager: ocp.CheckpointManager, root: epath.Path, base: SentenceModel, base_name: str,
                    step: int | None, lora_base: dict[str, Any]) -> tuple[Any, int]:
    """(restored Composite with state.params only, step): metadata checked against the base model first."""
    steps = sorted(manager.all_steps())
    if not steps:
        raise CheckpointError(f"{root / 'checkpoints'}: no checkpoint to export (has the run saved one yet?)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{root / 'checkpoints'}: no checkpoint of step {step}; there are steps {steps}")
    where = root / "checkpoints" / str(step)

    adapted = base.config.lora is not None
    shapes = param_shapes(base.config)
    expected = traverse_util.flatten_dict(lora.split(shapes)[0] if adapted else shapes)  # LoRA: adapters only
    try:
        saved = manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)["params"]
        saved_encoder = traverse_util.flatten_dict(saved["encoder"])
        _ = saved["log_temperature"], saved["bias"]
    except Exception as e:
        raise CheckpointError(f"{where}: cannot read the checkpoint's parameter metadata "
                          f"({type(e).__name__}: {e}); is it a bixse-jax train state?") from e
    wrong = sorted(f"{'/'.join(k)}: checkpoint {tuple(saved_encoder[k].shape) if k in saved_encoder else 'absent'}, "
                   f"model {expected[k].shape}" for k in expected
                   if k not in saved_encoder or tuple(saved_encoder[k].shape) != expected[k].shape)
    extra = sorted("/".join(k) for k in saved_encoder.keys() - expected.keys())
    if wrong or extra:
        raise CheckpointError(f"{where}: the checkpoint's encoder does not match the base model "
                          f"{base_name} ({base.config.model_type}); " + "; ".join(wrong[:10] + extra[:10]))

    as_numpy = lambda tree: {k: as_numpy(v) if isinstance(v, dict) else ocp.RestoreArgs(restore_type=np.ndarray)
                             for k, v in tree.items()}
    item = {"params": {"encoder": _zeros(expected), "log_temperature": np.float32(0), "bias": np.float32(0)}}
    data = {"data": ocp.args.JsonRestore()} if adapted else {}
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=as_numpy(item), partial_restore=True), **data))
    except Exception as e:
        raise CheckpointError(f"{where}: cannot be restored ({type(e).__name__}: {e}); other steps: "
                          f"{[s for s in steps if s != step]}") from e
    if adapted:
        check_base(dict(restored.data), lora_base, where)
    return restored, step


def _lora_source(base: SentenceModel, name: str) -> dict[str, Any]:
    """{"lora_base": {"model", "sha256"}} of a LoRA model's base (its weights' hash), as `save` records it; {}: no LoRA."""
    if base.config.lora is None:
        return {}
    return {"lora_base": {"model": name, "sha256": lora.fingerprint(lora.split(base.params)[1])}}


def _zeros(flat_shapes: dict[tuple[str, ...], Any]) -> dict:
    """A nested tree of zero numpy arrays of the given shapes: an Orbax restore target."""
    return traverse_util.unflatten_dict({k: np.zeros(v.shape, v.dtype) for k, v in flat_shapes.items()})


def _float32_tree(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _float32_tree(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float32)
