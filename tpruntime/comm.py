"""Collectives. Every all-reduce, gather, broadcast and point-to-point transfer of the runtime
goes through here, and only this module imports torch.distributed.

`Comm` is one process owning the whole model (every collective is the identity);
`DistComm` is a rank of a torch.distributed group: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import TpError

REDUCE_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

# --all-reduce: which path a row-parallel layer's sum takes: NCCL, torch's symmetric-memory
# one-shot op (TorchOneShot), our own one-shot kernel (P2POneShot), or auto (ours where it can
# serve, else NCCL: on 2 H200s it took 2.0-2.4 us for 4-64 KB against torch's 6.5-6.8 and
# NCCL's 9.2-11.2, and qwen3-8b TP 2 decode from 454 (NCCL) / 458 (torch's) to 596 t/s).
ALL_REDUCE_MODES = ("nccl", "auto", "symm-mem", "one-shot")


def check_all_reduce_mode(mode: str) -> None:
    if mode not in ALL_REDUCE_MODES:
        raise TpError(f"--all-reduce {mode!r}: expected one of {', '.join(ALL_REDUCE_MODES)}")
# Messages up to this size go one-shot on any number of ranks (a decode token's hidden state is
# 16-20 KB in f32); on 2 ranks also the largest one a prompt chunk sends (one_shot_max_bytes).
ONE_SHOT_MAX_BYTES = 1 << 20
# (what a 2-rank buffer may grow to for prompt chunks: 2 x this per rank, 2 slots x 1 peer's region)
ONE_SHOT_MAX_BYTES_2_RANKS = 64 << 20


def one_shot_max_bytes(world: int, largest_message: int) -> int:
    """The buffer our one-shot all-reduce gets, in message bytes. On 2 ranks it beat NCCL at every
    size measured, up to a prompt chunk's 40 MB (2 H200s: 118 vs 170 us in f32, 117 vs 222 in
    bf16): each rank sends its whole message to its peer once, as NCCL's ring does, with no
    proxy and one launch. With more ranks a one-shot sends the message to every peer (N - 1
    times the bytes), so there large messages stay with NCCL until measured (issue 15)."""
    if world == 2:
        return max(ONE_SHOT_MAX_BYTES, min(largest_message, ONE_SHOT_MAX_BYTES_2_RANKS))
    return ONE_SHOT_MAX_BYTES

# Our one-shot all-reduce can also end in the residual add and the next RMSNorm where the sum
# feeds them (every all-reduce of a decode step): one launch where there were two. Opt-in
# (TPRUNTIME_FUSED_AR=1): on 2 H200s it did not pay (one program per row holds the norm, where
# the plain all-reduce spreads a row over several; qwen3-8b TP 2 605 vs 596 t/s, qwen3-32b 208
# vs 209; docs/benchmarks.md).
FUSED_AR = os.environ.get("TPRUNTIME_FUSED_AR", "0") == "1"

# A step message from the coordinator: [command, pos0, n_tokens, all_logits, tokens...].
CMD_FORWARD, CMD_STOP = 1, 2
HEADER = 4


class Comm:
    """One process owning the whole model: every collective is the identity."""

    rank = 0
    world_size = 1
    reduce_dtype = torch.float32

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of a row-parallel layer's partial result, as float32."""
        return partial.float()

    @property
    def buffer_bytes(self) -> int:
        """Device memory this rank's all-reduce path holds of its own (the one-shot buffers)."""
        one = getattr(self, "one_shot", None)
        if one is None:
            return 0
        bufs = [one.buf] if isinstance(one, TorchOneShot) else [one.peers.buf] + (
            [one.norm_peers.buf] if one.norm_peers is not None else [])
        return sum(b.numel() * b.element_size() for b in bufs)

    def reduce_add_rms_norm(self, ops, h: torch.Tensor, partial: torch.Tensor, weight: torch.Tensor, eps: float, *,
                            post_weight: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                            q8=None):
        """ops.add_rms_norm(h, all_reduce(partial), ...): h += the sum over ranks (post-normed
        first with post_weight), in place; returns (h, rms_norm(h) * weight)."""
        return ops.add_rms_norm(h, self.all_reduce(partial), weight, eps, post_weight=post_weight,
                                out_dtype=out_dtype, q8=q8)

    def gather_vocab(self, logits: torch.Tensor, sizes: list[int]) -> torch.Tensor | None:
        """Each rank's vocabulary slice of the logits, concatenated in rank order on rank 0."""
        return logits

    def send_hidden(self, h: torch.Tensor, dst: int) -> None:
        raise AssertionError("a single process has no pipeline stages")

    def recv_hidden(self, shape: tuple[int, ...], src: int, device: torch.device) -> torch.Tensor:
        raise AssertionError("a single process has no pipeline stages")

    def broadcast_step(self, msg: torch.Tensor | None, n_max: int) -> torch.Tensor:
        """Rank 0's step message (int64, CPU), delivered to every rank."""
        return msg

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class PeerLostError(RuntimeError):
    """A collective failed: a peer died, hung past the timeout or closed its connection."""


