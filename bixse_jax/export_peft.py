"""A LoRA model's adapters as a PEFT folder, for `peft` over the unchanged base model:

  adapter_config.json         peft's LoraConfig: r, lora_alpha, lora_dropout, target_modules (a regex
                              naming exactly the adapted layers), base_model_name_or_path
  adapter_model.safetensors   `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight`
                              [out, r]: PEFT's names, transposed from A [in, r] and B [r, out]

`peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(BASE), DIR)` then embeds as the
bixse-jax model does (the same scaling alpha / r). Module names are those of transformers' AutoModel
(BertModel, ModernBertModel, LlamaModel / Qwen2Model / Qwen3Model: no `model.` prefix).
"""

from __future__ import annotations

import pathlib
import re

import numpy as np
from flax import traverse_util

from bixse_jax.export_folder import ExportError, write_json
from bixse_jax.models import families, lora
from bixse_jax.models.sentence_model import SentenceModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def check(model: SentenceModel) -> None:
    if model.config.lora is None:
        raise ExportError("--format peft writes LoRA adapters, and this model has none (train with model.lora.rank > 0)")


def _module_name(layer: tuple[str, ...], base_model_scope: str | None) -> str:
    """Our path of an adapted layer -> the AutoModel's module name (without the family's
    `base_model_scope`, e.g. the decoders' `model/`)."""
    return ".".join(layer[1:] if base_model_scope is not None and layer[0] == base_model_scope else layer)


def _pattern(name: str) -> str:
    """A module name as a regex with its layer index free: encoder.layer.3.attention -> encoder\\.layer\\.\\d+\\..."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))


def write(tmp: pathlib.Path, model: SentenceModel) -> list[str]:
    """Writes the two PEFT files of `model`'s adapters into `tmp`; returns their names."""
    from safetensors.numpy import save_file
    check(model)
    spec = model.config.lora
    scope = families.of(model.config).base_model_scope
    tensors, modules = {}, set()
    for path, x in traverse_util.flatten_dict(lora.split(model.params)[0]).items():
        name = _module_name(path[:-1], scope)
        modules.add(name)
        kind = "lora_A" if path[-1] == "lora_a" else "lora_B"
        tensors[f"{_PEFT_PREFIX}{name}.{kind}.weight"] = np.ascontiguousarray(np.asarray(x, np.float32).T)
    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    base = model.source.get("base_model") or model.source.get("model")
    write_json(tmp / CONFIG_NAME, {
        "peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "base_model_name_or_path": base,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "target_modules": "(?:" + "|".join(sorted({_pattern(m) for m in modules})) + ")",
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False})
    return [CONFIG_NAME, WEIGHTS_NAME]
