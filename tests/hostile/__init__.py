"""The hostile-input cases of tests/test_hostile_inputs.py: malformed GGUF files, safetensors headers,
config.json / index / tokenizer files, chat templates, prompts, engine arguments and command lines.

Each `Case` does one hostile thing in a worker process (`hostile/worker.py`) and says what must come of it:
the exception type (or success) and the strings its message must contain, "{path}" standing for the file
the case wrote. Files are made from one valid tiny model (`build_base`: a llama GGUF written by
`gguf_writer` and the same model as a Hugging Face directory), changed one field at a time, plus seeded
random mutations, so the set is the same on every run.

    core            Case, the registry, the base model, Ctx (what a case gets in the worker)
    gguf_cases      GGUF header, metadata, tensor directory, sentencepiece vocabularies, random mutations
    hf_cases        config.json, generation_config.json, index, safetensors, tokenizer files, paths
    request_cases   chat templates, prompts and token ids, engine arguments
    cli_cases       `trinfer generate` mistakes: exit 2 and one line
"""
from . import cli_cases, gguf_cases, hf_cases, request_cases  # noqa: F401  (they register their cases)
from .core import CASES, GOOD_NEW_TOKENS, GOOD_PROMPT, Case, Ctx, base_spec, build_base

GROUPS = tuple(dict.fromkeys(c.group for c in CASES))

__all__ = ["CASES", "GROUPS", "Case", "Ctx", "build_base", "base_spec", "GOOD_PROMPT", "GOOD_NEW_TOKENS"]