def _collective(fn):
    """Any failure inside a collective means the group is broken: say so with one type, so
    the CLI need not guess from gloo's or NCCL's wording."""

    def wrapper(self, *args, **kw):
        try:
            return fn(self, *args, **kw)
        except PeerLostError:
            raise
        except Exception as e:
            raise PeerLostError(f"{fn.__name__} failed: {e}") from e

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def is_comm_failure(e: BaseException) -> bool:
    """A broken group: a failed collective, or joining it (rendezvous, store) failing with
    torch's own DistError types, or our all-reduce kernel giving up on a silent peer."""
    return isinstance(e, (PeerLostError, dist.DistError, ConnectionError, TimeoutError)) or peer_timed_out(e)


def peer_timed_out(e: BaseException) -> bool:
    """Whether e comes from our all-reduce kernel giving up on a silent peer (kernels/allreduce.py:
    it sets a flag in host memory, then traps; the host reads a failed launch at its next
    synchronization, wherever that is: sampling, a copy, not inside a collective)."""
    allreduce = sys.modules.get("tpruntime.kernels.allreduce")
    return allreduce is not None and allreduce.gave_up()


def describe_comm_failure(e: BaseException) -> str:
    """The gist of a broken group's error, for the one line the CLI prints."""
    if peer_timed_out(e):
        from .kernels.allreduce import timeout_s
        cuda = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"a peer sent nothing to the all-reduce for {timeout_s():g} s (the GPU kernel gave up: {cuda})"
    cause = e.__cause__ or e
    return str(cause).strip() or type(cause).__name__


def group_is_up() -> bool:
    return dist.is_available() and dist.is_initialized()


