"""Failure injection on CPU ranks: whatever one rank does (killed, hung, raising, exiting; at
load, in prefill or in decode), every process exits within 30 s, non-zero, with a line naming
the failed rank, and no process is left behind. `pytest -m slow` repeats each scenario 10
times and prints the worst time to exit (docs/reliability.md)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

PROMPT = "the quick brown fox jumps over the lazy dog and then"
LIMIT_S = 30.0

# (TPRUNTIME_FAULT, what the launcher's last line must name)
SCENARIOS = {
    "kill at load": ("1:load:kill", "rank 1 (pid"),
    "kill in prefill": ("2:0:kill", "rank 2 (pid"),
    "kill in decode": ("1:6:kill", "rank 1 (pid"),
    "hang at load": ("0:load:hang", "rank 0 (pid"),
    "hang in prefill": ("1:0:hang", "rank 1 (pid"),
    "hang in decode": ("2:5:hang", "rank 2 (pid"),
    "coordinator hangs in decode": ("0:4:hang", "rank 0 (pid"),
    "raise at load": ("2:load:raise", "rank 2 (pid"),
    "raise in decode": ("1:3:raise", "rank 1 (pid"),
    "exit in decode": ("1:2:exit", "rank 1 (pid"),
}


def _env(tag: str, **extra) -> dict:
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TPRUNTIME_TEST_TAG": tag, **extra}
    e.pop("TPRUNTIME_DEBUG", None)
    return e


def _tagged(tag: str) -> list[int]:
    """Live processes started with this test's tag (zombies do not count)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if f"TPRUNTIME_TEST_TAG={tag}".encode() not in (d / "environ").read_bytes():
                continue
            if "\nState:\tZ" in (d / "status").read_text():
                continue
        except OSError:
            continue
        out.append(int(d.name))
    return out


def _generate_args(model, *extra):
    return ["generate", "-m", str(model), "-p", PROMPT, "-n", "64", "--temp", "0", "-c", "128",
            "--device", "cpu", "--comm-timeout", "5", "--load-timeout", "5", "--ignore-eos", *map(str, extra)]


def run_scenario(model, fault: str) -> tuple[float, str]:
    tag = uuid.uuid4().hex
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "tpruntime", "launch", "--nproc-per-node", "3",
                        *_generate_args(model)], capture_output=True, text=True, timeout=120,
                       env=_env(tag, TPRUNTIME_FAULT=fault))
    elapsed = time.time() - t0
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    time.sleep(0.5)
    assert _tagged(tag) == [], "processes left behind"
    return elapsed, r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("name", SCENARIOS)
def test_failure_stops_every_rank(name, tiny_models):
    fault, needle = SCENARIOS[name]
    elapsed, last = run_scenario(tiny_models["tiny-qwen3"], fault)
    assert elapsed < LIMIT_S, elapsed
    assert last.startswith("error: ") and needle in last and "all ranks stopped" in last, last


@pytest.mark.slow
def test_failure_scenarios_repeated(tiny_models, capsys):
    rows = []
    for name, (fault, needle) in SCENARIOS.items():
        times = []
        for _ in range(10):
            elapsed, last = run_scenario(tiny_models["tiny-qwen3"], fault)
            assert needle in last, last
            times.append(elapsed)
        rows.append((name, fault, max(times), sum(times) / len(times), last))
    with capsys.disabled():
        print("\n| scenario | TPRUNTIME_FAULT | max s | mean s | launcher's line |")
        print("|---|---|---|---|---|")
        for name, fault, worst, mean, last in rows:
            print(f"| {name} | `{fault}` | {worst:.1f} | {mean:.1f} | {last} |")
    assert all(r[2] < LIMIT_S for r in rows)


def _workers(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the torchrun workers under the launcher process."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(agent_pid)], capture_output=True, text=True).stdout
    ranks = {}
    for pid in map(int, out.split()):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                ranks[int(kv[5:])] = pid
    return ranks


def _start_streaming(model, tag):
    p = subprocess.Popen([sys.executable, "-m", "tpruntime", "launch", "--nproc-per-node", "3",
                          *_generate_args(model, "-n", -1, "-c", 4096)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(tag))
    os.set_blocking(p.stdout.fileno(), False)
    got, deadline = b"", time.time() + 120
    while len(got) < 40 and time.time() < deadline and p.poll() is None:  # tokens are streaming
        got += p.stdout.read() or b""
        time.sleep(0.1)
    assert len(got) >= 40, p.stderr.read().decode()[-2000:]
    workers = _workers(p.pid)
    assert sorted(workers) == [0, 1, 2]
    return p, workers


def test_external_sigkill_of_a_rank(tiny_models):
    tag = uuid.uuid4().hex
    p, workers = _start_streaming(tiny_models["tiny-qwen3"], tag)
    t0 = time.time()
    os.kill(workers[1], signal.SIGKILL)
    p.wait(timeout=60)
    assert time.time() - t0 < LIMIT_S
    err = p.stderr.read().decode()
    assert p.returncode != 0 and "rank 1" in err and "SIGKILL" in err, err[-2000:]
    time.sleep(0.5)
    assert _tagged(tag) == []


def test_killed_launcher_leaves_no_orphans(tiny_models):
    """SIGKILL to `tpruntime launch` itself: torchrun cannot clean up, the kernel does
    (each worker asked for SIGKILL when its parent dies)."""
    tag = uuid.uuid4().hex
    p, workers = _start_streaming(tiny_models["tiny-qwen3"], tag)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    deadline = time.time() + LIMIT_S
    while _tagged(tag) and time.time() < deadline:
        time.sleep(0.2)
    assert _tagged(tag) == []


def test_rendezvous_that_never_completes(tiny_models):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tag = uuid.uuid4().hex
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "tpruntime", "launch", "--nproc-per-node", "1", "--nnodes", "2",
                        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-timeout", "5",
                        *_generate_args(tiny_models["tiny-qwen3"])],
                       capture_output=True, text=True, timeout=120, env=_env(tag))
    assert time.time() - t0 < LIMIT_S
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "did not complete" in lines[0] and "2 nodes" in lines[0], r.stderr
    assert _tagged(tag) == []
