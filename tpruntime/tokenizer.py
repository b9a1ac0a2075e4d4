"""The tokenizer a GGUF file describes, reproducing llama.cpp's (src/llama-vocab.cpp) id for id.

Two vocabulary types, chosen by ``tokenizer.ggml.model``:

* ``llama`` (SPM): llama.cpp's score-driven bigram merging (llm_tokenizer_spm), written here in
  Python: HF ``tokenizers`` has no model that merges by the score of the merged piece (its
  Unigram is a Viterbi search and its BPE merges by rank), so it cannot reproduce it.
* ``gpt2`` (byte-level BPE): HF ``tokenizers`` does the work: one ``Split(..., "isolated")``
  per llama.cpp pre-tokenizer regex (llama.cpp also keeps both matches and the text between
  them), ``ByteLevel`` for the byte-to-unicode mapping and ``models.BPE`` for rank-ordered
  merges. The Oniguruma engine behind ``Split`` has the same ``\\s`` (Unicode White_Space)
  and ``\\p{..}`` classes as llama.cpp's tables.

What stays ours for both: splitting user-defined / control tokens out of the text first
(tokenizer_st_partition), the special-token bookkeeping (EOG detection by token text) and
token_to_piece / detokenize, whose rules (hidden control tokens, raw user-defined text, SPM's
leading-space removal) differ from HF's decoders.
"""

from __future__ import annotations

import codecs
import heapq
from typing import Any, Mapping, Sequence

from .errors import TpError

# llama_token_attr bits (llama.h)
ATTR_UNDEFINED, ATTR_UNKNOWN, ATTR_UNUSED, ATTR_NORMAL = 0, 1 << 0, 1 << 1, 1 << 2
ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_BYTE = 1 << 3, 1 << 4, 1 << 5
ATTR_LSTRIP, ATTR_RSTRIP = 1 << 7, 1 << 8
# GGUF tokenizer.ggml.token_type values (gguf.TokenType) -> attribute; anything else is undefined
_TYPE_ATTR = {1: ATTR_NORMAL, 2: ATTR_UNKNOWN, 3: ATTR_CONTROL, 4: ATTR_USER_DEFINED, 5: ATTR_UNUSED, 6: ATTR_BYTE}

_SPACE = "\u2581"  # SPM's escaped space
_C_SPACES = " \t\n\v\f\r"  # C isspace(), what llama.cpp's lstrip/rstrip attributes strip

# ---------------------------------------------------------------------------------------------
# BPE pre-tokenizers (llm_tokenizer_bpe). Written for Oniguruma; where llama.cpp's regex engine
# (std::regex on a category-collapsed copy of the text) behaves differently from a plain
# Unicode regex the pattern says so instead of copying llama.cpp's string:
#   - `$` there means end of fragment: `\z` here (Oniguruma's `$` is end of line);
#   - its \p{S} misses ASCII `~`: `[\p{S}&&[^~]]` here;
#   - its \p{Lu}/\p{Ll}/... all mean \p{L} (llama.cpp rewrote those patterns with lookaheads).

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"  # llama.cpp's stand-ins for \p{Lu}, \p{Ll}
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
# deepseek-llm's letter class: the cased letters of its tokenizer.json, as code points
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
    "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3"
    "\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115"
    "\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_PORO = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_S = r"[\p{S}&&[^~]]"

