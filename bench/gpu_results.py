"""The GPU check's result files: few enough to come back from the device machine (at most 8 files in all), each a
benchmark's JSON; tables and plots are made from them afterwards, on any machine.

    python -m bench.gpu_results merge-e2e OUT.json PLAIN.json [QUANTIZED.json ...]   # one e2e.json
    python -m bench.gpu_results collect DIR OUT.json        # a benchmark's JSON (several: one object of them)
    python -m bench.gpu_results lines OUT_DIR               # summary lines: prefix_chunk.json, spec.json
    python -m bench.gpu_results render SRC_DIR DST_DIR      # JSONs + markdown/PNG, to commit under bench/results/

`merge-e2e`: the rows of end-to-end runs (bench/bench_e2e.py) in one file; a run with `--quantize` contributes its
rows as system `trinfer+<format>` (e.g. `trinfer+int4`), its plan under `merged`. `render` writes, from the JSONs
in SRC_DIR: kernels.{json,md,png}, e2e.{json,md,png}, prefix_chunk.{json,md}, spec.json (and its markdown where
bench/bench_spec.py has a `markdown(data)`), and copies summary.txt and gpu_check.log; it imports the benchmark
modules (torch), the other commands do not.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, data: Any) -> None:
    """Written to a temporary name and renamed: a run cut meanwhile leaves the previous file whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False, default=str))
    os.replace(tmp, path)


def merge_e2e(out: Path, plain: Path, others: list[Path]) -> int:
    """One e2e file of `plain`'s payload plus the rows of `others` (their system renamed after their quantized
    format); returns the number of rows. Missing or unreadable inputs are left out (a run cut before its first
    row wrote none)."""
    base = _load(plain)
    extra = [(p, d) for p in others if (d := _load(p)) is not None]
    if base is None:
        if not extra:
            return 0
        base = {**extra[0][1], "rows": []}
    base["merged"] = []
    for path, data in extra:
        plan = data.get("plan") or {}
        tag = plan.get("quantize") or ("batch-invariant" if plan.get("batch_invariant") else "other")
        for r in data.get("rows", []):
            base["rows"].append({**r, "system": f"{r['system']}+{tag}"})
        base["merged"].append({"file": path.name, "plan": plan})
    _write(out, base)
    return len(base["rows"])


def collect(src: Path, out: Path) -> tuple[int, int]:
    """`src`'s JSON file written as `out`; several: {file name: content}. Returns (files found, rows in them)."""
    found = sorted(p for p in Path(src).glob("*.json") if _load(p) is not None) if Path(src).is_dir() else []
    data = {p.name: _load(p) for p in found}
    if len(found) == 1:
        _write(out, data[found[0].name])
    elif found:
        _write(out, data)
    rows = sum(len(d["rows"]) for d in data.values() if isinstance(d, dict) and isinstance(d.get("rows"), list))
    return len(found), rows


