"""The `trinfer` command: the default model answers a chat question; bad arguments fail with one clear line."""
import os
import subprocess
import sys

import pytest

from smol import one_torch_thread  # noqa: F401  (autouse fixture)
from trinfer.cli import build_parser, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generate_chat_answers_paris(default_gguf):
    """`python -m trinfer generate --chat ...` in a fresh process: the default model, torch backend on the CPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "trinfer", "generate", "--chat", "What is the capital of France?",
         "--max-new-tokens", "32", "--device", "cpu", "--threads", "1"],  # 1 thread: as one_torch_thread
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "finish: eos" in proc.stderr and "time to first token" in proc.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from checkpoints import make_hf_checkpoint

    return make_hf_checkpoint(str(tmp_path_factory.mktemp("cli")), "llama")


def test_generate_stream_and_stop(tiny, capsys):
    """--stream prints what the plain run prints; --stop cuts the text before the stop string."""
    base = ["generate", "The capital of France is", "--model", tiny, "--max-new-tokens", "12", "--ignore-eos",
            "--backend", "torch", "--dtype", "float32", "--device", "cpu"]
    assert main(base) == 0
    plain = capsys.readouterr()
    assert "12 tokens, finish: length" in plain.err and "torch backend, float32, cpu" in plain.err
    assert "prefix cache 0/7 prompt tokens reused (0.0%)" in plain.err  # BOS + 6 tokens; a fresh engine
    assert main(base + ["--no-prefix-caching", "--max-num-batched-tokens", "2"]) == 0  # prompt in 3 chunks
    other = capsys.readouterr()
    assert other.out == plain.out and "prefix caching off" in other.err
    text = plain.out[:-1]  # the trailing newline
    assert len(text) >= 6
    assert main(base + ["--stream", "--quiet", "--no-cuda-graphs"]) == 0  # (graphs are CUDA-only anyway)
    streamed = capsys.readouterr()
    assert streamed.out == plain.out and streamed.err == ""
    stop = text[3:6]
    assert main(base + ["--stream", "--stop", stop, "--quiet"]) == 0
    assert capsys.readouterr().out == text[: text.index(stop)] + "\n"


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--model", "/no/such/model"], "does not exist"),
    (["generate", "", "--model", "/no/such/model"], "does not exist"),
    (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens: expected an int >= 1, got 0"),
    (["generate", "hi", "--device", "tpu"], "device"),
    (["generate", "hi", "--threads", "0"], "--threads: expected an int >= 1, got 0"),
    (["generate", "hi", "--max-num-batched-tokens", "0"], "max_num_batched_tokens: expected an int >= 1"),
])
def test_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("trinfer: error: ") and message in err and "Traceback" not in err


def test_parser_has_subcommands():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args([])
    args = parser.parse_args(["generate", "x", "--backend", "torch", "--dtype", "float32", "--chat"])
    assert (args.command, args.prompt, args.backend, args.dtype, args.chat) == ("generate", "x", "torch", "float32", True)
    assert args.cuda_graphs is True and parser.parse_args(["generate", "x", "--no-cuda-graphs"]).cuda_graphs is False
    assert args.prefix_caching is True and args.max_num_batched_tokens is None
    for command in (["generate", "x"], ["profile"]):
        args = parser.parse_args(command + ["--no-prefix-caching", "--max-num-batched-tokens", "64"])
        assert args.prefix_caching is False and args.max_num_batched_tokens == 64


def test_internal_errors_exit_1_with_a_hint_and_debug_shows_the_traceback(capsys):
    from trinfer.cli import run_command

    def broken(args):
        raise KeyError("oops")

    parser = build_parser()
    assert run_command(broken, parser.parse_args(["generate", "x"])) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("trinfer: internal error: KeyError: 'oops'") and "--debug" in err
    for argv in (["generate", "x", "--debug"], ["--debug", "generate", "x"]):
        assert run_command(broken, parser.parse_args(argv)) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "raise KeyError" in err and err.rstrip().endswith("--debug for the traceback)")

    def user_error(args):
        raise ValueError("config.json: hidden_size: expected an int,\n got string '64'")

    assert run_command(user_error, parser.parse_args(["generate", "x"])) == 2
    assert capsys.readouterr().err == "trinfer: error: config.json: hidden_size: expected an int, got string '64'\n"
    assert run_command(user_error, parser.parse_args(["generate", "x", "--debug"])) == 2
    assert "Traceback" in capsys.readouterr().err


def test_every_command_takes_debug():
    parser = build_parser()
    for argv in (["generate", "x", "--debug"], ["profile", "--debug"], ["--debug", "profile"]):
        assert parser.parse_args(argv).debug is True
    assert parser.parse_args(["generate", "x"]).debug is False
