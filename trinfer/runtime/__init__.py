"""trinfer's runtime: load a checkpoint, run the Llama-family model over a paged KV cache, serve requests.

    from trinfer.runtime import LLM, Engine, SamplingParams

Modules, in the order a request meets them (nano-vllm's layout):
    config, loader, tokenizer, default_model   checkpoint -> ModelConfig, fused weights, tokenizer
    fields, chat_template                      typed reads of untrusted model files; bounded chat templates
    sampling_params, sequence                  a request and its state
    prefix_cache, block_manager, kv_cache      the paged KV cache: shared cached blocks, who holds which block
    scheduler                                  continuous batching, chunked prefill, preemption by recompute
    attention_metadata, model, model_runner    one forward pass: metadata, the model, the argmax
    memory_plan, engine, llm                   what fits in memory; add_request / step / abort; the batch API
    distributed, tp_worker                     tensor parallelism: shards, process groups, collectives; the
                                               per-step messages rank 0 sends and the other ranks follow
    spec/                                      speculative decoding: proposers (n-gram, draft model), acceptance,
                                               adaptation, statistics
"""
from .chat_template import ChatTemplateError, TemplateLimits
from .distributed import TensorParallelError
from .engine import Engine, RequestOutput, RequestTimings
from .fields import ModelFileError
from .llm import LLM
from .sampling_params import SamplingParams

__all__ = ["LLM", "Engine", "SamplingParams", "RequestOutput", "RequestTimings", "ModelFileError",
           "ChatTemplateError", "TemplateLimits", "TensorParallelError"]
