"""The decoder: embedding, a loop over shared blocks, norm, vocabulary head.

Built from a GGUF file, the architecture's config, and this rank's shard of the plan.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from tqdm import tqdm

from .comm import Comm
from .config import ModelConfig
from .errors import TpError
from .gguf_file import GGUFFile
from .kv_cache import KVCache
from .layers import DecoderBlock, Rope, rms_norm
from .loader import load_raw_rows, load_tensor
from .models import model_config
from .plan import RankShard, make_plan
from .quants import dequantize
from .tensors import dense_tensor_table, resolve

Trace = Callable[[str, int, torch.Tensor], None]


class Transformer:
    def __init__(self, gf: GGUFFile, cfg: ModelConfig, shard: RankShard, comm: Comm, *,
                 n_ctx: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 progress: bool = True):
        self.cfg, self.shard, self.comm = cfg, shard, comm
        self.device, self.dtype, self.n_ctx = torch.device(device), dtype, n_ctx
        self.trace: Trace | None = None
        specs = dense_tensor_table(cfg)
        sources = resolve(gf, specs)  # fails on a bad file before any weight is read

        glob: dict[str, torch.Tensor] = {}
        layer_w: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        for spec in tqdm(specs, desc="loading", unit="tensor", disable=not progress, leave=False):
            src = sources[spec.name]
            if src is None or spec.name == "token_embd.weight":
                continue  # the embedding stays quantized: rows are dequantized on lookup
            t = load_tensor(gf, src, shard.slice_of(spec, cfg), self.device, dtype)
            (layer_w[spec.layer] if spec.layer is not None else glob)[spec.attr] = t

        embd = gf.tensor("token_embd.weight")
        self.token_embd = load_raw_rows(gf, embd.name, self.device)
        self.token_embd_type = embd.ggml_type
        self.output_norm = glob["output_norm"].float()
        self.output = glob["output"]
        freq_factors = glob.get("rope_freqs")

        ropes: dict[tuple[float, float], Rope] = {}
        self.blocks = []
        for il, ls in enumerate(shard.layers):
            key = (cfg.layer_rope_base(il), cfg.layer_rope_freq_scale(il))
            if key not in ropes:
                ropes[key] = Rope(cfg.rope_dim, key[0], key[1], cfg.rope_neox, n_ctx, self.device,
                                  freq_factors)
            self.blocks.append(DecoderBlock(layer_w[il], cfg, il, len(ls.q_heads), len(ls.kv_heads),
                                            ropes[key], comm))
        self.cache = KVCache([len(ls.kv_heads) for ls in shard.layers], n_ctx, cfg.head_dim,
                             cfg.head_dim_v, self.device, dtype)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.token_embd[tokens].reshape(-1)
        h = dequantize(rows, self.token_embd_type, (tokens.shape[0], self.cfg.n_embd))
        return h * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else h

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos0: int, all_logits: bool = False) -> torch.Tensor:
        """Run tokens at positions pos0 .. pos0 + T - 1 through the model, filling the KV cache.

        Returns float32 logits over the whole vocabulary: [T, n_vocab] or, by default, only
        the last position's [1, n_vocab].
        """
        T = tokens.shape[0]
        if pos0 + T > self.n_ctx:
            raise ValueError(f"positions {pos0}..{pos0 + T} exceed the context of {self.n_ctx}")
        h = self.embed(tokens.to(self.device))
        for blk in self.blocks:
            h = blk(h, pos0, self.cache, self.trace)
        if not all_logits:
            h = h[-1:]
        h = rms_norm(h, self.output_norm, self.cfg.norm_eps)
        logits = torch.nn.functional.linear(h.to(self.dtype), self.output).float()
        return self.comm.gather_vocab(logits)


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TpError(f"--device {device!r}: expected cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TpError("--device cuda: no CUDA device is available (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise TpError(f"--device {device!r}: expected cpu or cuda")
    return dev


def load_model(path: str, *, n_ctx: int = 4096, device: str = "cpu", dtype: str = "auto",
               progress: bool = True) -> Transformer:
    """Open, validate and load a GGUF model for one rank owning everything.

    n_ctx 0 means the model's training context; dtype auto is f32 on CPU, bf16 on CUDA.
    """
    gf = GGUFFile(path)
    cfg = model_config(gf)
    dev = resolve_device(device)
    if dtype == "auto":
        dtype = "f32" if dev.type == "cpu" else "bf16"
    if dtype not in DTYPES:
        raise TpError(f"--dtype {dtype!r}: expected one of auto, {', '.join(DTYPES)}")
    if n_ctx < 0:
        raise TpError(f"-c {n_ctx}: the context size must be >= 0")
    n_ctx = n_ctx or cfg.n_ctx_train
    shard = make_plan(cfg, world_size=1)[0]
    return Transformer(gf, cfg, shard, Comm(), n_ctx=n_ctx, device=dev, dtype=DTYPES[dtype],
                       progress=progress)
