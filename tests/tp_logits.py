"""Worker for test_tp.py, run under torchrun: rank 0 writes the logits of a prefill (every
position) to an .npy file, so tests can compare runs at different world sizes."""

import argparse

import numpy as np

from tpruntime.engine import open_engine
from tpruntime.generate import prefill
from tpruntime.plan import PlanOptions

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("out")
ap.add_argument("--prompt", required=True, help="comma-separated token ids")
ap.add_argument("--reduce-type", default="f32")
ap.add_argument("--split-mode", default="graph")
ap.add_argument("--max-gpu", type=int, default=None)
ap.add_argument("--tensor-split", default=None)
ap.add_argument("-ub", type=int, default=7)
a = ap.parse_args()

ts = tuple(float(x) for x in a.tensor_split.split(",")) if a.tensor_split else None
engine = open_engine(a.model, n_ctx=64, device="cpu", dtype="f32", n_ubatch=a.ub, progress=False,
                     options=PlanOptions(split_mode=a.split_mode, max_gpu=a.max_gpu, tensor_split=ts),
                     reduce_type=a.reduce_type)
if engine.comm.rank == 0:
    logits = prefill(engine, [int(x) for x in a.prompt.split(",")], a.ub, all_logits=True)
    np.save(a.out, logits.numpy())
    engine.stop()
else:
    engine.follow()
engine.close()
