"""trinfer: a lean LLM inference runtime whose hot paths are hand-written Triton kernels.

Packages:
    trinfer.triton_kernels  @triton.jit kernels, their typed host wrappers and PyTorch references
    trinfer.runtime         config, loading, model, paged KV cache, scheduler, engine
"""

__version__ = "0.1.0"
