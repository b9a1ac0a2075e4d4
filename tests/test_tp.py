"""Tensor parallelism on CPU ranks (gloo): TP=N equals TP=1, plans, launch, failures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_SHAPES, gemma_path
from tpruntime.errors import TpError
from tpruntime.gguf_file import GGUFFile
from tpruntime.models import model_config
from tpruntime.plan import PlanOptions, make_plan

WORKER = Path(__file__).with_name("tp_logits.py")
PROMPT = "the quick brown fox jumps over the lazy dog and then"


def env():
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    e.pop("TPRUNTIME_DEBUG", None)
    return e


def tp(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "tpruntime", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env())


def generate(model, n_ranks: int, *extra, n=12, prompt=PROMPT):
    gen = ["generate", "-m", model, "-p", prompt, "-n", n, "--temp", 0, "-c", 96, "--device", "cpu",
           "--no-display-prompt", "--print-ids", *extra]
    r = tp(*gen) if n_ranks == 1 else tp("launch", "--nproc-per-node", n_ranks, *gen)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"generation: {n} tokens" in r.stderr, r.stderr[-2000:]
    ids = next(ln for ln in r.stderr.splitlines() if ln.startswith("ids: ")).split()[1:]
    assert len(ids) == n
    return r.stdout, ids


@pytest.fixture(scope="module")
def tp1(tiny_models):
    runs = {s: generate(tiny_models[s], 1) for s in TINY_SHAPES}
    for s, (_, ids) in runs.items():
        assert len(set(ids)) >= 4, (s, ids)  # varied tokens, so equality means something
    return runs


# Every shape at 2 ranks; at 3 (uneven: heads and blocks that do not divide) and 4 the two
# whose attention differs most (qwen3's q/k norms; gemma3's one KV head, window, sandwich).
@pytest.mark.parametrize("shape,n_ranks", [(s, 2) for s in TINY_SHAPES]
                         + [(s, n) for s in ("tiny-qwen3", "tiny-gemma3") for n in (3, 4)])
def test_greedy_tokens_equal_tp1(shape, n_ranks, tiny_models, tp1):
    assert generate(tiny_models[shape], n_ranks) == tp1[shape]


@pytest.mark.parametrize("n_ranks", [2, 3, 4])
def test_gemma3_270m_one_kv_head(n_ranks):
    """One KV head: replicated on every rank while the 4 query heads are split (at 4 ranks one
    query head each: issue 15's TP 4 on the real model, on CPU ranks)."""
    out, _ = generate(gemma_path(), n_ranks, n=16, prompt="The capital of France is")
    assert out.startswith(" the capital of the country of France. It is the largest city in France")


@pytest.mark.parametrize("extra,n_ranks", [
    (("--max-gpu", 1), 4),
    (("--max-gpu", 2), 4),
    (("-ts", "3,1,2"), 3),
    (("--split-mode", "layer"), 2),
    (("--split-mode", "layer", "-ts", "1,2"), 2),
])
def test_split_options_equal_tp1(extra, n_ranks, tiny_models, tp1):
    assert generate(tiny_models["tiny-qwen2"], n_ranks, *extra) == tp1["tiny-qwen2"]


def test_uneven_split_with_a_partial_kv_group(tmp_path):
    """12 query heads over 2 KV heads (groups of 6) at -ts 4,1,1: rank 0 holds query heads 0-7,
    one whole group and part of the next. Its heads 6 and 7 read KV head 1, not the 8 / 2 = 4
    per KV head that SDPA's grouped broadcast would pair them with; the tokens equal TP 1."""
    from tpruntime.synthetic import Shape, write_model
    m = write_model(tmp_path / "g6.gguf", Shape("llama", 192, 2, 12, 2, 16, 256, 4096), qtype="Q8_0", seed=2,
                    target_std=0.1)
    gf = GGUFFile(str(m))
    rank0 = make_plan(model_config(gf), PlanOptions(world_size=3, tensor_split=[4.0, 1.0, 1.0]), gf).ranks[0]
    assert (list(rank0.layers[0].q_heads), list(rank0.layers[0].kv_heads)) == (list(range(8)), [0, 1])
    _, want = generate(m, 1)
    assert len(set(want)) >= 4
    assert generate(m, 3, "-ts", "4,1,1")[1] == want


def logits(model, n_ranks, tmp_path, *extra) -> np.ndarray:
    out = tmp_path / f"logits-{n_ranks}-{'_'.join(map(str, extra))}.npy"
    prompt = ",".join(str(i) for i in np.random.default_rng(5).integers(0, 250, 21))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n_ranks),
           str(WORKER), str(model), str(out), "--prompt", prompt, *map(str, extra)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    return np.load(out)