_PRE_REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
    "gpt2": [_GPT2],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
    "qwen35": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"],
    "starcoder": [r"\p{N}", _GPT2],
    "deepseek-llm": ["[\r\n]", r"\s?[" + _DEEPSEEK_LETTERS + "]+",
                     "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", r"\s+\z", _CJK, r"\p{N}+"],
    "deepseek-coder": ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"],
    "deepseek-v3": [r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}" + _S + r"]?[\p{L}\p{M}]+"
                    r"| ?[\p{P}" + _S + r"]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "gpt-4o": [r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + "+" + _CONTRACTIONS + "?"
               r"|[^\r\n\p{L}\p{N}]?" + _UPPER + "+" + _LOWER + "*" + _CONTRACTIONS + "?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "tekken": [r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + "+|[^\r\n\\p{L}\\p{N}]?" + _UPPER + "+" + _LOWER + "*"
               r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "seed-coder": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                   r"|\s+(?!\S)|\s+"],
    "bailingmoe": [r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"],
    "poro": [_PORO],
    "viking": [_PORO, r"\p{N}"],
}
# tokenizer.ggml.pre -> regex family (llama_vocab::impl::load's pre_type mapping)
_PRE_FAMILY = {
    "default": "default",
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe", "glm4", "chatglm-bpe"), "llama3"),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                     "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "exaone4", "mpt",
                     "olmo", "jais", "trillion", "granite-docling"), "gpt2"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
                     "solar-open", "grok-2"), "qwen2"),
    "qwen35": "qwen35",
    "falcon": "falcon",
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
                     "mellum2"), "starcoder"),
    "deepseek-llm": "deepseek-llm",
    "deepseek-coder": "deepseek-coder",
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), "deepseek-v3"),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), "gpt-4o"),
    "tekken": "tekken",
    "seed-coder": "seed-coder",
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), "bailingmoe"),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), "poro"),
    "viking": "viking",
}
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                  "jina-v5-nano", "tekken"}
_ADD_BOS_DEFAULT = _IGNORE_MERGES  # the same pre-tokenizers also switch add_bos on before the GGUF key
_NO_BOS = {"glm4", "chatglm-bpe"}

# ---------------------------------------------------------------------------------------------
# Special tokens llama.cpp recognises by their text when the metadata does not name them.
_DS_EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"  # DeepSeek's <｜end▁of▁sentence｜>
_AUTO_SPECIAL = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
            "_<EOT>", "[EOT]", _DS_EOS, "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
                "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
                "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", _DS_EOS, "[e~[")
