"""Runs the model for a scheduled batch: builds the step's metadata, runs the forward pass, takes the argmax.

Holds the model, the paged KV cache and the static decode buffers. The argmax (greedy_sample) runs on the
device (fused with the LM head on the triton backend); only the chosen token ids and their log-probabilities come back to the host.
"""
from __future__ import annotations

import torch

from .attention_metadata import DecodeBuffers, build_prefill
from .block_manager import blocks_needed
from .kv_cache import KVCache, allocate_kv_cache
from .model import Backend, LlamaModel
from .sequence import Sequence


class ModelRunner:
    def __init__(self, config, weights: dict, backend: Backend, *, device: torch.device, dtype: torch.dtype,
                 num_blocks: int, block_size: int, max_num_seqs: int, max_model_len: int, debug: bool = False):
        self.config = config
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.model = LlamaModel(config, weights, backend, max_positions=max_model_len, validate=debug)
        self.kv_cache: KVCache = allocate_kv_cache(config, num_blocks, block_size, dtype, device)
        self.decode_buffers = DecodeBuffers(max_num_seqs, blocks_needed(max_model_len, block_size), device)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool, *, padded_size: int | None = None
            ) -> tuple[list[int], list[float]]:
        """One forward pass over `seqs` (a prefill batch or a decode batch); returns, per sequence, the next
        token id and its log-probability. `padded_size` pads a decode batch with rows that write no K/V and
        attend to nothing (the shape a captured CUDA graph expects); their outputs are dropped."""
        if is_prefill:
            input_ids, meta = build_prefill(seqs, self.block_size, self.device)
        else:
            input_ids, meta = self.decode_buffers.fill(seqs, self.block_size, padded_size)
        hidden = self.model(input_ids, meta, self.kv_cache)
        token_ids, logprobs = self.model.sample(hidden)
        n = len(seqs)
        return token_ids[:n].tolist(), logprobs[:n].tolist()
