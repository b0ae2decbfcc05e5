"""The default model (SmolLM2-135M-Instruct GGUF), loaded once per test process and shared (read-only).

Loading dequantizes ~135M parameters (seconds on these CPUs); tests that need the model in fp32 on the CPU
share this one copy instead of loading it again. Skips the calling test when the model is not installed.
"""
import functools

import pytest
import torch


@functools.lru_cache(maxsize=1)
def _load():
    from trinfer.runtime.default_model import default_model_path
    from trinfer.runtime.loader import load_model_files

    path = default_model_path()
    return path, load_model_files(path, device="cpu", dtype=torch.float32, progress=False)


def default_model():
    """(path, LoadedModel in fp32 on the CPU), or skip."""
    try:
        return _load()
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"default model not installed: {e}")
