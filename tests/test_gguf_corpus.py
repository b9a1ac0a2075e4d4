"""The malformed-GGUF corpus (gguf_corpus.py) in process and (a third of it) through the real
command: every file fails with exit code 2 and one line that names the file and the problem,
before any weight is read, in well under a second and in little memory."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gguf_corpus import Case, address_space_limit, base_files, cases, validate
from tpruntime.errors import TpError

with tempfile.TemporaryDirectory() as _d:  # names only, for parametrize; the files come from a fixture
    NAMES = [c.name for c in cases(Path(_d))]
INSPECT = ["bad-magic", "kv-count-huge", "truncated-tensor-info", "block-count-string", "vocab-size-mismatch",
           "value-length-mismatch"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Case]:
    return {c.name: c for c in cases(tmp_path_factory.mktemp("gguf"))}


def tp(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TPRUNTIME_DEBUG", "RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, "-m", "tpruntime", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


# Through the real command: every third file (each process spends about a second importing
# torch, ~50 s for the whole corpus on 2 cores). Every file's check is one TpError that one
# handler prints, and test_in_process_fast_and_small checks each file's message.
COMMAND = NAMES[::3]


@pytest.fixture(scope="module")
def generated(corpus) -> dict[str, subprocess.CompletedProcess]:
    # Two at a time, each process mostly importing torch.
    with ThreadPoolExecutor(2) as ex:
        runs = {n: ex.submit(tp, "generate", "-m", corpus[n].path, "-p", "hi", "-n", "1") for n in COMMAND}
        return {n: f.result() for n, f in runs.items()}


def check_line(case: Case, r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and r.stdout == "", r.stderr
    assert case.expected in lines[0]
    if str(case.path) not in lines[0]:
        assert case.gap, lines[0]
        pytest.xfail(case.gap)


def test_corpus_covers_enough():
    assert len(NAMES) >= 30 and len(set(NAMES)) == len(NAMES)


@pytest.mark.parametrize("name", COMMAND)
def test_generate(name, corpus, generated):
    check_line(corpus[name], generated[name])


@pytest.mark.parametrize("name", INSPECT)
def test_inspect(name, corpus):
    check_line(corpus[name], tp("inspect", corpus[name].path))


@pytest.mark.parametrize("name", NAMES)
def test_in_process_fast_and_small(name, corpus):
    case = corpus[name]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with address_space_limit(1024), pytest.raises(TpError) as err:
            validate(case.path)
    finally:
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < 1.0
    # tracemalloc sees Python and numpy allocations; the peak RSS also catches native ones.
    assert peak < 64 * 2**20
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024 < 64 * 2**20
    msg = str(err.value)
    assert case.expected in msg and "\n" not in msg
    assert str(case.path) in msg or case.gap


def test_base_files_are_valid(tmp_path):
    """The corpus and the fuzzer start from files that pass every check."""
    for path in base_files(tmp_path).values():
        validate(path)
    r = tp("inspect", tmp_path / "tiny-qwen3.gguf")
    assert r.returncode == 0 and "n_layer          2" in r.stdout, r.stderr
