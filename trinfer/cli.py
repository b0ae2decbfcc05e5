"""Command line: `trinfer <command> ...` (also `python -m trinfer`).

    trinfer generate "prompt" [--model PATH] [--max-new-tokens N] [--chat] [--stream] [--stop S]
                     [--dtype auto|float32|bfloat16|float16] [--backend triton|torch|cuda|cuda:FAMILY[+FAMILY]]
                     [--device cpu|cuda] [--no-cuda-graphs]
    trinfer profile [--model PATH | --shape NAME] [--batch B] [--context N] [--steps K] [--out DIR]

Each command is a pair of functions: `_add_<command>(subparsers)` declares its arguments and
`_run_<command>(args)` runs it; `_COMMANDS` lists them. Errors in the user's input print one line
(`trinfer: error: ...`) and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="greedily continue a prompt (or answer it with --chat)",
                       description="Greedy generation with a Llama-family model; the answer goes to stdout, "
                                   "timings to stderr.")
    p.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--model", default=None,
                   help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct, offline)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="most tokens to generate (256)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template (prompt as a user message)")
    p.add_argument("--stream", action="store_true", help="print the text as it is decoded")
    p.add_argument("--stop", action="append", default=None, metavar="S",
                   help="stop when the text contains S (repeatable); S is not printed")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")
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
    p.add_argument("--quiet", action="store_true", help="no timings on stderr")


def _run_generate(args) -> int:
    from trinfer.runtime import LLM, SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected an int >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, stop=args.stop, ignore_eos=args.ignore_eos)
    llm = LLM(args.model, dtype=args.dtype, backend=args.backend, device=args.device, max_num_seqs=1,
              block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, cuda_graphs=args.cuda_graphs)

    def stream(out):
        if out.delta_text:
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()

    out = llm.generate(prompt, chat=args.chat, sampling_params=params, on_output=stream if args.stream else None)[0]
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
              f"{'; ' + eng.runner.graph_summary() if eng.device.type == 'cuda' else ''}]", file=sys.stderr)
    return 0


def _add_profile(sub) -> None:
    from trinfer import profiler

    p = sub.add_parser("profile", help="per-kernel time of a prefill and a decode step, host overhead, traces",
                       description=profiler.__doc__.split("\n\n")[0])
    profiler.add_arguments(p)


def _run_profile(args) -> int:
    from trinfer import profiler

    return profiler.run_cli(args)


_COMMANDS = (("generate", _add_generate, _run_generate), ("profile", _add_profile, _run_profile))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trinfer", description="Lean LLM inference with Triton kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for _name, add, _run in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = next(run for name, _add, run in _COMMANDS if name == args.command)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, MemoryError) as e:
        print(f"trinfer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
