"""Command line: `trinfer <command> ...` (also `python -m trinfer`).

    trinfer generate "prompt" [--model PATH] [--max-new-tokens N] [--chat [--no-thinking]] [--stream] [--stop S]
                     [--dtype auto|float32|bfloat16|float16] [--backend triton|torch|cuda|cuda:FAMILY[+FAMILY]]
                     [--device cpu|cuda] [--no-cuda-graphs] [--quantize int8|int4] [--batch-invariant]
                     [--tensor-parallel N] [--no-prefix-caching] [--max-num-batched-tokens N]
                     [--speculative ngram|draft [--speculative-tokens K] [--draft-model PATH]]
    torchrun --nproc-per-node N -m trinfer generate ...   (every rank runs it; rank 0 prints, the others follow)
    trinfer serve [--model PATH] [--host 127.0.0.1] [--port 8000] [engine options] [--max-num-seqs N] ...
    trinfer profile [--model PATH | --shape NAME] [--batch B] [--context N] [--steps K] [--out DIR]
                    [--no-prefix-caching] [--max-num-batched-tokens N] [--speculative ngram|draft ...]

Each command is a pair of functions: `_add_<command>(subparsers)` declares its arguments and
`_run_<command>(args)` runs it; `_COMMANDS` lists them. Every command runs through `run_command`, which
turns errors into one line on stderr: errors in the user's input (arguments, model files, prompts,
templates: ValueError and its subclasses such as ModelFileError, OSError, MemoryError) print
`trinfer: error: ...` and exit with status 2; anything else is a bug of trinfer's and prints
`trinfer: internal error: ...` with a hint, exit status 1. `--debug` (on every command) prints the
traceback too.
"""
from __future__ import annotations

import argparse
import sys
import traceback


def _add_engine_options(p) -> None:
    """The model and engine options that `generate` and `serve` share."""
    p.add_argument("--model", default=None,
                   help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct, offline)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="compute dtype (auto: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--backend", default=None, metavar="NAME",
                   help="kernels: triton (default on CUDA), torch (their PyTorch references; default on the CPU), "
                        "cuda (Triton with rms_norm and decode_attention on the CUDA C++ kernels) or "
                        "cuda:FAMILY[+FAMILY] (only those on CUDA C++, e.g. cuda:decode_attention)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (16)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache size in blocks (default: from memory)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch's ops (default: torch's choice); 1 can be much faster for a small "
                        "model on a busy machine")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="replay the decode step from CUDA graphs captured at start-up (CUDA with the triton or cuda "
                        "backend; default on); --no-cuda-graphs runs every step eagerly")
    p.add_argument("--quantize", default=None, choices=("int8", "int4"),
                   help="quantize the q/k/v, o, gate/up and down matrices of a dense checkpoint at load (int8: "
                        "per-row scales; int4: groups of 128 with zero points); run by the Triton linear kernel")
    p.add_argument("--batch-invariant", action="store_true",
                   help="decode every matrix product on the batch-invariant Triton linear kernel (default off: its "
                        "cost at batch 1 is not yet measured on a GPU)")
    p.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                   help="shard the model over N GPUs (N processes; gloo on the CPU); under torchrun the default is "
                        "its WORLD_SIZE")
    p.add_argument("--tp-timeout", type=float, default=None, metavar="S",
                   help="seconds a tensor-parallel collective (and start-up) may wait (600)")
    add_scheduling_arguments(p)
    add_speculative_arguments(p)


def add_speculative_arguments(p: argparse.ArgumentParser) -> None:
    """--speculative ngram|draft, --speculative-tokens K, --draft-model PATH (generate, serve and profile)."""
    p.add_argument("--speculative", default=None, choices=("ngram", "draft"),
                   help="speculative decoding (same tokens as plain greedy): ngram (prompt lookup: continue an "
                        "earlier occurrence of the last tokens) or draft (a smaller model with the same tokenizer, "
                        "--draft-model); default off")
    p.add_argument("--speculative-tokens", type=int, default=None, metavar="K",
                   help="tokens proposed per sequence and step, 1-16 (4)")
    p.add_argument("--draft-model", default=None, metavar="PATH",
                   help="with --speculative draft: the draft checkpoint (Hugging Face directory or .gguf)")


