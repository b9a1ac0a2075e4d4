"""Collectives. Every all-reduce, gather, broadcast and point-to-point transfer of the runtime
goes through here, and only this module imports torch.distributed.

`Comm` is one process owning the whole model (every collective is the identity);
`DistComm` is a rank of a torch.distributed group: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import TpError

REDUCE_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

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
    torch's own DistError types."""
    return isinstance(e, (PeerLostError, dist.DistError, ConnectionError, TimeoutError))


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


class DistComm(Comm):
    def __init__(self, device: torch.device, reduce_type: str = "f32", timeout_s: float = 20.0,
                 load_timeout_s: float = 600.0):
        die_with_parent()
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

    @_collective
    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        buf = partial.to(self.reduce_dtype)
        dist.all_reduce(buf)
        return buf.float()

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
            dist.destroy_process_group()