@pytest.mark.parametrize("reduce_type,tol", [("f32", 1e-4), ("f16", 2e-2), ("bf16", 1e-1)])
def test_logits_tolerance_by_reduce_type(reduce_type, tol, tiny_models, tmp_path):
    """f32: equal to TP=1 up to summation order; f16/bf16 wire formats round each partial sum,
    so the logits move by about their relative precision (2^-11, 2^-8) times the logit scale."""
    model = tiny_models["tiny-gemma3"]
    ref = logits(model, 1, tmp_path)
    got = logits(model, 2, tmp_path, "--reduce-type", reduce_type)
    scale = np.abs(ref).max()
    err = np.abs(got - ref).max() / scale
    assert err <= tol, err
    if reduce_type != "f32":
        assert err > 0  # the wire dtype really was used


def test_two_nodes_through_rendezvous(tiny_models, tp1):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gen = ["generate", "-m", tiny_models["tiny-llama"], "-p", PROMPT, "-n", 12, "--temp", 0, "-c", 96,
           "--device", "cpu", "--no-display-prompt", "--print-ids"]
    nodes = [subprocess.Popen([sys.executable, "-m", "tpruntime", "launch", "--nproc-per-node", "2",
                               "--nnodes", "2", "--node-rank", str(i), "--rdzv-endpoint", f"127.0.0.1:{port}",
                               "--rdzv-id", f"test{port}", *map(str, gen)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
             for i in range(2)]
    outs = [p.communicate(timeout=240) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    # Global rank 0 (which node holds it is the rendezvous' choice) printed the text.
    assert sorted(o[0] for o in outs) == ["", tp1["tiny-llama"][0]]
    assert sum(f"ids: {' '.join(tp1['tiny-llama'][1])}" in o[1] for o in outs) == 1


# --- plans (no processes) ---------------------------------------------------------------------

def _plan(path, **kw):
    gf = GGUFFile(path)
    return make_plan(model_config(gf), PlanOptions(**kw), gf), gf


def test_plan_kv_heads_not_dividing_world_size(tiny_models):
    """tiny-qwen3: 2 KV heads, 4 query heads, 3 ranks -> KV heads replicated, said in the plan."""
    p, gf = _plan(tiny_models["tiny-qwen3"], world_size=3)
    assert all(p.kv_replicated)
    q = [len(r.layers[0].q_heads) for r in p.ranks]
    assert sum(q) == 4 and all(x >= 1 for x in q)
    text = p.describe(gf)
    assert "KV heads replicated" in text and "rank 2:" in text
    r = tp("plan", "-m", tiny_models["tiny-qwen3"], "-np", 3)
    assert r.returncode == 0 and "KV heads replicated" in r.stdout


def test_plan_covers_every_unit_once(tiny_models):
    for kw in (dict(world_size=2), dict(world_size=4, max_gpu=2), dict(world_size=3, tensor_split=(3, 1, 2))):
        p, _ = _plan(tiny_models["tiny-llama"], **kw)
        cfg = p.cfg
        for il in range(cfg.n_layer):
            ff = sorted(i for r in p.ranks for i in r.layers[il].ff)
            q = sorted(i for r in p.ranks for i in r.layers[il].q_heads)
            assert ff == list(range(cfg.n_ff)) and q == list(range(cfg.n_head))
            if kw.get("max_gpu"):
                assert len(p.layer_ranks(il)) == kw["max_gpu"]
        assert sorted(i for r in p.ranks for i in r.vocab) == list(range(cfg.n_vocab))
    p, _ = _plan(tiny_models["tiny-llama"], world_size=4, max_gpu=2)
    assert p.layer_ranks(0) != p.layer_ranks(1)  # the subset rotates


def test_plan_uneven_split_moves_whole_blocks(tiny_models):
    p, _ = _plan(tiny_models["tiny-llama"], world_size=2, tensor_split=(3, 1))
    ff = [len(r.layers[0].ff) for r in p.ranks]
    assert ff == [384, 128]  # 16 Q8_0 blocks of 32: 12 and 4


@pytest.mark.parametrize("kw,msg", [
    (dict(world_size=2, tensor_split=(1, 2, 3)), "3 values for 2 ranks"),
    (dict(world_size=2, tensor_split=(0, 0)), "not all 0"),
    (dict(world_size=2, max_gpu=0), "--max-gpu 0"),
    (dict(world_size=3, split_mode="layer"), "cannot give every one"),
    (dict(world_size=2, split_mode="rows"), "--split-mode 'rows'"),
])
def test_impossible_plans(tiny_models, kw, msg):
    with pytest.raises(TpError, match=msg):
        _plan(tiny_models["tiny-llama"], **kw)


def test_bad_launch_input_is_one_line(tiny_models):
    r = tp("launch", "--nproc-per-node", 2, "generate", "-m", tiny_models["tiny-llama"], "-p", "x",
           "-ts", "1,2,3", "--device", "cpu")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "3 values for 2 ranks" in lines[0], r.stderr
    r = tp("launch", "--nproc-per-node", 2, "generate", "-m", tiny_models["tiny-llama"], "-p", "x",
           "--reduce-type", "f8", "--device", "cpu")
    assert r.returncode == 2 and "--reduce-type 'f8'" in r.stderr


@pytest.mark.parametrize("kw", [dict(world_size=3), dict(world_size=4, max_gpu=2),
                                dict(world_size=2, split_mode="layer")])
def test_each_rank_holds_exactly_its_planned_bytes(tiny_models, kw):
    """Each rank loads only its slices: what it holds equals the plan, and the split parts add
    up to the whole model (plus the replicated tensors once per extra rank)."""
    from tpruntime.comm import Comm
    from tpruntime.model import Transformer

    p, gf = _plan(tiny_models["tiny-gemma3"], **kw)
    held = []
    for r in range(kw["world_size"]):
        m = Transformer(gf, p.cfg, p.ranks[r], Comm(), n_ctx=16, progress=False)
        assert m.weight_bytes == p.resident_bytes(r, gf, 4)
        held.append(m.weight_bytes)
    whole, _ = _plan(tiny_models["tiny-gemma3"], world_size=1)
    total = whole.resident_bytes(0, gf, 4)
    assert max(held) < total <= sum(held)


def test_each_rank_makes_its_gpu_current(monkeypatch):
    """A rank's GPU becomes the current device: Triton launches on the current device and
    cannot reach another GPU's memory (rank 1's first kernel failed on 2 H200s before this),
    while torch ops follow their tensors and never showed it."""
    from tpruntime.model import resolve_device
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0) and current[-1] == torch.device("cuda", 0)
    assert resolve_device("cpu", local_rank=1) == torch.device("cpu") and len(current) == 2
    with pytest.raises(TpError, match="needs GPU 2"):
        resolve_device("cuda", local_rank=2)


def test_all_reduce_modes_on_cpu_ranks(tiny_models, tp1):
    """--all-reduce: auto falls back to gloo/NCCL where the one-shot path cannot serve (here:
    CPU ranks) and gives the same tokens; symm-mem, asked for there, stops every rank with one
    line naming why; an unknown mode is refused before anything loads."""
    assert generate(tiny_models["tiny-qwen3"], 2, "--all-reduce", "auto") == tp1["tiny-qwen3"]
    r = tp("launch", "--nproc-per-node", 2, "generate", "-m", tiny_models["tiny-qwen3"], "-p", "x",
           "--all-reduce", "symm-mem", "--device", "cpu")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "--all-reduce symm-mem: not available (rank 0: it needs CUDA devices)" in lines[0], lines[0]
    r = tp("launch", "--nproc-per-node", 2, "generate", "-m", tiny_models["tiny-qwen3"], "-p", "x",
           "--all-reduce", "one-shot", "--device", "cpu")
    assert r.returncode == 2 and "--all-reduce one-shot: not available (rank 0: it needs CUDA" in r.stderr
    r = tp("generate", "-m", tiny_models["tiny-qwen3"], "-p", "x", "--all-reduce", "mpi")
    assert r.returncode == 2 and "--all-reduce 'mpi'" in r.stderr


def test_one_shot_needs_one_host_and_peer_access(monkeypatch):
    from tpruntime.comm import one_shot_problem
    cuda1 = torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: (a, b) != (1, 3))
    assert one_shot_problem(torch.device("cpu"), 2, 2, [None, None]) == "it needs CUDA devices"
    assert one_shot_problem(cuda1, 4, 2, [0, 1, 0, 1]) == "the 4 ranks are not all on one host"
    assert one_shot_problem(cuda1, 2, None, [0, 1]) == "the 2 ranks are not all on one host"
    assert one_shot_problem(cuda1, 3, 3, [0, 1, 2]) is None
    assert one_shot_problem(cuda1, 4, 4, [0, 1, 2, 3]) == "GPU 1 has no peer access to GPU(s) 3"


def test_one_shot_buffer_covers_prompt_chunks_only_on_two_ranks():
    """On 2 ranks the one-shot path takes a prompt chunk's all-reduce too (measured faster than
    NCCL up to 40 MB), within a cap; with more ranks (a one-shot sends N - 1 copies) only up to
    1 MB. A decode-only size never shrinks it below 1 MB."""
    from tpruntime.comm import ONE_SHOT_MAX_BYTES, ONE_SHOT_MAX_BYTES_2_RANKS, one_shot_max_bytes
    chunk = 2048 * 5120 * 4  # -ub 2048, qwen3-32b's hidden size, f32 wire: 40 MB
    assert one_shot_max_bytes(2, chunk) == chunk
    assert one_shot_max_bytes(2, 1000) == ONE_SHOT_MAX_BYTES
    assert one_shot_max_bytes(2, 10 * ONE_SHOT_MAX_BYTES_2_RANKS) == ONE_SHOT_MAX_BYTES_2_RANKS
    assert one_shot_max_bytes(4, chunk) == one_shot_max_bytes(8, chunk) == ONE_SHOT_MAX_BYTES


def test_memory_report_counts_the_all_reduce_buffers():
    """--report-memory names what the one-shot path holds beside the weights and KV cache (on
    2 ranks its buffers grow to 2 prompt-chunk messages)."""
    from tpruntime.comm import Comm, P2POneShot
    from tpruntime.kernels.allreduce import PeerBuffers
    assert Comm().buffer_bytes == 0
    one = object.__new__(P2POneShot)
    n_buf, n_counters = PeerBuffers.sizes(1000, 2)
    one.peers = PeerBuffers(torch.empty(n_buf), torch.zeros(2, dtype=torch.int64),
                            torch.zeros(n_counters, dtype=torch.int64), 0, 2)
    one.norm_peers = None
    comm = Comm()
    comm.one_shot = one
    assert comm.buffer_bytes == 2 * 1024 * 4  # 2 slots x 1 peer's region x 1024 f32 values


def test_all_reduce_kernel_giving_up_reads_as_a_lost_peer(monkeypatch):
    """Our all-reduce kernel sets a flag in host memory and traps when a peer stays silent; the
    host sees a failed launch wherever it next synchronizes. With the flag set the CLI reports a
    lost peer (exit 3), naming the wait; without it the same CUDA error stays this rank's own
    (an internal error), whatever its wording."""
    from tpruntime import comm
    from tpruntime.kernels import allreduce
    trapped = RuntimeError("CUDA error: unspecified launch failure\nCUDA kernel errors might be ...")
    monkeypatch.setattr(allreduce, "_GAVE_UP", None)
    assert not comm.is_comm_failure(trapped)
    monkeypatch.setattr(allreduce, "_GAVE_UP", torch.zeros(1, dtype=torch.int32))
    assert not comm.is_comm_failure(trapped)
    allreduce._GAVE_UP[0] = 1
    assert comm.is_comm_failure(trapped)
    monkeypatch.setenv("TPRUNTIME_AR_TIMEOUT_S", "2.5")
    assert comm.describe_comm_failure(trapped) == ("a peer sent nothing to the all-reduce for 2.5 s (the GPU "
                                                   "kernel gave up: CUDA error: unspecified launch failure)")
    monkeypatch.setattr(allreduce, "_GAVE_UP", None)
    lost = comm.PeerLostError("all_reduce failed: x")
    lost.__cause__ = ConnectionError("")
    assert comm.describe_comm_failure(lost) == "ConnectionError"


@pytest.mark.parametrize("raw,want", [(None, 60.0), ("0", 0.0), ("3", 3.0), ("x", None), ("-1", None),
                                      ("nan", None), ("inf", None)])
def test_all_reduce_timeout_setting(raw, want, monkeypatch):
    """TPRUNTIME_AR_TIMEOUT_S: seconds >= 0 (0: wait forever); anything else is refused."""
    from tpruntime.kernels.allreduce import timeout_s
    if raw is None:
        monkeypatch.delenv("TPRUNTIME_AR_TIMEOUT_S", raising=False)
    else:
        monkeypatch.setenv("TPRUNTIME_AR_TIMEOUT_S", raw)
    if want is None:
        with pytest.raises(ValueError, match="expected seconds"):
            timeout_s()
    else:
        assert timeout_s() == want