def speculative_option(args) -> dict | None:
    """The engine's `speculative=` from the flags of `add_speculative_arguments` (None: off); ValueError naming
    the flag for a combination that means nothing."""
    method = getattr(args, "speculative", None)
    if method is None:
        for flag, value in (("--speculative-tokens", args.speculative_tokens), ("--draft-model", args.draft_model)):
            if value is not None:
                raise ValueError(f"{flag}: given without --speculative (ngram or draft)")
        return None
    if args.draft_model is not None and method != "draft":
        raise ValueError(f"--draft-model: only with --speculative draft, got --speculative {method}")
    if method == "draft" and args.draft_model is None:
        raise ValueError("--speculative draft: needs --draft-model PATH (a smaller model with the same tokenizer)")
    spec: dict = {"method": method}
    if args.speculative_tokens is not None:
        spec["num_tokens"] = args.speculative_tokens
    if args.draft_model is not None:
        spec["model"] = args.draft_model
    return spec


def add_scheduling_arguments(p: argparse.ArgumentParser, *, default_budget: str = "") -> None:
    """--prefix-caching / --no-prefix-caching and --max-num-batched-tokens (generate, serve and profile)."""
    p.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of prompt prefixes that earlier requests computed (default on); "
                        "--no-prefix-caching computes every prompt in full")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                   help="most tokens computed per step: longer prompts are prefilled in chunks while running "
                        f"requests keep decoding (default {default_budget or '128 on the CPU, 512 on CUDA'})")


