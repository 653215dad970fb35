"""bixse-jax: dense-retrieval training with BiXSE (sigmoid BCE on graded targets) in JAX/Flax."""

from setuptools import find_packages, setup

# Intel MKL ships wheels for x86-64 only; elsewhere the MKL matmul path reports itself unavailable.
MKL = "mkl>=2025; platform_machine == 'x86_64' or platform_machine == 'AMD64'"
# The 2.x API (EncoderProtocol, AbsEncoder, mteb.evaluate) that bixse_jax/eval/mteb_model.py wraps.
MTEB = "mteb>=2.26,<3"

setup(
    name="bixse-jax",
    version="0.1.0",
    description="Train sentence-embedding models with BiXSE: pointwise sigmoid BCE against graded "
    "relevance targets over in-batch similarity matrices, on JAX device meshes.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["bixse_jax", "bixse_jax.*"]),
    # The MKL matmul handler's source, built on first use (bixse_jax/models/cpu_blas.py).
    package_data={"bixse_jax.models": ["cpu_blas_ffi.cc"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "absl-py",
        "numpy>=1.26",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "tensorboardX>=2.6",
        "tqdm",
        "huggingface_hub>=0.20",  # every export's README.md is its ModelCard (tokenizers needs it anyway)
        # ArrayRecord data sets built without TensorFlow, read with grain (`data.kind=arrayrecord`).
        "tensorflow-datasets>=4.9.9",
        "array_record>=0.8",
        "grain>=0.2.18",
        "importlib_resources",  # tfds needs it to build a builder that lives in a package
    ],
    extras_require={
        # Float32 dense layers through Intel MKL on a CPU (`--dense-impl mkl`, docs/benchmarks.md);
        # needs a C++17 compiler too.
        "mkl": [MKL],
        # GGUF files (llama.cpp): read and dequantised by the gguf package (bixse_jax/models/gguf_io.py).
        "gguf": ["gguf>=0.10"],
        # `bixse-jax label`: chat templates (jinja2), agreement figures (scipy) and their plot (matplotlib).
        "label": ["jinja2>=3.1", "scipy>=1.11", "matplotlib>=3.8"],
        # `bixse-jax eval --mteb` and bixse_jax/eval/mteb_model.py: MTEB's tasks through our encoder.
        # mteb needs torch (its data loaders), pinned as in the test extra below.
        "mteb": [MTEB, "torch==2.13.0"],
        # benchmarks/ beside the peers, never part of the main install: torch + transformers
        # (cpu_vs_peer.py), sentence-transformers (encode_cpu.py, mine_vs_st.py, which also needs datasets).
        "bench": ["torch==2.13.0", "transformers>=4.40", "sentence-transformers>=6,<7", "datasets>=2.19"],
        # torch is pinned: 2.13.0 is the CPU build these machines carry; an unpinned torch pulls
        # a multi-GB CUDA build. It and sentence-transformers serve the interoperability tests.
        "test": ["pytest>=8", "pytest-xdist>=3.8",  # the suite runs on 2 workers (README test command)
                 "scipy>=1.11", "ir-measures>=0.3", "torch==2.13.0", "sentence-transformers>=6,<7",
                 "matplotlib>=3.8",  # matplotlib: the reproduction's plot (experiments/make_results.py)
                 "gguf>=0.10",  # tests/test_gguf.py
                 "accelerate>=1.0",  # tests/test_gguf.py: transformers reads GGUF files only with it
                 "jinja2>=3.1",  # tests/test_label.py: chat templates
                 MTEB,  # tests/test_mteb.py
                 "peft>=0.13",  # tests/test_lora.py: the PEFT adapter folder loads onto its base in peft
                 MKL],  # tests/test_cpu_blas.py
    },
    entry_points={"console_scripts": ["bixse-jax=bixse_jax.cli:main"]},
)
