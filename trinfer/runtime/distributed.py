"""Tensor parallelism on torch.distributed: this rank's shard of the model, the process groups, the collectives.

N ranks hold one model between them (Megatron's layout, as gpt-fast's tp.py and vLLM shard it):

    q/k/v, gate/up  column-parallel: rank r holds the rows of its query heads (with their KV heads) in qkv_proj
                    and qkv_bias, and its 1/N of the intermediate rows in gate_up_proj; its attention and
                    SiLU-and-mul run on its own slice, with no communication
    o_proj, down    row-parallel: rank r holds the matching columns, so its product is a partial sum of the
                    layer's output; one all-reduce per projection per layer adds the N partials
    KV heads        split with the query heads (rank r's query heads attend only to its KV heads); with fewer KV
                    heads than ranks, each KV head is replicated on N / num_kv_heads ranks
    embedding       vocab-parallel: rank r holds rows [v_r, v_r+1) of the table; an id outside them gives a zero
                    row, and one all-reduce adds the N rows (exact: one non-zero term per element)
    LM head         vocab-parallel, never gathered: the distributed greedy argmax below
    norms, rotary   replicated

Per decode step and sequence that is 2 * num_layers + 1 all-reduces of `hidden` values and one all-gather of
3 float64 numbers per rank (README "Tensor parallelism" has the volume and its prediction).

Distributed greedy argmax (ties as on one device). Rank r computes, from its logits l over vocab [v_r, v_r+1):
    m_r = max l (its first occurrence, `torch.argmax`: NaN counts as the largest), i_r = v_r + argmax l,
    s_r = sum exp(l - m_r)
and all ranks gather (m_r, i_r, s_r), float64 (exact for fp32 logits and any vocab index). The token is the i_r
of the first rank with the largest m_r: the vocab is split in rank order, so equal maxima on two ranks go to the
lower global index, exactly as `torch.argmax` over the whole row. Its log-probability is
    M - logsumexp(l) = -log(sum_r s_r * exp(m_r - M)),   M = max_r m_r
(a distributed log-sum-exp), NaN where the one-device log_softmax gives NaN (a NaN or +inf logit, or only -inf).

Processes. Rank 0 is the user's process: it keeps the scheduler, the tokenizer and the outputs, and leads every
step; ranks > 0 follow it (`tp_worker.py`). `start_tensor_parallel` either spawns the N-1 followers itself
(torch.multiprocessing, "spawn"; a TCPStore on 127.0.0.1 hosted by rank 0) or, when the process was started
by torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment), joins the ranks torchrun started,
on one node or several. Every rank builds the same `Engine` from the same arguments; only rank 0's returns.

Groups. Collectives run on the backend's process group objects (`ProcessGroupGloo` / `ProcessGroupNCCL`)
made from a prefix of the store, never on torch.distributed's default group: two engines in one process do
not share one. A gloo group carries the per-step header (host integers) and the start-up agreements; on CUDA
the model's collectives and the step's tensors go over NCCL (CUDA-graph capturable), on the CPU over that
same gloo group. Every collective has a timeout (`timeout`); a follower waits for the next step's header
without one (an idle server is not an error), and notices rank 0's death by its closed sockets.

Failures. A rank that raises writes its error into the store and closes its sockets; a spawned rank that dies
is seen through its process sentinel by a watch thread on rank 0. Either way rank 0 raises
`TensorParallelError` naming the rank and the cause (within the collective timeout at worst; at once for
gloo, whose pending operations fail when a peer's sockets close), and stops every rank: spawned ranks are
joined, then terminated, then killed. Any error inside a tensor-parallel step stops the whole world (its
ranks would be out of step); the engine then refuses further steps with that same error.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["ShardSpec", "TensorParallel", "TensorParallelError", "ShardOps", "start_tensor_parallel",
           "tensor_parallel_requested",
           "launched_by_torchrun", "is_follower_process", "greedy_stats", "combine_greedy", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 600.0  # collectives (torch's NCCL default); start-up includes loading the slowest rank's shard
_FOLLOW_TIMEOUT = datetime.timedelta(days=3650)  # a follower waiting for rank 0's next step: no timeout
_REAP_S = 10.0  # a closing rank 0 waits this long for each spawned rank to exit before terminating it
_CAUSE_WAIT_S = 3.0  # after a failed collective, how long rank 0 waits for a peer's error report or exit status
_ENV_SPAWNED = "TRINFER_TP_SPAWNED"  # set in the ranks rank 0 spawns (their store is rank 0's)
_SECONDARY = "stopped after a failed collective"  # how a rank reports a failure it only saw from a peer


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank failed (or the world was stopped); every rank has been stopped."""