def _engine_kwargs(args) -> dict:
    """Engine/LLM keyword arguments from `_add_engine_options`' flags; sets torch's CPU threads (--threads)."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected an int >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    kwargs = dict(dtype=args.dtype, backend=args.backend, device=args.device, block_size=args.block_size,
                  num_kv_blocks=args.num_kv_blocks, cuda_graphs=args.cuda_graphs, quantize=args.quantize,
                  batch_invariant=args.batch_invariant, tensor_parallel_size=args.tensor_parallel,
                  enable_prefix_caching=args.prefix_caching, max_num_batched_tokens=args.max_num_batched_tokens,
                  speculative=speculative_option(args))
    if args.tp_timeout is not None:
        kwargs["tp_timeout"] = args.tp_timeout
    return kwargs


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="greedily continue a prompt (or answer it with --chat)",
                       description="Greedy generation with a Llama-family model; the answer goes to stdout, "
                                   "timings to stderr.")
    p.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="most tokens to generate (256)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template (prompt as a user message)")
    p.add_argument("--no-thinking", action="store_true",
                   help="with --chat: render the template with enable_thinking=false (Qwen3 answers without "
                        "reasoning first); templates without that switch ignore it")
    p.add_argument("--stream", action="store_true", help="print the text as it is decoded")
    p.add_argument("--stop", action="append", default=None, metavar="S",
                   help="stop when the text contains S (repeatable); S is not printed")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")
    _add_engine_options(p)
    p.add_argument("--quiet", action="store_true", help="no timings on stderr")


def _run_generate(args) -> int:
    from trinfer.runtime import LLM, SamplingParams

    if args.no_thinking and not args.chat:
        raise ValueError("--no-thinking: it sets a variable of the chat template; add --chat")
    prompt = _read_stdin() if args.prompt == "-" else args.prompt
    engine_kwargs = _engine_kwargs(args)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, stop=args.stop, ignore_eos=args.ignore_eos)
    llm = LLM(args.model, max_num_seqs=1, **engine_kwargs)  # under torchrun, ranks > 0 follow rank 0 and exit here

    def stream(out):
        if out.delta_text:
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()

    template_kwargs = {"enable_thinking": False} if args.no_thinking else None
    with llm:
        out = llm.generate(prompt, chat=args.chat, chat_template_kwargs=template_kwargs, sampling_params=params,
                           on_output=stream if args.stream else None)[0]
    if not args.stream:
        sys.stdout.write(out.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        t = out.timings
        tps = t.decode_tokens_per_s
        eng = llm.engine
        print(f"[{len(out.token_ids)} tokens, finish: {out.finish_reason}; time to first token "
              f"{t.ttft * 1e3:.1f} ms; decode {f'{tps:.1f} tokens/s' if tps else 'n/a'}; {eng.backend_name} backend, "
              f"{str(eng.dtype).removeprefix('torch.')}, {eng.device}"
              f"{'; ' + eng.runner.graph_summary() if eng.device.type == 'cuda' else ''}; "
              f"{eng.prefix_cache_summary()}{'; ' + eng.spec_summary() if eng.speculator is not None else ''}]",
              file=sys.stderr)
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)",
                       description="Serve the model over OpenAI's HTTP API (streaming, cancellable, bounded); "
                                   "stops gracefully on SIGTERM/SIGINT.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (8000; 0 picks a free one)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the model file or directory name, without .gguf)")
    _add_engine_options(p)
    p.add_argument("--max-num-seqs", type=int, default=32, metavar="N", help="most requests decoded at once (32)")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="context length (default: the model's)")
    p.add_argument("--max-waiting", type=int, default=64, metavar="N",
                   help="requests that may wait beyond the running ones; more get 429 with Retry-After (64)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="abort a request S seconds after it arrives (600; 0: never)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, metavar="N",
                   help="larger request bodies get 413 (4 MiB)")
    p.add_argument("--shutdown-grace", type=float, default=5.0, metavar="S",
                   help="on SIGTERM/SIGINT, requests in flight may run S seconds more before they are aborted (5)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (info)")


def _run_serve(args) -> int:
    import os

    from trinfer.runtime import Engine
    from trinfer.runtime.distributed import is_follower_process
    from trinfer.server import ServerConfig, build_app, serve
    from trinfer.server.serve import bind

    if args.served_model_name is not None:
        name = args.served_model_name
    else:
        from trinfer.runtime.default_model import default_model_path

        path = args.model if args.model is not None else default_model_path()
        name = os.path.basename(os.path.normpath(path)).removesuffix(".gguf")
    config = ServerConfig(model_name=name, max_waiting=args.max_waiting,
                          request_timeout=args.request_timeout or None, max_body_bytes=args.max_body_bytes,
                          shutdown_grace=args.shutdown_grace)
    if not is_follower_process():  # torchrun's ranks > 0 serve nothing: their engines follow rank 0's
        bind(args.host, args.port).close()  # a bad --host/--port fails now, not after loading the model
    engine = Engine(args.model, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                    **_engine_kwargs(args))
    with engine:
        serve(build_app(engine, config), args.host, args.port, log_level=args.log_level)
    return 0


def _read_stdin() -> str:
    """The prompt from stdin, which must be UTF-8 (ValueError naming the first bad byte otherwise)."""
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt: stdin is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _add_profile(sub) -> None:
    from trinfer import profiler

    p = sub.add_parser("profile", help="per-kernel time of a prefill and a decode step, host overhead, traces",
                       description=profiler.__doc__.split("\n\n")[0])
    profiler.add_arguments(p)
    add_scheduling_arguments(p, default_budget=profiler.PROFILE_BUDGET_HELP)
    add_speculative_arguments(p)


def _run_profile(args) -> int:
    from trinfer import profiler

    return profiler.run_cli(args)


_COMMANDS = (("generate", _add_generate, _run_generate), ("serve", _add_serve, _run_serve),
             ("profile", _add_profile, _run_profile))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trinfer", description="Lean LLM inference with Triton kernels.")
    parser.add_argument("--debug", action="store_true", help="on an error, print the traceback too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, add, _run in _COMMANDS:
        add(sub)
        # Also after the command; SUPPRESS keeps `trinfer --debug COMMAND` from being reset by this default.
        sub.choices[name].add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                       help="on an error, print the traceback too")
    return parser


# The user's input is wrong (arguments, model files, prompts, chat templates): exit 2 with one line.
USER_ERRORS = (ValueError, OSError, MemoryError)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + "..."


def run_command(run, args) -> int:
    """Run one command: its exit status, or 2 (user error) / 1 (internal error) / 130 (interrupted) with one
    line on stderr (and the traceback with --debug)."""
    debug = getattr(args, "debug", False)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"trinfer: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BaseException as e:  # a bug (or a Rust panic in a library, which is not an Exception)
        if isinstance(e, (SystemExit, GeneratorExit)):
            raise
        from trinfer.runtime.distributed import TensorParallelError

        if isinstance(e, TensorParallelError):  # a rank failed (names it and why); every rank has been stopped
            if debug:
                traceback.print_exc()
            print(f"trinfer: error: {_one_line(e)}", file=sys.stderr)
            return 1
        if debug:
            traceback.print_exc()
        print(f"trinfer: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = next(run for name, _add, run in _COMMANDS if name == args.command)
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