def _f(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def prefix_chunk_lines(data: dict[str, Any]) -> list[str]:
    """The prefix-cache and chunked-prefill results in a few lines (bench/bench_prefix_chunk.py)."""
    lines = [f"prefix caching and chunked prefill | {data.get('model')} | {data.get('backend')} backend"]
    p = data.get("prefix")
    if p:
        lines.append(f"  TTFT after a cached {p.get('prefix_tokens')}-token prefix: {_f(p.get('ttft_ms_cached'), '.1f')}"
                     f" ms with the cache, {_f(p.get('ttft_ms_uncached'), '.1f')} ms without: "
                     f"{_f(p.get('speedup_median'), '.1f')}x; tokens equal: {p.get('tokens_equal')}")
    itl = data.get("itl") or []
    by_budget = {r.get("budget"): r for r in itl}
    chunked = [r for r in itl if r.get("budget") and isinstance(r.get("max_over_median_all"), (int, float))]
    if 512 in by_budget and chunked:
        d, best = by_budget[512], min(chunked, key=lambda r: r["max_over_median_all"])
        whole = (by_budget.get(None) or {}).get("long_ttft_ms")
        cost = (f" ({d['long_ttft_ms'] / whole:.2f}x its TTFT unchunked)"
                if isinstance(whole, (int, float)) and whole and isinstance(d.get("long_ttft_ms"), (int, float))
                else "")
        lines.append(f"  the default max_num_batched_tokens 512: max/median ITL {_f(d.get('max_over_median_all'), '.1f')}"
                     f", long prompt TTFT {_f(d.get('long_ttft_ms'), '.0f')} ms{cost}; lowest max/median: "
                     f"{best['budget']} ({_f(best['max_over_median_all'], '.1f')})")
    if itl:
        lines.append(f"  {'max_num_batched_tokens':>22} {'ITL before ms':>13} {'during max ms':>13} "
                     f"{'max/median':>10} {'stall':>6} {'long TTFT ms':>12} {'alone ms':>9}")
        for r in itl:
            lines.append(f"  {str(r.get('budget') or 'none'):>22} {_f(r.get('itl_before_median_ms'), '13.2f')} "
                         f"{_f(r.get('itl_during_max_ms'), '13.1f')} {_f(r.get('max_over_median_all'), '10.1f')} "
                         f"{_f(r.get('stall_factor'), '6.1f')} {_f(r.get('long_ttft_ms'), '12.1f')} "
                         f"{_f(r.get('long_alone_ttft_ms'), '9.1f')}")
    return lines


def generic_lines(name: str, data: Any, limit: int = 12) -> list[str]:
    """A result file of unknown layout: its scalar fields, and those of its first rows."""
    lines = [f"{name}:"]

    def scalars(d: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in d.items() if isinstance(v, (str, int, float, bool)) and k != "banner")

    if isinstance(data, dict):
        rows = data.get("rows") if isinstance(data.get("rows"), list) else []
        lines += ["  " + text[:200] for text in [scalars(data)] + [scalars(r) for r in rows[:limit]
                                                                     if isinstance(r, dict)] if text]
    return lines


def lines(out_dir: Path) -> list[str]:
    out = []
    pc = _load(Path(out_dir) / "prefix_chunk.json")
    if pc:
        out += prefix_chunk_lines(pc)
    spec = _load(Path(out_dir) / "spec.json")
    if spec is not None:
        out += generic_lines("speculative decoding (spec.json)", spec)
    return out


def render(src: Path, dst: Path) -> list[Path]:
    """The result files of a GPU check with their tables and plots, for committing (see the module docstring)."""
    from bench import bench_e2e, bench_prefix_chunk
    from bench import harness as H

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("summary.txt", "gpu_check.log"):
        if (src / name).is_file():
            written.append(Path(shutil.copyfile(src / name, dst / name)))
    if (data := _load(src / "kernels.json")) is not None:
        written += H.write_outputs(dst, "kernels", data)
    if (data := _load(src / "e2e.json")) is not None:
        _write(dst / "e2e.json", data)
        (dst / "e2e.md").write_text(bench_e2e.markdown(data))
        written += [dst / "e2e.json", dst / "e2e.md"]
        if (png := bench_e2e.write_plot(dst / "e2e.png", data)) is not None:
            written.append(Path(png))
    if (data := _load(src / "prefix_chunk.json")) is not None:
        _write(dst / "prefix_chunk.json", data)
        (dst / "prefix_chunk.md").write_text(bench_prefix_chunk.markdown(data))
        written += [dst / "prefix_chunk.json", dst / "prefix_chunk.md"]
    if (data := _load(src / "spec.json")) is not None:
        _write(dst / "spec.json", data)
        written.append(dst / "spec.json")
        try:
            md = importlib.import_module("bench.bench_spec").markdown
        except (ImportError, AttributeError):
            md = None
        if md is not None:
            (dst / "spec.md").write_text(md(data))
            written.append(dst / "spec.md")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("merge-e2e")
    a.add_argument("out", type=Path)
    a.add_argument("plain", type=Path)
    a.add_argument("others", type=Path, nargs="*")
    b = sub.add_parser("collect")
    b.add_argument("src", type=Path)
    b.add_argument("out", type=Path)
    c = sub.add_parser("lines")
    c.add_argument("out_dir", type=Path)
    d = sub.add_parser("render")
    d.add_argument("src", type=Path)
    d.add_argument("dst", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "merge-e2e":
        print(f"gpu_results: {merge_e2e(args.out, args.plain, args.others)} rows in {args.out.name}")
    elif args.cmd == "collect":
        files, rows = collect(args.src, args.out)
        print(f"gpu_results: {args.out.name}: " + (f"{rows} rows" if rows else "written") if files
              else f"gpu_results: no result file in {args.src}")
    elif args.cmd == "lines":
        print("\n".join(lines(args.out_dir)))
    else:
        print("gpu_results: wrote " + ", ".join(str(x) for x in render(args.src, args.dst)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