# metadata key suffix -> special slot; the deprecated prefix/suffix/middle keys come last and win
_SPECIAL_KEYS = (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("eot", "eot_token_id"),
                 ("eom", "eom_token_id"), ("unk", "unknown_token_id"), ("sep", "seperator_token_id"),
                 ("pad", "padding_token_id"), ("mask", "mask_token_id"), ("fim_pre", "fim_pre_token_id"),
                 ("fim_suf", "fim_suf_token_id"), ("fim_mid", "fim_mid_token_id"),
                 ("fim_pad", "fim_pad_token_id"), ("fim_rep", "fim_rep_token_id"),
                 ("fim_sep", "fim_sep_token_id"), ("fim_pre", "prefix_token_id"),
                 ("fim_suf", "suffix_token_id"), ("fim_mid", "middle_token_id"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (printable Latin-1 bytes map to themselves)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


BYTE_CHARS = _bytes_to_unicode()
_CHAR_BYTES = {c: b for b, c in BYTE_CHARS.items()}


def _valid(strings) -> bool:
    """No lone surrogates (partial UTF-8 pieces kept by surrogateescape) in any of `strings`."""
    try:
        "".join(strings).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _as_bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


class Tokenizer:
    """Encode / decode text exactly as llama.cpp does for the same GGUF vocabulary."""

    def __init__(self, tokens: list[str], scores: list[float] | None, attrs: list[int], model: str,
                 pre: str, merges: list[str] | None, special: dict[str, int | None], flags: dict[str, bool],
                 general_name: str = ""):
        self.model = model
        self.pre = pre
        self.n_vocab = len(tokens)
        self._tokens = tokens
        self._scores = scores
        self._attrs = attrs
        self._token_to_id = {t: i for i, t in enumerate(tokens)}
        if len(self._token_to_id) != len(tokens):
            seen: dict[str, int] = {}
            for i, t in enumerate(tokens):
                if t in seen:
                    raise TpError(f"duplicate token in vocabulary: {t!r} has ids {seen[t]} and {i}")
                seen[t] = i
        self.add_bos = flags["add_bos"]
        self.add_eos = flags["add_eos"]
        self.add_space_prefix = flags["add_space_prefix"]
        self._special = special
        self._find_special_tokens()
        self.bos_id = special["bos"]
        self.eos_id = special["eos"]
        self.eot_id = special["eot"]
        self.eom_id = special["eom"]
        self.unk_id = special["unk"]
        self.pad_id = special["pad"]
        for flag, id_ in (("add_bos", self.bos_id), ("add_eos", self.eos_id)):
            if flags[flag] and id_ is None:
                raise TpError(f"tokenizer.ggml.{flag}_token is true, but its token id is not set")

        # tokenizer_st_partition's candidates: longest (in bytes) first, as llama.cpp sorts them
        specials = [i for i, a in enumerate(attrs) if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)]
        specials.sort(key=lambda i: -len(_as_bytes(tokens[i])))
        self._set_strip_attrs(general_name, specials)
        self._specials_all = [(i, tokens[i], attrs[i]) for i in specials]
        self._specials_user = [s for s in self._specials_all if not s[2] & (ATTR_CONTROL | ATTR_UNKNOWN)]

        self._pieces: dict[int, bytes] = {}
        self._byte_ids: list[int | None] | None = None
        if model == "gpt2":
            self._hf, self._phantoms = self._build_bpe(merges or [], pre)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> "Tokenizer":
        model = md.get("tokenizer.ggml.model")
        if model is None:
            raise TpError("no tokenizer in the metadata (tokenizer.ggml.model is missing)")
        if model not in ("llama", "gpt2"):
            raise TpError(f"unsupported tokenizer model {model!r:.60}")  # repr: one line whatever it holds
        tokens = md.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise TpError("tokenizer.ggml.tokens is missing, empty or not a list of strings")
        n = len(tokens)
        if not all(tokens):  # llama.cpp renames empty pieces rather than refusing the file
            tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]

        def array(key: str, kind: tuple[type, ...]) -> list | None:
            v = md.get(key)
            if v is None:
                return None
            if not isinstance(v, list) or len(v) != n:
                got = len(v) if isinstance(v, list) else type(v).__name__
                raise TpError(f"{key} has {got} entries but there are {n} tokens")
            if not all(isinstance(x, kind) and not isinstance(x, bool) for x in v):
                raise TpError(f"{key} holds values of the wrong type")
            return v

        scores = array("tokenizer.ggml.scores", (int, float))
        types = array("tokenizer.ggml.token_type", (int,))
        attrs = [ATTR_NORMAL] * n if types is None else [_TYPE_ATTR.get(t, ATTR_UNDEFINED) for t in types]

        pre = md.get("tokenizer.ggml.pre")
        merges = None
        if model == "gpt2":
            pre = "default" if pre is None else pre
            if not isinstance(pre, str) or pre not in _PRE_FAMILY:  # a list is unhashable
                raise TpError(f"unsupported pre-tokenizer {pre!r:.60}")
            merges = md.get("tokenizer.ggml.merges")
            if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
                raise TpError("tokenizer.ggml.merges is missing or not a list of strings")
            special = dict.fromkeys(("bos", "eos"), 11)  # llama.cpp's BPE defaults (from Falcon)
            flags = {"add_bos": pre in _ADD_BOS_DEFAULT, "add_eos": False, "add_space_prefix": False}
            if pre in _NO_BOS:
                special["bos"] = None
        else:
            special = {"bos": 1, "eos": 2, "unk": 0}
            flags = {"add_bos": True, "add_eos": False, "add_space_prefix": True}
        special = {slot: special.get(slot) for slot, _ in _SPECIAL_KEYS}
        for slot, v in special.items():
            if v is not None and v >= n:  # defaults that do not fit are dropped, as llama.cpp does
                special[slot] = None
        for slot, key in _SPECIAL_KEYS:
            v = md.get("tokenizer.ggml." + key)
            if v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n:
                raise TpError(f"tokenizer.ggml.{key} = {v!r} is not a token id (vocabulary of {n})")
            special[slot] = v
        for flag, key in (("add_bos", "add_bos_token"), ("add_eos", "add_eos_token"),
                          ("add_space_prefix", "add_space_prefix")):
            v = md.get("tokenizer.ggml." + key)
            if v is not None:
                if not isinstance(v, (bool, int)):
                    raise TpError(f"tokenizer.ggml.{key} = {v!r} is not a boolean")
                flags[flag] = bool(v)
        return cls(tokens, scores, attrs, model, pre or "default", merges, special, flags,
                   str(md.get("general.name", "")))

    def _find_special_tokens(self) -> None:
        """Fill unset eot/eom/fim ids and the EOG set from token texts, marking them control."""
        t2i, attrs, sp = self._token_to_id, self._attrs, self._special
        for slot, texts in _AUTO_SPECIAL.items():
            if sp[slot] is None:
                found = [t2i[t] for t in texts if t in t2i]
                if found:  # llama.cpp takes whichever its hash map yields first: we take the list order
                    sp[slot] = found[0]
                    attrs[found[0]] |= ATTR_CONTROL
        eog = {sp[s] for s in ("fim_pad", "fim_rep", "fim_sep") if sp[s] is not None}
        for t in _EOG_TEXTS:
            if t in t2i:
                eog.add(t2i[t])
                attrs[t2i[t]] |= ATTR_CONTROL
        for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss: always shown
            if t in t2i:
                attrs[t2i[t]] = ATTR_USER_DEFINED
        eog |= {sp[s] for s in ("eos", "eot", "eom") if sp[s] is not None}
        texts = {self._tokens[i] for i in eog}
        # o200k_harmony / solar-open: <|end|> ends a message, not the generation
        has_call = "<|call|>" in texts or "<|calls|>" in texts
        if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
            end = t2i["<|end|>"]
            eog.discard(end)
            attrs[end] = ATTR_USER_DEFINED
        self.eog_ids: frozenset[int] = frozenset(eog)

    def _set_strip_attrs(self, general_name: str, specials: list[int]) -> None:
        """The per-model whitespace-stripping attributes llama.cpp hard-codes."""
        name, t2i, attrs = general_name.lower(), self._token_to_id, self._attrs
        if "phi-3" in name or "phi3" in name:
            for i in [*specials, t2i.get("</s>")]:
                if i is not None:
                    attrs[i] |= ATTR_RSTRIP
            for t in ("<unk>", "<s>", "<|endoftext|>"):
                if t in t2i:
                    attrs[t2i[t]] &= ~ATTR_RSTRIP
        elif self.pre in ("jina-v2-de", "jina-v2-es", "jina-v2-code") and "<mask>" in t2i:
            attrs[t2i["<mask>"]] |= ATTR_LSTRIP

    def _build_bpe(self, merges: list[str], pre: str):
        from tokenizers import Regex
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers

        # llama.cpp merges any listed pair, even one whose parts or result are not tokens, and
        # emits a final symbol that is not a token byte by byte. HF's BPE wants every merge in
        # its vocabulary, so such strings get "phantom" ids past the vocabulary that encode()
        # expands back into llama.cpp's byte lookups. (With ignore_merges, a whole word equal to
        # a phantom string is taken as that phantom where llama.cpp would run the merges; both
        # end in the same byte lookups unless the merges segment the word differently.)
        vocab = dict(self._token_to_id) if _valid(self._tokens) else {
            t: i for t, i in self._token_to_id.items() if _valid([t])}
        # a repeated pair keeps its first rank; surrogates never occur in byte-level text
        pairs = list(dict.fromkeys((m[:cut], m[cut + 1:]) for m in merges if (cut := m.find(" ", 1)) > 0))
        if not _valid(m for pair in pairs for m in pair):
            pairs = [pair for pair in pairs if _valid(pair)]
        needed = {*BYTE_CHARS.values(), *(a for a, _ in pairs), *(b for _, b in pairs), *(a + b for a, b in pairs)}
        phantoms = dict(enumerate(sorted(needed.difference(vocab)), start=self.n_vocab))
        vocab.update((s, i) for i, s in phantoms.items())
        hf = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES))
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), "isolated") for p in _PRE_REGEXES[_PRE_FAMILY[pre]]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return hf, phantoms

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as llama_tokenize(text, add_special=add_bos, parse_special).

        add_bos adds what the model asks for (tokenizer.ggml.add_bos_token / add_eos_token),
        like llama.cpp's add_special; user-defined tokens in the text are always matched,
        control tokens only with parse_special."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # llama.cpp sees invalid UTF-8 as U+FFFD
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        out: list[int] = []
        if add_bos and self.add_bos:
            out.append(self.bos_id)
        fragments = self._partition(text, parse_special) if text else []
        if self.model == "llama":
            prev_special = True  # the first fragment gets the space prefix too
            for f in fragments:
                if isinstance(f, int):
                    out.append(f)
                    prev_special = True
                else:
                    if self.add_space_prefix and prev_special:
                        f = " " + f
                    self._spm(f.replace(" ", _SPACE), out)
                    prev_special = False
        else:
            for f in fragments:
                if isinstance(f, int):
                    out.append(f)
                else:
                    self._bpe(f, out)
        if add_bos and self.add_eos:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split special tokens out of the text (tokenizer_st_partition): one token at a time,
        longest first, each taking every occurrence in what earlier ones left as text."""
        frags: list[str | int] = [text]
        for tid, tok, attr in self._specials_all if parse_special else self._specials_user:
            if tok not in text:
                continue
            new: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    new.append(f)
                    continue
                while True:
                    at = f.find(tok)
                    if at < 0:
                        new.append(f)
                        break
                    left = f[:at].rstrip(_C_SPACES) if attr & ATTR_LSTRIP else f[:at]
                    if left:
                        new.append(left)
                    new.append(tid)
                    f = f[at + len(tok):]
                    if attr & ATTR_RSTRIP:
                        f = f.lstrip(_C_SPACES)
                    if not f:
                        break
            frags = new
        return frags

    def _spm(self, text: str, out: list[int]) -> None:
        """llm_tokenizer_spm: start from single characters and keep merging the adjacent pair
        whose concatenation is the highest-scoring token (ties: leftmost)."""
        if not text:
            return
        t2i, scores = self._token_to_id, self._scores
        sym = list(text)
        n = len(sym)
        nxt = [*range(1, n), -1]
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []

        def try_add_bigram(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            s = sym[left] + sym[right]
            tid = t2i.get(s)
            if tid is not None:
                heapq.heappush(heap, (-(scores[tid] if scores else 0.0), left, right, len(s)))

        for i in range(1, n):
            try_add_bigram(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            # stale if either side was merged since: only then can the lengths disagree
            if not sym[left] or not sym[right] or len(sym[left]) + len(sym[right]) != size:
                continue
            sym[left] += sym[right]
            sym[right] = ""
            nxt[left] = nxt[right]
            if nxt[left] >= 0:
                prv[nxt[left]] = left
            try_add_bigram(prv[left], left)
            try_add_bigram(left, nxt[left])
        i = 0
        while i != -1:
            tid = t2i.get(sym[i])
            if tid is not None:
                out.append(tid)
            else:  # only single characters can be unknown: byte fallback
                out.extend(b for b in map(self._byte_token, _as_bytes(sym[i])) if b is not None)
            i = nxt[i]

    def _byte_token(self, b: int) -> int | None:
        if self._byte_ids is None:
            t2i = self._token_to_id
            self._byte_ids = [t2i.get(f"<0x{x:02X}>", t2i.get(bytes([x]).decode("utf-8", "surrogateescape"),
                                                                   self.unk_id)) for x in range(256)]
        return self._byte_ids[b]

    def _bpe(self, text: str, out: list[int]) -> None:
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if not self._phantoms or max(ids, default=0) < self.n_vocab:
            out.extend(ids)
            return
        t2i = self._token_to_id
        for i in ids:
            if i < self.n_vocab:
                out.append(i)
                continue
            # llama.cpp looks each byte of the byte-level text up on its own; misses are dropped
            for b in _as_bytes(self._phantoms[i]):
                tid = t2i.get(bytes([b]).decode("utf-8", "surrogateescape"))
                if tid is not None:
                    out.append(tid)

    # -- decoding ---------------------------------------------------------------------------

    def token_to_piece(self, id: int, special: bool = False) -> bytes:
        """The bytes token `id` stands for (llama_token_to_piece); control and unknown tokens
        are empty unless `special`."""
        id = int(id)
        if not 0 <= id < self.n_vocab:
            raise TpError(f"token id {id} is outside the vocabulary (0..{self.n_vocab - 1})")
        attr = self._attrs[id]
        if attr & (ATTR_CONTROL | ATTR_UNKNOWN):
            return _as_bytes(self._tokens[id]) if special else b""
        piece = self._pieces.get(id)
        if piece is None:
            piece = self._pieces[id] = self._piece(id, attr)
        return piece

    def _piece(self, id: int, attr: int) -> bytes:
        text = self._tokens[id]
        if attr & ATTR_USER_DEFINED:
            return _as_bytes(text)
        if attr & ATTR_NORMAL:
            if self.model == "llama":
                return _as_bytes(text.replace(_SPACE, " "))
            out = bytearray()
            for c in text:
                b = _CHAR_BYTES.get(c)
                if b is None:  # llama_decode_text's marker for a character outside the byte alphabet
                    out += b"[UNK_BYTE_0x" + _as_bytes(c).hex().encode() + _as_bytes(text) + b"]"
                else:
                    out.append(b)
            return bytes(out)
        if attr & ATTR_BYTE:
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                return b"\0"
        return b""  # unused / undefined tokens print nothing

    def decode(self, ids: Sequence[int], *, continuation: bool = False) -> str:
        """Text of `ids` as llama_detokenize (remove_special=false, unparse_special=false),
        except that llama.cpp's clean-up of spaces before punctuation is not applied, so
        decode(encode(x)) gives x back. With add_space_prefix (SPM) the first token's leading
        space is dropped unless `continuation` says the ids follow earlier text."""
        pieces = [self.token_to_piece(i) for i in ids]
        if pieces and self.add_space_prefix and not continuation and pieces[0][:1] == b" ":
            pieces[0] = pieces[0][1:]
        return b"".join(pieces).decode("utf-8", "replace")

    def stream_decoder(self, *, continuation: bool = True) -> "StreamDecoder":
        """Incremental decode() for generated tokens; by default the ids continue a prompt, so
        nothing is stripped (llama.cpp's token-by-token output)."""
        return StreamDecoder(self, continuation)


class StreamDecoder:
    """Feed token ids one at a time; returns only complete UTF-8 text, holding back the bytes of
    a character that the next tokens finish."""

    def __init__(self, tok: Tokenizer, continuation: bool = True):
        self._tok = tok
        self._strip = tok.add_space_prefix and not continuation
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, id: int) -> str:
        piece = self._tok.token_to_piece(id)
        if self._strip:
            self._strip = False
            piece = piece[1:] if piece[:1] == b" " else piece
        return self._utf8.decode(piece)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