# ---------------------------------------------------------------------- the shard of one rank


def _split(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's part when n items are cut into `world` near-equal runs, in rank order."""
    return n * rank // world, n * (rank + 1) // world


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """What rank `rank` of `world_size` holds of a model: half-open ranges, in the full model's units.

        q_heads, kv_heads   query heads; the KV heads they use (several ranks share one when replicated)
        intermediate        rows of gate and of up, columns of down
        vocab               rows of the embedding and of the LM head
    `ShardSpec.of(config, rank, world_size)` builds it and refuses shapes that do not split.
    """

    rank: int
    world_size: int
    head_dim: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]
    vocab: tuple[int, int]

    @classmethod
    def of(cls, config, rank: int, world_size: int) -> ShardSpec:
        """The shard of `rank`; ValueError naming tensor_parallel_size when the model does not split N ways:
        N must divide the query heads and the intermediate size, and divide or be a multiple of the KV heads."""
        n = world_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"tensor_parallel_size: expected an int >= 1, got {n!r}")
        if not 0 <= rank < n:
            raise ValueError(f"rank: expected 0..{n - 1}, got {rank}")
        nq, nkv = config.num_heads, config.num_kv_heads
        if nq % n:
            raise ValueError(f"tensor_parallel_size: {n} does not divide the model's {nq} attention heads")
        if nkv % n and n % nkv:
            raise ValueError(f"tensor_parallel_size: {n} ranks cannot share the model's {nkv} KV heads (expected "
                             f"a divisor or a multiple of {nkv})")
        if config.intermediate_size % n:
            raise ValueError(f"tensor_parallel_size: {n} does not divide the model's intermediate size "
                             f"{config.intermediate_size}")
        if config.vocab_size < n:
            raise ValueError(f"tensor_parallel_size: {n} ranks for a vocabulary of {config.vocab_size}")
        if nkv >= n:
            kv = _split(nkv, rank, n)
        else:  # N / nkv consecutive ranks share each KV head (their query heads form its group)
            kv = (rank * nkv // n, rank * nkv // n + 1)
        return cls(rank, n, config.head_dim, _split(nq, rank, n), kv, _split(config.intermediate_size, rank, n),
                   _split(config.vocab_size, rank, n))

    @property
    def vocab_start(self) -> int:
        return self.vocab[0]

    def local_config(self, config):
        """The config of this rank's slice: its head counts, intermediate size and vocab rows (what LlamaModel and
        the KV cache of this rank are built from). Its token ids (BOS/EOS) are dropped: they index the full
        vocabulary, which this config no longer describes."""
        return replace(config, num_heads=self.q_heads[1] - self.q_heads[0],
                       num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
                       intermediate_size=self.intermediate[1] - self.intermediate[0],
                       vocab_size=self.vocab[1] - self.vocab[0], bos_token_id=None, eos_token_ids=())

    def index(self, name: str, part: str | None) -> tuple[slice, ...] | None:
        """Index into a checkpoint tensor (rows first, as torch and Hugging Face store it) that gives this
        rank's slice of canonical weight `name` (loader.py's names) and `part` (q/k/v, gate/up, or None);
        None for a replicated tensor (read whole)."""
        hd = self.head_dim
        kind = name.rsplit(".", 1)[-1]
        if kind in ("embed_tokens", "lm_head"):
            return (slice(*self.vocab),)
        if kind in ("qkv_proj", "qkv_bias"):
            heads = self.q_heads if part == "q" else self.kv_heads
            return (slice(heads[0] * hd, heads[1] * hd),)
        if kind == "gate_up_proj":
            return (slice(*self.intermediate),)
        if kind == "o_proj":
            return (slice(None), slice(self.q_heads[0] * hd, self.q_heads[1] * hd))
        if kind == "down_proj":
            return (slice(None), slice(*self.intermediate))
        return None

    def shard_weight(self, config, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of canonical weight `name` given whole (fused q/k/v and gate/up included): a new
        contiguous tensor. For random-weight models and tests; checkpoints are read slice by slice instead."""
        kind = name.rsplit(".", 1)[-1]
        if kind in ("qkv_proj", "qkv_bias"):
            q, kv = config.q_size, config.kv_size
            parts = (("q", 0), ("k", q), ("v", q + kv))
        elif kind == "gate_up_proj":
            parts = (("gate", 0), ("up", config.intermediate_size))
        else:
            index = self.index(name, None)
            return full.clone() if index is None else full[index].contiguous()
        pieces = []
        for part, offset in parts:
            rows = self.index(name, part)[0]
            pieces.append(full[offset + rows.start: offset + rows.stop])
        return torch.cat(pieces)


# ---------------------------------------------------------------------- the distributed greedy argmax


def greedy_stats(logits: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """One rank's share of the greedy argmax. logits [B, V_r] (any float dtype) over vocab [vocab_start,
    vocab_start + V_r) -> [B, 3] float64: (max logit m, global index of its first occurrence, sum exp(l - m))."""
    lf = logits.float()
    idx = torch.argmax(lf, dim=-1, keepdim=True)
    m = lf.gather(-1, idx)
    s = torch.exp(lf - m).sum(-1, keepdim=True)
    return torch.cat([m.double(), (idx + vocab_start).double(), s.double()], dim=-1)


def combine_greedy(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gathered shares [N, B, 3] (rank-major; `greedy_stats`) -> (token ids [B] int64, log-probs [B] fp32).

    The winner is the first rank with the largest max (`torch.argmax`: ties to the lower rank, NaN largest), so
    ties go to the lowest global index as on one device; log-prob = -log(sum_r s_r * exp(m_r - M)), NaN when
    the row's logits are all -inf (as log_softmax)."""
    m, idx, s = stats.unbind(-1)
    winner = torch.argmax(m, dim=0, keepdim=True)
    ids = idx.gather(0, winner).squeeze(0).long()
    top = m.gather(0, winner)
    terms = torch.where(m == float("-inf"), torch.zeros_like(s), s * torch.exp(m - top))  # an all -inf shard adds 0
    logprob = -torch.log(terms.sum(0))
    logprob = torch.where(top.squeeze(0) == float("-inf"), torch.full_like(logprob, float("nan")), logprob)
    return ids, logprob.float()


# ---------------------------------------------------------------------- launching and joining


@dataclass(frozen=True, slots=True)
class _EnvLaunch:
    """A rank started by torchrun (or spawned by rank 0, which sets the same variables)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    agent_store: bool  # torchrun's agent hosts the store: every rank is a client
    spawned: bool      # spawned by a trinfer rank 0 (which hosts the store)


def _env_launch() -> _EnvLaunch | None:
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    try:
        rank, world, port = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["MASTER_PORT"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError(f"environment: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_PORT must be integers, got "
                         f"{env.get('RANK')!r}/{env.get('WORLD_SIZE')!r}/{env.get('LOCAL_RANK')!r}/"
                         f"{env.get('MASTER_PORT')!r}") from None
    if not 0 <= rank < world:
        raise ValueError(f"environment: RANK {rank} outside WORLD_SIZE {world}")
    return _EnvLaunch(rank, world, local, env["MASTER_ADDR"], port,
                      env.get("TORCHELASTIC_USE_AGENT_STORE") == "True", env.get(_ENV_SPAWNED) == "1")


def launched_by_torchrun() -> bool:
    """Whether this process is one of several ranks started by torchrun (or by a trinfer rank 0)."""
    launch = _env_launch()
    return launch is not None and launch.world_size > 1


def is_follower_process() -> bool:
    """Whether this process is a rank > 0 of a multi-rank launch: its Engine follows rank 0 and never returns."""
    launch = _env_launch()
    return launch is not None and launch.world_size > 1 and launch.rank > 0


def _check_size(tensor_parallel_size) -> int:
    if tensor_parallel_size is None:
        return 1
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) \
            or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size: expected an int >= 1, got {tensor_parallel_size!r}")
    return tensor_parallel_size


def check_timeout(timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"tp_timeout: expected a number of seconds > 0, got {timeout!r}")
    return float(timeout)


def tensor_parallel_requested(tensor_parallel_size: int | None) -> bool:
    """Whether `start_tensor_parallel(tensor_parallel_size, ...)` would make this process a rank of several."""
    size = _check_size(tensor_parallel_size)
    launch = _env_launch()
    if launch is not None and launch.world_size > 1:
        return tensor_parallel_size != 1
    return size > 1


def start_tensor_parallel(tensor_parallel_size: int | None, device: torch.device, *,
                          timeout: float = DEFAULT_TIMEOUT_S, engine_args: dict[str, Any] | None = None
                          ) -> TensorParallel | None:
    """This process's place in a tensor-parallel world, or None for one device.

    Under torchrun (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set, WORLD_SIZE > 1): join as RANK, on
    cuda:LOCAL_RANK when `device` is CUDA; tensor_parallel_size must be None or WORLD_SIZE (1 keeps this
    process on its own). Otherwise tensor_parallel_size N > 1 spawns N-1 ranks here, each building
    `Engine(**engine_args)` on cpu or cuda:(device's index + rank), and joins as rank 0.
    """
    size = _check_size(tensor_parallel_size)
    timeout = check_timeout(timeout)
    launch = _env_launch()
    if tensor_parallel_requested(tensor_parallel_size) and launch is not None and launch.world_size > 1:
        if tensor_parallel_size is not None and size != launch.world_size:
            raise ValueError(f"tensor_parallel_size: {size} differs from the {launch.world_size} ranks torchrun "
                             f"started (WORLD_SIZE); omit it or pass {launch.world_size}")
        if device.type == "cuda" and not launch.spawned:  # a spawned rank was given its device by rank 0
            device = torch.device("cuda", launch.local_rank)
        return TensorParallel._join_env(launch, device, timeout)
    if size == 1:
        return None
    if engine_args is None:
        raise ValueError("tensor_parallel_size: spawning ranks needs the engine's arguments")
    return TensorParallel._spawn(size, device, timeout, engine_args)


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (signal {-code})"
    return f"exited with status {code}"


def _fingerprint(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


class TensorParallel:
    """This process's rank in a tensor-parallel world: its device, its process groups, the store, and (rank 0 of a
    spawned world) the follower processes. Made by `start_tensor_parallel`; `close()` ends it."""

    def __init__(self, *, rank: int, world_size: int, device: torch.device, store, prefix: str, timeout: float,
                 procs: dict[int, Any] | None = None):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.timeout = timeout
        self._store, self._prefix = store, prefix
        self._procs = procs or {}  # rank -> spawned process (rank 0 of a spawned world)
        self._error: TensorParallelError | None = None
        self._closed = False
        self._lock = threading.RLock()
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None
        self._peer_failure: str | None = None  # set by the watch thread
        self._header = torch.zeros(8, dtype=torch.int64)
        try:
            self._wait_for_ranks()
            self._control = dist.ProcessGroupGloo(dist.PrefixStore(prefix + "gloo/", store), rank, world_size,
                                                  _timedelta(timeout))
            if device.type == "cuda":
                torch.cuda.set_device(device)
                self._group = self._nccl_group(dist.PrefixStore(prefix + "nccl/", store))
            else:
                self._group = self._control
        except BaseException as e:
            self.abandon(e)
            raise
        self._sum = dist.AllreduceOptions()
        self._sum.reduceOp = dist.ReduceOp.SUM
        if rank == 0:
            self._watcher = threading.Thread(target=self._watch, name="trinfer-tp-watch", daemon=True)
            self._watcher.start()

    # ------------------------------------------------------------------ construction
    @classmethod
    def _spawn(cls, world_size: int, device: torch.device, timeout: float, engine_args: dict) -> TensorParallel:
        import torch.multiprocessing as mp

        if device.type == "cuda":
            base = device.index or 0
            if base + world_size > torch.cuda.device_count():
                raise ValueError(f"tensor_parallel_size: {world_size} ranks need cuda:{base}..cuda:"
                                 f"{base + world_size - 1}, but {torch.cuda.device_count()} GPUs are visible")
        store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=_timedelta(timeout),
                              wait_for_workers=False)
        ctx = mp.get_context("spawn")
        procs = {}
        try:
            for r in range(1, world_size):
                rank_device = f"cuda:{(device.index or 0) + r}" if device.type == "cuda" else "cpu"
                p = ctx.Process(target=_spawned_rank_main, name=f"trinfer-tp-rank{r}", daemon=True,
                                args=(r, world_size, store.port, dict(engine_args, device=rank_device), os.getpid(),
                                      torch.get_num_threads()))
                p.start()
                procs[r] = p
        except BaseException:
            for p in procs.values():
                p.kill()
            raise
        return cls(rank=0, world_size=world_size, device=device, store=store, prefix=cls._engine_prefix(store, 0),
                   timeout=timeout, procs=procs)

    @classmethod
    def _join_env(cls, launch: _EnvLaunch, device: torch.device, timeout: float) -> TensorParallel:
        is_master = launch.rank == 0 and not launch.agent_store and not launch.spawned
        store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size if is_master else None,
                              is_master=is_master, timeout=_timedelta(timeout), wait_for_workers=False)
        return cls(rank=launch.rank, world_size=launch.world_size, device=device, store=store,
                   prefix=cls._engine_prefix(store, launch.rank), timeout=timeout)

    @staticmethod
    def _engine_prefix(store, rank: int) -> str:
        """A key prefix of its own for each engine: every rank builds its engines in the same order, so its count
        of engines so far names the same world on every rank."""
        return f"trinfer/tp/{store.add(f'trinfer/engines/{rank}', 1)}/"

    def _wait_for_ranks(self) -> None:
        """Announce this rank; rank 0 waits until every rank has (watching the spawned processes), so that the
        groups are made only by live ranks."""
        self._store.set(f"{self._prefix}joined/{self.rank}", "1")
        if self.rank != 0:
            return
        keys = [f"{self._prefix}joined/{r}" for r in range(1, self.world_size)]
        deadline = time.monotonic() + self.timeout
        while keys and not self._store.check(keys):
            for r, p in self._procs.items():
                if not p.is_alive():
                    why = self._reported(r)
                    raise TensorParallelError(f"tensor-parallel rank {r} (pid {p.pid}) {_describe_exit(p.exitcode)} "
                                              f"before joining{': ' + why if why else ''}")
            if time.monotonic() > deadline:
                missing = [r for r in range(1, self.world_size) if not self._store.check([keys[r - 1]])]
                raise TensorParallelError(f"tensor-parallel ranks {missing} did not join within {self.timeout:.0f} s")
            time.sleep(0.02)

    def _nccl_group(self, store):
        """A ProcessGroupNCCL as torch.distributed.new_group makes one (distributed_c10d._new_process_group_helper),
        but registered nowhere; its communicator is made at the first collective, on this rank's device."""
        opts = dist.ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = False
        opts._timeout = _timedelta(self.timeout)
        if hasattr(opts, "global_ranks_in_group"):
            opts.global_ranks_in_group = list(range(self.world_size))
        if hasattr(opts, "group_name"):
            opts.group_name = "trinfer_tp_" + self._prefix.strip("/").replace("/", "_")
        return dist.ProcessGroupNCCL(store, self.rank, self.world_size, opts)

    # ------------------------------------------------------------------ collectives (every rank, same order)
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (device group; capturable in a CUDA graph on NCCL). Returns x."""
        try:
            self._group.allreduce([x], self._sum).wait()
        except RuntimeError as e:
            raise self._collective_failed(e) from None
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[N, *x.shape]: every rank's x, in rank order (device group)."""
        out = torch.empty((self.world_size, x.numel()), dtype=x.dtype, device=x.device)
        try:
            self._group._allgather_base(out, x.reshape(1, -1)).wait()
        except RuntimeError as e:
            raise self._collective_failed(e) from None
        return out.view(self.world_size, *x.shape)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x into every rank's x, in place (device group)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        try:
            self._group.broadcast([x], opts).wait()
        except RuntimeError as e:
            raise self._collective_failed(e) from None
        return x

    def send_header(self, *values: int) -> None:
        """Rank 0: the next step's header (up to 8 ints; host memory, gloo), which the followers wait for."""
        self._check_usable()
        h = self._header
        h.zero_()
        h[: len(values)] = torch.tensor(values, dtype=torch.int64)
        self._control_broadcast(h, _timedelta(self.timeout))

    def recv_header(self) -> list[int]:
        """Ranks > 0: wait (without a timeout) for rank 0's next header."""
        return self._control_broadcast(self._header, _FOLLOW_TIMEOUT).tolist()

    def _control_broadcast(self, x: torch.Tensor, timeout: datetime.timedelta) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = timeout
        try:
            self._control.broadcast([x], opts).wait()
        except RuntimeError as e:
            raise self._collective_failed(e) from None
        return x

    def agree_min(self, value: int) -> int:
        """The smallest of every rank's `value` (start-up: e.g. KV blocks that fit every rank's memory)."""
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        try:
            self._control.allreduce([t], opts).wait()
        except RuntimeError as e:
            raise self._collective_failed(e) from None
        return int(t.item())

    def check_same(self, what: str, description: str) -> None:
        """ValueError on every rank unless every rank passes the same `description` (start-up: engine arguments and
        model, which a torchrun launch gives each rank separately)."""
        mine = torch.tensor([[_fingerprint(description)]], dtype=torch.int64)
        out = torch.empty((self.world_size, 1), dtype=torch.int64)
        try:
            self._control._allgather_base(out, mine).wait()
        except RuntimeError as e:
            raise self._collective_failed(e) from None
        values = out.view(-1).tolist()
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise ValueError(f"tensor parallelism: ranks {differ} have a different {what} than rank 0 ({description} "
                             f"on rank {self.rank}); start every rank with the same arguments and checkpoint")

    def model_ops(self, shard: ShardSpec, backend) -> ShardOps:
        """The hooks a sharded `LlamaModel` calls (all-reduce, vocab-parallel embedding and LM head), on `backend`'s
        matrix products and embedding rows."""
        return ShardOps(self, shard, backend)

    # ------------------------------------------------------------------ waiting on the device (CUDA)
    def wait_event(self, event) -> None:
        """Wait for a CUDA event, but give up with the world's error when a rank fails meanwhile (a plain
        synchronize would wait forever on a collective whose peer is gone)."""
        while not event.query():
            if self._peer_failure is not None or self._error is not None:
                raise self._collective_failed(RuntimeError("a rank failed while rank 0 waited for the device"))
            time.sleep(20e-6)

    def wait_device(self) -> None:
        """Wait for this rank's current CUDA stream (no-op on the CPU), as `wait_event`."""
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.wait_event(event)

    # ------------------------------------------------------------------ failures
    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise TensorParallelError("tensor parallelism: the engine was closed")

    def _reported(self, rank: int) -> str | None:
        """The error `rank` wrote into the store, if any."""
        key = f"{self._prefix}error/{rank}"
        try:
            if self._store.check([key]):
                return self._store.get(key).decode(errors="replace")
        except Exception:  # the store itself may be gone (it lives in rank 0)
            pass
        return None

    def _find_cause(self, wait_s: float) -> str | None:
        """The failed peer and why, waiting up to wait_s for it to show: first an error a rank reported itself
        or a spawned rank's end, then a rank that only saw a collective fail; None if nothing shows."""
        deadline = time.monotonic() + wait_s
        while True:
            secondary = None
            for r in range(self.world_size):
                if r == self.rank:
                    continue
                reported = self._reported(r)
                if reported is not None and not reported.startswith(_SECONDARY):
                    return f"rank {r} raised {reported}"
                p = self._procs.get(r)
                if p is not None and not p.is_alive():
                    return f"rank {r} (pid {p.pid}) {_describe_exit(p.exitcode)}"
                if reported is not None and secondary is None:
                    secondary = f"rank {r} {reported}"
            if self._peer_failure is not None:
                return self._peer_failure
            if time.monotonic() > deadline:
                return secondary
            time.sleep(0.02)

    def _collective_failed(self, exc: BaseException) -> TensorParallelError:
        """The error to raise after a collective failed on this rank; stops the world (once)."""
        with self._lock:
            if self._error is None:
                if self._closed:
                    return TensorParallelError("tensor parallelism: the engine was closed")
                cause = self._find_cause(_CAUSE_WAIT_S if self.rank == 0 else 0.5)
                if cause is None:
                    cause = f"a collective failed on rank {self.rank}: {exc}"
                self._error = TensorParallelError(f"tensor-parallel {cause}; every rank has been stopped")
                self._report(f"{_SECONDARY} ({cause})")
                self._teardown()
        return self._error

    def abandon(self, exc: BaseException) -> None:
        """This rank failed outside a collective (or a step broke off half-way): report it, stop the world."""
        with self._lock:
            if self._error is not None or self._closed:
                return
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._error = exc if isinstance(exc, TensorParallelError) else TensorParallelError(
                f"tensor-parallel rank {self.rank} raised {text}; every rank has been stopped")
            self._report(text)
            self._teardown()

    def _report(self, text: str) -> None:
        try:
            self._store.set(f"{self._prefix}error/{self.rank}", text[:4000])
        except Exception:  # the store is rank 0's: gone with it
            pass

    def _watch(self) -> None:
        """Rank 0: notice a spawned rank's death (its sentinel) or any rank's reported error; on CUDA abort the
        NCCL group so that kernels waiting on the dead peer end."""
        from multiprocessing.connection import wait

        sentinels = {p.sentinel: r for r, p in self._procs.items()}
        keys = range(1, self.world_size)
        while not self._stop_watch.is_set():
            dead = wait(list(sentinels), timeout=0.25) if sentinels else self._stop_watch.wait(0.25)
            if self._stop_watch.is_set():
                return
            failure = None
            for s in dead or ():
                r = sentinels[s]
                p = self._procs[r]
                p.join(0.1)
                why = self._reported(r)
                failure = f"rank {r} (pid {p.pid}) {_describe_exit(p.exitcode)}{': ' + why if why else ''}"
            if failure is None:
                for r in keys:
                    reported = self._reported(r)
                    if reported is not None and not reported.startswith(_SECONDARY):
                        failure = f"rank {r} raised {reported}"
                        break
            if failure is not None:
                self._peer_failure = failure
                group = self._group
                if self.device.type == "cuda" and group is not None:
                    try:
                        group.abort()
                    except Exception as e:  # best effort: the main thread raises either way
                        logger.warning("aborting the NCCL group failed: %s", e)
                return

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """End this rank's part: rank 0 tells the followers to stop (if the world is healthy), waits for spawned
        ranks (then terminates and kills stragglers) and frees the groups. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._stop_watch.set()  # the followers' exits from here on are expected
            if self.rank == 0 and self._error is None:
                try:
                    self.send_header(0)  # tp_worker.OP_SHUTDOWN
                except Exception as e:
                    logger.warning("tensor parallelism: telling the other ranks to stop failed: %s", e)
            self._closed = True
            self._teardown()

    def _teardown(self) -> None:
        """Release the groups, stop the watch thread, end the spawned ranks (the caller holds the lock)."""
        self._closed = self._closed or self._error is not None
        self._stop_watch.set()
        group, control = getattr(self, "_group", None), getattr(self, "_control", None)
        self._group = self._control = None  # gloo: the last reference closes its sockets, which peers notice
        if group is not None and group is not control:  # NCCL
            try:
                group.shutdown() if self._error is None else group.abort()
            except Exception as e:
                logger.warning("tensor parallelism: releasing the NCCL group failed: %s", e)
        del group, control
        deadline = time.monotonic() + (_REAP_S if self._error is None else 1.0)
        for p in self._procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs.values():
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(1.0)

    @property
    def failed(self) -> TensorParallelError | None:
        """The error that stopped the world, or None."""
        return self._error

    @property
    def processes(self) -> list:
        """The ranks this process spawned (rank 0 of a spawned world), in rank order; their state after close()."""
        return [self._procs[r] for r in sorted(self._procs)]

    def __repr__(self) -> str:
        return (f"TensorParallel(rank={self.rank}, world_size={self.world_size}, device={self.device}, "
                f"{'failed' if self._error else 'closed' if self._closed else 'running'})")


def _spawned_rank_main(rank: int, world_size: int, port: int, engine_args: dict, parent_pid: int,
                       num_threads: int) -> None:
    """Entry point of a rank spawned by rank 0: build the same Engine, which follows rank 0 until it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 decides

    def watch_parent() -> None:  # never outlive rank 0 (even killed): its store and sockets are gone then
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch_parent, name="trinfer-tp-parent", daemon=True).start()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **{_ENV_SPAWNED: "1"})
    torch.set_num_threads(num_threads)
    from .engine import Engine  # noqa: PLC0415  (the engine imports this module)

    try:
        Engine(**engine_args)
    except SystemExit as e:  # the follower's normal end: rank 0 closed its engine (which waits for this exit)
        code = e.code if isinstance(e.code, int) else 0
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # its groups are closed; skip the interpreter's teardown (a second or more with torch loaded)


