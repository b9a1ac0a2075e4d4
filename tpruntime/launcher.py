"""`tpruntime launch`: torchrun (torch.distributed.run) with tpruntime's defaults and a
one-line report of which rank failed. torchrun owns the processes: it starts one worker per
GPU, and when any worker exits non-zero it stops all the others on its node."""

from __future__ import annotations

import logging
import os
import signal
import sys

from .errors import EXIT_LOST_PEER, TpError


def torchrun_args(command: list[str], *, nproc_per_node: int, nnodes: str = "1", node_rank: int = 0,
                  rdzv_endpoint: str | None = None, rdzv_id: str = "tpruntime",
                  master_port: int | None = None, rdzv_timeout: int = 300) -> list[str]:
    if nproc_per_node < 1:
        raise TpError(f"--nproc-per-node {nproc_per_node}: must be >= 1")
    if not command:
        raise TpError("launch needs a command, e.g. launch --nproc-per-node 2 generate -m m.gguf -p Hi")
    args = ["--nproc-per-node", str(nproc_per_node), "--nnodes", str(nnodes), "--max-restarts", "0"]
    if rdzv_endpoint:
        if rdzv_timeout < 1:
            raise TpError(f"--rdzv-timeout {rdzv_timeout}: must be >= 1 second")
        args += ["--node-rank", str(node_rank), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id,
                 "--rdzv-conf", f"join_timeout={rdzv_timeout}"]
    elif str(nnodes) != "1":
        raise TpError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    elif master_port is not None:
        args += ["--master-addr", "127.0.0.1", "--master-port", str(master_port)]
    else:
        args += ["--standalone"]
    return args + ["-m", "tpruntime", *command]


def run_torchrun(command: list[str], **kw) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_args(command, **kw))
    # torchrun would set this itself, with a warning per launch.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // kw["nproc_per_node"])))
    # torchrun logs each worker's failure at length; report_failure says it in one line.
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        return report_failure(e.failures)
    except KeyboardInterrupt:
        return 130
    except RendezvousTimeoutError:
        raise TpError(f"rendezvous at {kw.get('rdzv_endpoint')} did not complete: not all "
                      f"{kw.get('nnodes')} nodes joined within {kw.get('rdzv_timeout', 300)} s") from None
    except Exception as e:  # rendezvous that never completes, a bad endpoint, ...
        raise TpError(f"launch failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    return 0


def _blame(exitcode: int) -> int:
    """Which failure most likely started it (lower first): a rank killed from outside, then
    one that failed by itself, then one torchrun had to stop (it never noticed: hung), last
    the ranks that only lost a peer. Timestamps resolve seconds only, so they break ties."""
    if exitcode == EXIT_LOST_PEER:
        return 3
    if exitcode < 0:
        return 2 if -exitcode == signal.SIGTERM else 0
    return 1


def report_failure(failures: dict) -> int:
    """One line naming the rank that failed first; exit code 2, and nothing more to say, when
    that rank stopped on bad input (it has reported it; torchrun then stopped the others)."""
    rank, f = min(failures.items(), key=lambda kv: (_blame(kv[1].exitcode), kv[1].timestamp, kv[0]))
    if f.exitcode == 2:
        return 2
    if f.exitcode == -signal.SIGTERM and any(g.exitcode == EXIT_LOST_PEER for g in failures.values()):
        how = "stopped answering (its peers timed out waiting for it)"
    elif f.exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-f.exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-f.exitcode}"
    else:
        how = f"exited with code {f.exitcode}"
    others = sorted(r for r in failures if r != rank)
    also = f" (then ranks {', '.join(map(str, others))} failed too)" if others else ""
    print(f"error: rank {rank} (pid {f.pid}) {how}{also}; all ranks stopped", file=sys.stderr)
    return 1
