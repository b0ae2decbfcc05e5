"""@triton.jit kernels only. Host wrappers live one level up (trinfer/triton_kernels/<op>.py)."""
