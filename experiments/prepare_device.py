"""Packs what the reproduction needs on a lent GPU machine into `.repro/` (git-ignored, carried).

  .venv/bin/python experiments/prepare_device.py [--data-root ../shared/data]

The device tool carries at most 64 MiB and nothing from outside the checkout, so this writes:
  .repro/minilm-fp16/   all-MiniLM-L6-v2 with its weights stored as float16 (45 MB instead of 91 MB;
                        loaded back as float32, see docs/results.md for the effect on zero-shot scores)
  .repro/data.tar.xz    ../shared/data/{stsbenchmark,scifact,trec-dl19} (the image cannot see ../shared)
  .repro/wheels/        the pure-Python packages the GPU image lacks (ml_collections, tensorboardX)
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import tarfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
WHEELS = ("ml_collections==1.1.0", "tensorboardX==2.6.4")
DATASETS = ("stsbenchmark", "scifact", "trec-dl19")


def write_fp16_model(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Copies a sentence-transformers folder, re-saving model.safetensors in float16."""
    from safetensors.numpy import load_file, save_file

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "*.md", ".gitattributes"))
    weights = load_file(src / "model.safetensors")
    for name, value in weights.items():
        if np.abs(value).max() >= np.finfo(np.float16).max:
            raise ValueError(f"{name} does not fit float16")
    save_file({k: v.astype(np.float16) for k, v in weights.items()}, dst / "model.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    out = ROOT / ".repro"
    out.mkdir(exist_ok=True)

    from bixse_jax.models.hf_io import resolve_model_dir
    write_fp16_model(pathlib.Path(resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2")), out / "minilm-fp16")

    data_root = pathlib.Path(args.data_root)
    with tarfile.open(out / "data.tar.xz", "w:xz") as tar:
        for name in DATASETS:
            if not (data_root / name).is_dir():
                sys.exit(f"{data_root / name} is missing")
            tar.add(data_root / name, arcname=name)

    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
                    "-d", str(wheels), *WHEELS], check=True)
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size / 2**20:8.2f} MiB  {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
