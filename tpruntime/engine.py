"""Running one model over several ranks: rank 0 (the coordinator) decides every step and
broadcasts it; the other ranks follow in lockstep, so their collectives always match."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import torch

from .comm import (CMD_FORWARD, CMD_STOP, HEADER, REDUCE_DTYPES, Comm, DistComm, check_all_reduce_mode,
                   dist_env)
from .errors import TpError
from .model import Transformer, load_model
from .plan import PlanOptions


class Engine:
    """Drives a rank's model. On rank 0, `forward` has the same contract as
    `Transformer.forward` (so `generate` runs unchanged) and runs the step on every rank."""

    def __init__(self, model: Transformer, comm: Comm, n_max: int):
        self.model, self.comm, self.n_max = model, comm, n_max
        self.n_ctx, self.device = model.n_ctx, model.device
        self.step = 0
        self.fault = _fault_for(comm.rank)
        model.warm_prefill(n_max)  # prompts are cut into chunks of n_max tokens

    def _run(self, tokens: torch.Tensor, pos0: int, all_logits: bool) -> torch.Tensor | None:
        if self.fault is not None and self.step == self.fault[0]:
            _inject(self.fault[1], self.comm.rank, self.step)
        self.step += 1
        return self.model.forward(tokens, pos0, all_logits)

    def _broadcast(self, msg: list[int] | None) -> list[int]:
        t = None if msg is None else torch.tensor(msg, dtype=torch.long)
        return self.comm.broadcast_step(t, self.n_max).tolist()

    def forward(self, tokens: torch.Tensor, pos0: int, all_logits: bool = False) -> torch.Tensor:
        if tokens.shape[0] > self.n_max:
            raise ValueError(f"{tokens.shape[0]} tokens in one step, at most {self.n_max}")
        self._broadcast([CMD_FORWARD, pos0, tokens.shape[0], int(all_logits), *tokens.tolist()])
        return self._run(tokens, pos0, all_logits)

    def stop(self) -> None:
        """Release the followers (rank 0, once, at the end)."""
        if self.comm.world_size > 1:
            self._broadcast([CMD_STOP, 0, 0, 0])

    def close(self) -> None:
        """Leave the process group, captured decode graphs first: a live graph holding NCCL
        kernels makes destroy_process_group wait forever (pytorch#115388; seen on 2 H200s)."""
        self.model.graphs = None
        self.comm.close()

    def follow(self) -> None:
        """Ranks other than 0: run every step rank 0 broadcasts until it says stop."""
        while True:
            msg = self._broadcast(None)
            cmd, pos0, n, all_logits = msg[:HEADER]
            if cmd == CMD_STOP:
                return
            tokens = torch.tensor(msg[HEADER:HEADER + n], dtype=torch.long)
            self._run(tokens, pos0, bool(all_logits))


FAULT_KINDS = ("raise", "hang", "exit", "kill")
LOAD_STEP = -1  # "load": after joining the group, before the weights are read


def _fault_for(rank: int) -> tuple[int, str] | None:
    """TPRUNTIME_FAULT=RANK:STEP:KIND makes one rank fail at one step (STEP is a forward
    step number, prefill chunks included, or `load`): raise an exception, hang, exit, or
    SIGKILL itself, so tests can prove that every other rank stops. Off when unset."""
    spec = os.environ.get("TPRUNTIME_FAULT")
    if not spec:
        return None
    try:
        r, step, kind = spec.split(":")
        r, step = int(r), LOAD_STEP if step == "load" else int(step)
        if kind not in FAULT_KINDS:
            raise ValueError
    except ValueError:
        raise TpError(f"TPRUNTIME_FAULT={spec!r}: expected RANK:STEP|load:{'|'.join(FAULT_KINDS)}") from None
    return (step, kind) if r == rank else None


def _inject(kind: str, rank: int, step: int) -> None:
    if kind == "raise":
        raise RuntimeError(f"injected fault on rank {rank} at step {step}")
    if kind == "exit":
        os._exit(70)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # hang: the process lives but never answers its peers again
        time.sleep(3600)


def _load_fault(comm: Comm) -> Comm:
    fault = _fault_for(comm.rank)
    if fault is not None and fault[0] == LOAD_STEP:
        _inject(fault[1], comm.rank, LOAD_STEP)
    return comm


def open_engine(path: str, *, n_ctx: int, device: str, dtype: str, n_ubatch: int,
                options: PlanOptions, reduce_type: str = "f32", all_reduce: str = "auto", comm_timeout: float = 20.0,
                load_timeout: float = 600.0, cuda_graphs: bool = True, progress: bool = True,
                dense_weights: bool = False, fused_ops: bool = True, dense_prefill: str = "0") -> Engine:
    """This process's rank of a run: a single process, or one worker of torchrun / SLURM
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment)."""
    env = dist_env()
    if reduce_type not in REDUCE_DTYPES:
        raise TpError(f"--reduce-type {reduce_type!r}: expected one of {', '.join(REDUCE_DTYPES)}")
    check_all_reduce_mode(all_reduce)  # (before loading: a single process builds no DistComm)
    if comm_timeout <= 0 or load_timeout <= 0:
        raise TpError(f"--comm-timeout {comm_timeout} / --load-timeout {load_timeout}: must be > 0 seconds")
    if env is None:
        model = load_model(path, n_ctx=n_ctx, device=device, dtype=dtype, progress=progress, options=options,
                           cuda_graphs=cuda_graphs, dense_weights=dense_weights, fused_ops=fused_ops,
                           dense_prefill=dense_prefill, n_ubatch=n_ubatch)
        return Engine(model, model.comm, n_ubatch)
    rank, world, local_rank = env
    options = dataclasses.replace(options, world_size=world)
    model = load_model(path, n_ctx=n_ctx, device=device, dtype=dtype, progress=progress,
                       options=options, local_rank=local_rank, cuda_graphs=cuda_graphs,
                       dense_weights=dense_weights, fused_ops=fused_ops, dense_prefill=dense_prefill,
                       n_ubatch=n_ubatch,
                       make_comm=lambda dev, cfg: _load_fault(DistComm(dev, reduce_type, comm_timeout, load_timeout,
                                                                       all_reduce, n_ubatch * cfg.n_embd)))
    model.comm.barrier()  # every rank loaded: from here on, steps run in lockstep
    return Engine(model, model.comm, n_ubatch)