def dist_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun / SLURM-style env; else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    except ValueError:
        raise TpError("RANK / WORLD_SIZE / LOCAL_RANK must be integers") from None


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent (the torchrun agent) dies, so a
    killed launcher leaves no orphan ranks behind. Elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class TorchOneShot:
    """torch's symmetric-memory one-shot all-reduce (torch.distributed._symmetric_memory) for
    the ranks of one host: each rank's partial goes into a buffer that every peer maps over
    NVLink, and one kernel waits for all ranks (flags in a signal pad), sums every rank's buffer
    and signals that it is done reading, so the buffer is free for the next call. One launch and
    no NCCL proxy: 6-7 us for 4-64 KB on 2 H200s against NCCL's 10 (docs/benchmarks.md). It is
    CUDA-graph capturable. NVLink multicast is not used (HARDWARE.md)."""

    def __init__(self, group, device: torch.device, dtype: torch.dtype, max_bytes: int = ONE_SHOT_MAX_BYTES):
        import torch.distributed._symmetric_memory as symm_mem  # CUDA builds only: imported here
        self.buf = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buf, group.group_name)
        self.group_name, self.dtype = group.group_name, dtype

    def fits(self, t: torch.Tensor) -> bool:
        # torch's kernel refuses a message that is not a whole number of 4-byte words
        # ("input size must be at least 4-byte aligned": an odd count of bf16 values)
        return t.numel() <= self.buf.numel() and t.numel() * self.dtype.itemsize % 4 == 0

    def __call__(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, as float32 shaped as `partial` (which is left as it is)."""
        x = partial.reshape(-1).to(self.dtype)
        view = self.buf[: x.numel()]
        if hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):
            # the kernel copies x into this rank's buffer itself: no launch for the copy
            out = torch.ops.symm_mem.one_shot_all_reduce_copy(view, x, "sum", self.group_name)
        else:
            view.copy_(x)
            out = torch.ops.symm_mem.one_shot_all_reduce(view, "sum", self.group_name)
        return out.view(partial.shape).float()


class P2POneShot:
    """Our one-shot all-reduce (kernels/allreduce.py: every rank's chunk pushed into its peers'
    buffers, values that mark their own arrival, the sum in rank order, all in one launched
    kernel that is also a programmatic dependent) over buffers in torch symmetric memory, for
    the ranks of one host."""

    def __init__(self, group, device: torch.device, dtype: torch.dtype, max_bytes: int = ONE_SHOT_MAX_BYTES,
                 fused_norm: bool = FUSED_AR):
        from .kernels.allreduce import BLOCK, MAX_ROWS, ROW, gave_up_address
        self.dtype = dtype
        gave_up_address(device)  # (its pinned flag made now, not inside a graph capture)
        self.peers = self._peer_buffers(group, device, max_bytes // dtype.itemsize, BLOCK)
        # the all-reduce ending in a norm counts its calls apart: buffers of its own
        self.norm_peers = self._peer_buffers(group, device, MAX_ROWS * ROW, ROW) if fused_norm else None
        torch.cuda.synchronize(device)  # every rank's buffers are marked before any rank writes
        dist.barrier(group)

    def _peer_buffers(self, group, device: torch.device, max_elems: int, unit: int):
        import torch.distributed._symmetric_memory as symm_mem

        from .kernels.allreduce import PeerBuffers
        n_buf, n_counters = PeerBuffers.sizes(max_elems, dist.get_world_size(group), unit)
        buf = PeerBuffers.fill_unwritten(symm_mem.empty(n_buf, dtype=self.dtype, device=device))
        hb = symm_mem.rendezvous(buf, group.group_name)
        return PeerBuffers(buf, torch.tensor(hb.buffer_ptrs, dtype=torch.int64, device=device),
                           torch.zeros(n_counters, dtype=torch.int64, device=device), hb.rank, hb.world_size)

    def fits(self, t: torch.Tensor) -> bool:
        return t.numel() <= self.peers.region

    def __call__(self, partial: torch.Tensor) -> torch.Tensor:
        from .kernels.allreduce import one_shot_all_reduce
        return one_shot_all_reduce(partial, self.peers)

    def fits_norm(self, h: torch.Tensor, weight: torch.Tensor) -> bool:
        from .kernels.allreduce import fits_add_rms_norm
        n = weight.numel()
        return self.norm_peers is not None and fits_add_rms_norm(self.norm_peers, h.numel() // max(n, 1), n)

    def add_rms_norm(self, h: torch.Tensor, partial: torch.Tensor, weight: torch.Tensor, eps: float, **kw):
        from .kernels.allreduce import one_shot_add_rms_norm
        return one_shot_add_rms_norm(h, partial, weight, eps, self.norm_peers, **kw)


def one_shot_problem(device: torch.device, world_size: int, local_world_size: int | None,
                     peer_devices: list[int]) -> str | None:
    """Why the one-shot path cannot serve this group (None: it can): it needs CUDA, every rank
    on this host, and peer access to every other rank's GPU."""
    if device.type != "cuda":
        return "it needs CUDA devices"
    if local_world_size != world_size:
        return f"the {world_size} ranks are not all on one host"
    missing = [d for d in peer_devices if d != device.index and not torch.cuda.can_device_access_peer(device.index, d)]
    if missing:
        return f"GPU {device.index} has no peer access to GPU(s) {', '.join(map(str, missing))}"
    return None


class DistComm(Comm):
    def __init__(self, device: torch.device, reduce_type: str = "f32", timeout_s: float = 20.0,
                 load_timeout_s: float = 600.0, all_reduce: str = "auto", max_message: int = 0):
        """max_message: the most values one all-reduce will carry (a prompt chunk's tokens x
        the hidden size), which sizes our one-shot path's buffers (one_shot_max_bytes)."""
        die_with_parent()
        check_all_reduce_mode(all_reduce)
        self.reduce_dtype = REDUCE_DTYPES[reduce_type]
        self.device = device
        backend = "nccl" if device.type == "cuda" else "gloo"
        # A short timeout on the step collectives is what turns a hung or dead peer into an
        # error on every survivor (and then an exit, which torchrun turns into a full stop).
        kw = dict(backend=backend, timeout=timedelta(seconds=timeout_s))
        if device.type == "cuda":
            kw["device_id"] = device
        dist.init_process_group(**kw)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # Step messages travel on the CPU (gloo) so a follower reads them without a device sync.
        self._steps = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
                       if backend != "gloo" else None)
        # Loading takes as long as the slowest rank's disk: its barrier gets its own patience.
        self._control = dist.new_group(backend="gloo", timeout=timedelta(seconds=load_timeout_s))
        if all_reduce != "nccl" and device.type == "cuda":
            from .kernels.allreduce import timeout_s
            try:
                timeout_s()
            except ValueError as e:
                raise TpError(str(e)) from None
        self.one_shot = self._choose_one_shot(all_reduce, max_message) if all_reduce != "nccl" else None

    def _choose_one_shot(self, mode: str, max_message: int) -> "TorchOneShot | P2POneShot | None":
        """The one-shot path where `mode` allows it and every rank can take it, checked on
        exact data. Every rank reaches the same answer (they must all take the same path), and
        the collective set-up starts only once all ranks can go through with it."""
        views = [None] * self.world_size
        dist.all_gather_object(views, (self.device.index, FUSED_AR), group=self._control)
        peers = [d for d, _ in views]
        # the all-reduce ending in the norm only where every rank was asked for it: a rank
        # taking it while a peer does not would wait for that peer's flags forever
        fused_norm = all(f for _, f in views)
        local = os.environ.get("LOCAL_WORLD_SIZE")
        problem = one_shot_problem(self.device, self.world_size, int(local) if local else None, peers)
        if problem is None and mode == "symm-mem" and not hasattr(torch.ops.symm_mem, "one_shot_all_reduce"):
            problem = "this torch has no symmetric-memory one-shot all-reduce"
        if self._agree(problem, mode):
            return None
        problem, one_shot = None, None
        try:
            one_shot = (TorchOneShot(dist.group.WORLD, self.device, self.reduce_dtype) if mode == "symm-mem"
                        else P2POneShot(dist.group.WORLD, self.device, self.reduce_dtype, fused_norm=fused_norm,
                                        max_bytes=one_shot_max_bytes(self.world_size,
                                                                     max_message * self.reduce_dtype.itemsize)))
            # small integers: exact in every wire dtype
            n = 1000
            got = one_shot((torch.arange(n, device=self.device) % 7 + self.rank).float())
            want = sum((torch.arange(n, device=self.device) % 7 + r).float() for r in range(self.world_size))
            if not torch.equal(got.float(), want):
                problem = "its result on a test sum was wrong"
        except Exception as e:  # an allocation or mapping refused, ...
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None if self._agree(problem, mode) else one_shot

    def _agree(self, problem: str | None, mode: str) -> bool:
        """Whether any rank has a problem with the one-shot path (then --all-reduce symm-mem
        stops with the first one; auto stays on NCCL)."""
        verdicts = [None] * self.world_size
        dist.all_gather_object(verdicts, problem, group=self._control)
        problems = [f"rank {r}: {p}" for r, p in enumerate(verdicts) if p]
        if problems and mode != "auto":
            raise TpError(f"--all-reduce {mode}: not available ({problems[0]})")
        return bool(problems)

    @_collective
    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """(NCCL/gloo sum in place when `partial` already has the wire dtype.)"""
        if self.one_shot is not None and self.one_shot.dtype == self.reduce_dtype and self.one_shot.fits(partial):
            return self.one_shot(partial)
        buf = partial.to(self.reduce_dtype)
        dist.all_reduce(buf)
        return buf.float()

    @_collective
    def reduce_add_rms_norm(self, ops, h: torch.Tensor, partial: torch.Tensor, weight: torch.Tensor, eps: float, *,
                            post_weight: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                            q8=None):
        """(One kernel where our one-shot path serves the sum and the fused ops the norm: the
        same shapes on every rank, so every rank takes the same path.)"""
        one = self.one_shot
        if (ops.fused and isinstance(one, P2POneShot) and one.dtype == self.reduce_dtype
                and one.fits_norm(h, weight)):
            return one.add_rms_norm(h, partial, weight, eps, post_weight=post_weight, out_dtype=out_dtype, q8=q8)
        return super().reduce_add_rms_norm(ops, h, partial, weight, eps, post_weight=post_weight,
                                           out_dtype=out_dtype, q8=q8)

    @_collective
    def gather_vocab(self, logits: torch.Tensor, sizes: list[int]) -> torch.Tensor | None:
        if self.rank != 0:
            if logits.shape[-1]:
                dist.send(logits.contiguous(), 0)
            return None
        parts = []
        for r, n in enumerate(sizes):
            if r == 0:
                parts.append(logits)
            elif n:
                buf = torch.empty(logits.shape[0], n, dtype=logits.dtype, device=logits.device)
                dist.recv(buf, r)
                parts.append(buf)
        return torch.cat(parts, dim=-1)

    @_collective
    def send_hidden(self, h: torch.Tensor, dst: int) -> None:
        dist.send(h.contiguous(), dst)

    @_collective
    def recv_hidden(self, shape: tuple[int, ...], src: int, device: torch.device) -> torch.Tensor:
        buf = torch.empty(shape, dtype=torch.float32, device=device)
        dist.recv(buf, src)
        return buf

    @_collective
    def broadcast_step(self, msg: torch.Tensor | None, n_max: int) -> torch.Tensor:
        buf = torch.zeros(HEADER + n_max, dtype=torch.long)
        if self.rank == 0:
            buf[: msg.numel()] = msg
        dist.broadcast(buf, 0, group=self._steps)
        return buf

    @_collective
    def barrier(self) -> None:
        dist.barrier(group=self._control)

    def close(self) -> None:
        if dist.is_initialized():
            # graphs that captured NCCL calls must be gone (and their work done) before the
            # communicators are destroyed, or destroy_process_group hangs (pytorch#115388)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dist.destroy_process_group()
