"""Pack and restore the GPU check's compile caches (Triton's cache, the CUDA C++ JIT build, Inductor's cache) as
one tarball, so that a second run of bench/gpu_check.sh skips compilation.

    python -m bench.gpu_cache pack OUT.tar.gz ROOT --csrc csrc [--limit-mib 15]   # ROOT: triton/, cuda/, inductor/
    python -m bench.gpu_cache restore IN.tar.gz ROOT --csrc csrc

The device machine brings back at most 8 files of at most 16 MiB each, so the archive is capped (default 15 MiB
compressed): members go in by value, the CUDA C++ library and its stamp first (the build costs a minute or two;
its object files are left out, the stamp makes the library load without them; an unfinished build goes in whole,
object files and ninja's logs included, with the hash of the csrc/ it compiled: restored over the same sources,
its files are dated now so that ninja resumes where it was cut, over other sources its objects are deleted),
then Triton's cache entries
oldest first (one directory per compiled kernel, added whole or not at all: Triton reuses an entry only when all
its files are there; the oldest are what the smoke stage and the kernel tests compiled first), then Inductor's
cache (torch.compile in the tests and benchmarks), until the cap. The archive is written to a temporary name and
renamed, so a run cut during packing leaves the previous archive, never half of one.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tarfile
from pathlib import Path

PARTS = ("cuda", "triton", "inductor")  # in order of value per byte
FINISHED = ("trinfer_build.stamp",)     # trinfer.cuda_kernels._jit.STAMP: the library beside it is complete
SOURCES_HASH = "csrc.sha256"            # in cuda/: the csrc/ an unfinished build compiled
LOCKS = ("lock", "trinfer_build.flock")


def csrc_hash(csrc: str | os.PathLike) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(csrc).iterdir()):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _entries(root: Path) -> list[Path]:
    """What to archive under root, in order: each a file or a directory added whole."""
    out: list[Path] = []
    cuda = root / "cuda"
    if cuda.is_dir():
        files = [p for p in sorted(cuda.rglob("*")) if p.is_file() and p.name not in LOCKS]
        if any((cuda / f).is_file() for f in FINISHED):  # the library and its stamp suffice
            files = [p for p in files if p.suffix == ".so" or p.name in FINISHED]
        out += files
    triton = root / "triton"
    if triton.is_dir():
        out += sorted((p for p in triton.iterdir() if p.is_dir()), key=lambda p: (p.stat().st_mtime, p.name))
    inductor = root / "inductor"
    if inductor.is_dir():
        out.append(inductor)
    return out


def _size(entry: Path) -> int:
    return entry.stat().st_size if entry.is_file() else sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())


def _write(out: Path, root: Path, entries: list[Path]) -> None:
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, mode="w:gz", compresslevel=6) as tar:
        for entry in entries:
            tar.add(entry, arcname=entry.relative_to(root).as_posix())
    os.replace(tmp, out)


def pack(out: str | os.PathLike, root: str | os.PathLike, limit_bytes: int, csrc: str | os.PathLike | None = None
         ) -> dict:
    """Write `out` (.tar.gz) from `root`; returns {"members", "dropped", "bytes"}. Members are relative to root.
    `csrc`: the sources the CUDA C++ build compiles (their hash goes with an unfinished build).

    Entries are chosen by their raw size times a compression ratio of 1/2 (Triton's cubins hardly compress, its
    IR text does); should the archive still pass the cap, the last tenth of the entries is dropped and it is
    written again."""
    root, out = Path(root), Path(out)
    if csrc is not None and (root / "cuda").is_dir():
        (root / "cuda" / SOURCES_HASH).write_text(csrc_hash(csrc) + "\n")
    chosen, dropped, total = [], [], 0
    for entry in _entries(root):
        size = _size(entry) // 2 + 1024
        if total + size > limit_bytes:
            dropped.append(entry)
            continue
        chosen.append(entry)
        total += size
    _write(out, root, chosen)
    while out.stat().st_size > limit_bytes and chosen:
        cut = max(1, len(chosen) // 10)
        dropped, chosen = chosen[-cut:] + dropped, chosen[:-cut]
        _write(out, root, chosen)
    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    return {"members": [rel(p) for p in chosen], "dropped": [rel(p) for p in dropped], "bytes": out.stat().st_size}


def restore(archive: str | os.PathLike, root: str | os.PathLike, csrc: str | os.PathLike | None = None) -> int:
    """Extract `archive` into `root` (created); returns the number of files. Only plain files and directories
    under root are extracted. With `csrc`, an unfinished CUDA C++ build is made resumable (module docstring)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    inside = str(root.resolve()) + os.sep
    with tarfile.open(archive, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            target = str((root / m.name).resolve())
            if not (m.isfile() or m.isdir()) or os.path.isabs(m.name) or not target.startswith(inside):
                continue
            members.append(m)
            n += m.isfile()
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, members=members, **kw)
    cuda = root / "cuda"
    if csrc is not None and (cuda / SOURCES_HASH).is_file() and not any((cuda / f).is_file() for f in FINISHED):
        same = (cuda / SOURCES_HASH).read_text().strip() == csrc_hash(csrc)
        now = None  # the current time
        for p in cuda.rglob("*"):
            if p.is_file():
                if same:
                    os.utime(p, now)  # newer than the freshly copied sources: ninja keeps what was compiled
                elif p.suffix == ".o":
                    p.unlink()
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("out")
    a.add_argument("root")
    a.add_argument("--limit-mib", type=float, default=15.0)
    a.add_argument("--csrc", default=None, help="the CUDA C++ sources (recorded with an unfinished build)")
    b = sub.add_parser("restore")
    b.add_argument("archive")
    b.add_argument("root")
    b.add_argument("--csrc", default=None, help="the CUDA C++ sources (checked against an unfinished build's)")
    args = p.parse_args(argv)
    if args.cmd == "pack":
        r = pack(args.out, args.root, int(args.limit_mib * 2**20), csrc=args.csrc)
        parts = {k: sum(m.startswith(k + "/") or m == k for m in r["members"]) for k in PARTS}
        print(f"gpu_cache: packed {args.out}: {r['bytes'] / 2**20:.1f} MiB; entries per part {parts}; "
              f"{len(r['dropped'])} left out over the {args.limit_mib:g} MiB cap")
    else:
        n = restore(args.archive, args.root, csrc=args.csrc)
        print(f"gpu_cache: restored {n} files from {args.archive} into {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
