"""The command line: real runs on tiny models, and bad input as one line with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import gemma_path


def tp(*args, timeout=120):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TPRUNTIME_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "tpruntime", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_generate_greedy_streams_and_reports_speed(tiny_models):
    r = tp("generate", "-m", tiny_models["tiny-qwen3"], "-p", "the cat", "-n", 8, "--temp", 0,
           "-c", 64, "--no-display-prompt")
    assert r.returncode == 0, r.stderr
    assert "prompt:" in r.stderr and "generation: 8 tokens" in r.stderr
    again = tp("generate", "-m", tiny_models["tiny-qwen3"], "-p", "the cat", "-n", 8, "--temp", 0,
               "-c", 64, "--no-display-prompt")
    assert again.stdout == r.stdout


def test_generate_seeded_sampling_is_reproducible(tiny_models):
    args = ("generate", "-m", tiny_models["tiny-llama"], "-p", "in the", "-n", 6, "--temp", 1.0,
            "-s", 5, "-c", 64)
    assert tp(*args).stdout == tp(*args).stdout


def test_gemma_cli_greedy():
    r = tp("generate", "-m", gemma_path(), "-p", "The capital of France is", "-n", 12, "--temp", 0,
           "-c", 128)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is the capital of the country of France.")


def test_tokenize_and_inspect():
    r = tp("tokenize", "-m", gemma_path(), "-p", "Hello world")
    assert r.returncode == 0 and r.stdout.split() == ["2", "9259", "1902"], r.stderr
    r = tp("tokenize", "-m", gemma_path(), "-p", "Hello world", "--no-bos")
    assert r.stdout.split() == ["9259", "1902"]
    r = tp("inspect", gemma_path())
    assert r.returncode == 0, r.stderr
    assert "architecture: gemma3" in r.stdout and "blk.17.ffn_down.weight" in r.stdout
    assert "SSSSSGSSSSSGSSSSSG" in r.stdout


def test_synth_writes_a_loadable_model(tmp_path):
    out = tmp_path / "m.gguf"
    r = tp("synth", "-o", out, "--shape", "tiny-qwen2", "--qtype", "Q4_K", "--output-qtype", "Q6_K")
    assert r.returncode == 0, r.stderr
    r = tp("inspect", out)
    assert "Q4_K" in r.stdout and "Q6_K" in r.stdout and "attn_q.bias" in r.stdout


@pytest.mark.parametrize("args,needles", [
    (("generate", "-m", "/nonexistent.gguf", "-p", "x"), ["/nonexistent.gguf", "no such file"]),
    (("generate", "-m", "/tmp", "-p", "x"), ["is a directory"]),
    (("inspect", "/nonexistent.gguf"), ["no such file"]),
    (("tokenize", "-m", "/nonexistent.gguf", "-p", "x"), ["no such file"]),
])
def test_missing_files(args, needles):
    assert_one_line_error(tp(*args), *needles)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert_one_line_error(tp("generate", "-m", p, "-p", "x"), "bad magic")


def test_truncated_model(tmp_path, tiny_models):
    blob = tiny_models["tiny-qwen3"].read_bytes()
    p = tmp_path / "t.gguf"
    p.write_bytes(blob[: len(blob) // 2])
    assert_one_line_error(tp("generate", "-m", p, "-p", "x"), "past the end of the file")


@pytest.mark.parametrize("tensor", ["blk.1.ffn_down.weight", "token_embd.weight"])
def test_nan_block_scale_is_one_line(tmp_path, tiny_models, tensor):
    """A NaN f16 scale in one Q8_0 block of a matrix (or of the embedding rows) fails at load,
    naming the tensor, instead of sampling from NaN logits."""
    from tpruntime.gguf_file import GGUFFile
    src = tiny_models["tiny-qwen3"]
    gf = GGUFFile(src)
    off = gf.tensors[tensor].offset + 34 * 5  # the d field of block 5 (Q8_0: 34-byte blocks)
    blob = bytearray(src.read_bytes())
    blob[off:off + 2] = b"\x00\x7e"  # f16 NaN
    p = tmp_path / "nan.gguf"
    p.write_bytes(bytes(blob))
    assert_one_line_error(tp("generate", "-m", p, "-p", "hi", "-n", "1"), str(p), repr(tensor),
                          "1 NaN or infinite Q8_0 block scale(s), the first in block 5")


@pytest.mark.parametrize("extra,needles", [
    (("-n", -5), ["-n -5"]),
    (("-ub", 0), ["-ub 0"]),
    (("-c", 4), ["context holds 4", "raise -c"]),
    (("--top-p", 2), ["--top-p"]),
    (("--dtype", "f8"), ["--dtype 'f8'"]),
    (("--device", "tpu"), ["--device"]),
    (("-p", ""), ["prompt is empty"]),
    (("--max-gpu", 0), ["--max-gpu 0"]),
    (("-ts", "a,b"), ["--tensor-split 'a,b'"]),
    (("-ts", "1,2"), ["2 values for 1 ranks"]),
    (("-sm", "rows"), ["--split-mode 'rows'"]),
    (("--reduce-type", "f8"), ["--reduce-type 'f8'"]),
    (("--comm-timeout", 0), ["--comm-timeout 0"]),
    (("--dense-prefill", "lots"), ["--dense-prefill 'lots'", "GiB"]),
    (("--device", "cuda"), ["no CUDA device"]),
])
def test_bad_generate_flags(tiny_models, extra, needles):
    args = ["generate", "-m", tiny_models["tiny-qwen3"], "-p", "a longer prompt than four tokens", *extra]
    assert_one_line_error(tp(*args), *needles)


def test_no_prompt(tiny_models):
    assert_one_line_error(tp("generate", "-m", tiny_models["tiny-qwen3"]), "no prompt")


def test_click_usage_errors_exit_2():
    r = tp("generate", "-n", "abc")
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a host without GPUs")
def test_more_ranks_than_gpus_is_one_line(tiny_models):
    r = tp("launch", "--nproc-per-node", 2, "generate", "-m", tiny_models["tiny-qwen3"], "-p", "hi",
           "--device", "cuda")
    assert_one_line_error(r, "no CUDA device")


def test_launch_bad_arguments():
    assert_one_line_error(tp("launch", "--nproc-per-node", 0, "generate", "-p", "x"), "--nproc-per-node 0")
    assert_one_line_error(tp("launch", "--nproc-per-node", 2, "--nnodes", 2, "generate", "-p", "x"),
                          "needs --rdzv-endpoint")
