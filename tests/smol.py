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


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run a module's tests with one intra-op thread, then restore the setting.

    These models are small: most ops take microseconds, and on a busy 2-core machine OpenMP's thread
    hand-offs then cost more than the work (seen: a 32-token decode of the default model took 58 s with 2
    threads under load, 2.4 s with 1). Results do not depend on it. Import it into a test module to use it.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