class ShardOps:
    """The three places a sharded `LlamaModel` communicates (model.py calls them when it holds a shard):

        all_reduce(h)                       after o_proj and after down (row-parallel): sum the ranks' partials
        embedding(ids, table, dtype)        vocab-parallel lookup (the backend's `embedding`: dense or quantized
                                            rows): ids outside [v_r, v_r+1) give zero rows, then the sum
        lm_head_greedy(hidden, w, out)      this rank's logits [B, V_r] (the backend's `linear`), `greedy_stats`,
                                            one all-gather, `combine_greedy`: the same token on every rank
    """

    def __init__(self, tp: TensorParallel, shard: ShardSpec, backend):
        self.tp, self.shard, self.backend = tp, shard, backend
        self.all_reduce = tp.all_reduce

    def embedding(self, ids: torch.Tensor, table, dtype: torch.dtype) -> torch.Tensor:
        start, stop = self.shard.vocab
        local = ids - start
        outside = (local < 0) | (local >= stop - start)
        h = self.backend.embedding(local.masked_fill(outside, 0), table, dtype)
        h.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(h)

    def lm_head_greedy(self, hidden: torch.Tensor, weight,
                       out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        stats = greedy_stats(self.backend.linear(hidden, weight), self.shard.vocab_start)
        ids, logprobs = combine_greedy(self.tp.all_gather(stats))
        if out is None:
            return ids, logprobs
        out[0].copy_(ids)
        out[1].copy_(logprobs)
        return out
