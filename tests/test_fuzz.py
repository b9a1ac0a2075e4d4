"""Fuzzing the path a GGUF file takes before any weight is read (parse, tokenizer, config, plan,
tensor table): every mutated file must either pass or raise TpError with one line naming the
file. Any other exception is a crash.

The default suite runs a short fixed-seed campaign. The long one (see docs/reliability_gguf.md):
    python tests/test_fuzz.py --iterations 200000 --jobs 2 --minutes 10 --save /tmp/fuzz-crashes
Iteration i of seed s always makes the same file, so `--seed s --only i` replays a crash.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

from gguf.constants import GGUFValueType as VT

from gguf_corpus import T, address_space_limit, assemble, base_files, fields, validate
from tpruntime.errors import TpError
from tpruntime.gguf_file import GGUFFile

SEED = 20261123
# Values that break length, count, type and offset fields; the rest are drawn at random.
EXTREMES = {1: [0, 1, 0x7F, 0x80, 0xFF],
            4: [0, 1, 2, 3, 6, 8, 9, 10, 12, 13, 31, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF],
            8: [0, 1, 2, 5, 33, 2**31, 2**32, 2**32 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1]}
FLOATS = [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e38, 6e-8]
# Well-formed values of the wrong type or range, which byte mutations rarely produce.
VALUES = ["", "a\nb", "gpt2", "llama", 0, 1, 3, 2**31, 2**32 - 1, T(VT.INT32, -1), T(VT.UINT64, 2**64 - 1),
          T(VT.INT64, -2**63), T(VT.FLOAT64, 2.0), 0.0, -1.0, 0.5, float("nan"), float("inf"), True, False,
          [], [1, 2], [0] * 3, ["a", "b"], ["gpt-2"], [0.5, float("nan")], [True], T(VT.ARRAY, [], VT.STRING)]


class Fuzzer:
    def __init__(self, work: Path):
        self.path = work / "fuzz.gguf"
        self.seeds = []
        for p in base_files(work / "base").values():
            spots = [(pos, struct.calcsize(fmt)) for v in fields(p).values() for pos, fmt in v]
            self.seeds.append((p.read_bytes(), spots, GGUFFile(p)))

    def mutate(self, rng: random.Random) -> bytes:
        blob, spots, gf = rng.choice(self.seeds)
        if rng.random() < 0.25:
            return self.mutate_metadata(rng, gf)
        b = bytearray(blob)
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            op = rng.randrange(8)
            n = len(b)
            if op == 0 and n:  # bit flips
                for _ in range(rng.randint(1, 8)):
                    b[rng.randrange(n)] ^= 1 << rng.randrange(8)
            elif op == 1 and n:  # byte overwrites
                for _ in range(rng.randint(1, 8)):
                    b[rng.randrange(n)] = rng.choice((0, 0xFF, 0x7F, 0x80, 10, rng.randrange(256)))
            elif op == 2:  # truncation
                del b[rng.randrange(n + 1):]
            elif op == 3:  # insertion
                at = rng.randrange(n + 1)
                b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            elif op == 4 and n:  # deletion
                at = rng.randrange(n)
                del b[at:at + rng.randint(1, 32)]
            elif op == 5 and n > 64:  # splice: copy a chunk over another place
                a, c = rng.randrange(n - 32), rng.randrange(n - 32)
                b[c:c + 32] = b[a:a + 32]
            elif op in (6, 7):  # extreme value into a header field (counts, lengths, types, dims...)
                pos, size = rng.choice(spots)
                if pos + size <= n:
                    v = rng.choice(EXTREMES[size]) if rng.random() < 0.7 else rng.randrange(256 ** size)
                    if op == 7 and rng.random() < 0.5:  # near the old value: off-by-a-little
                        v = (int.from_bytes(b[pos:pos + size], "little") + rng.choice((-1, 1, 2, 32))) % 256 ** size
                    b[pos:pos + size] = v.to_bytes(size, "little")
            elif n > 64:  # float patterns anywhere (norm weights, float metadata)
                at = rng.randrange(n - 4) & ~3
                b[at:at + 4] = struct.pack("<f", rng.choice(FLOATS))
        return bytes(b)

    @staticmethod
    def mutate_metadata(rng: random.Random, gf: GGUFFile) -> bytes:
        """The file rebuilt with 1-3 keys given another value (of any type), dropped or repeated."""
        keys = list(gf.metadata)
        new, drop, extra = {}, [], []
        for _ in range(rng.randint(1, 3)):
            k, op = rng.choice(keys), rng.randrange(6)
            if op == 0:
                drop.append(k)
            elif op == 1:
                extra.append((k, gf.metadata[k]))
            elif op == 2:  # another key's value
                new[k] = gf.metadata[rng.choice(keys)]
            else:
                new[k] = rng.choice(VALUES)
        return assemble(gf, set=new, drop=tuple(drop), extra=extra)

    def check(self, blob: bytes) -> tuple[str, str] | None:
        """None if the file passes or fails cleanly; otherwise (kind, detail) of what went wrong."""
        self.path.unlink(missing_ok=True)  # a new inode: an old map of the file never changes
        self.path.write_bytes(blob)
        stages: list[str] = []
        try:
            validate(self.path, stages)
        except TpError as e:
            msg = str(e)
            if not msg or "\n" in msg:
                return f"{stages[-1]}: message is not one line", repr(msg[:300])
            # The tokenizer is handed metadata, not a file (see docs/reliability_gguf.md).
            if stages[-1] != "tokenizer" and str(self.path) not in msg:
                return f"{stages[-1]}: message does not name the file", msg[:300]
        except Exception as e:  # noqa: BLE001 - a crash is exactly what this looks for
            tb = traceback.extract_tb(e.__traceback__)[-1]
            return (f"{stages[-1]}: {type(e).__name__} at {Path(tb.filename).name}:{tb.lineno}",
                    f"{type(e).__name__}: {str(e)[:300]}")
        return None


def campaign(seed: int, iterations: range, budget_s: float | None = None, save: Path | None = None,
             work: Path | None = None, extra_memory_mb: int = 2048) -> dict:
    """Run iterations (each seeded by (seed, i)); returns counts, the slowest input and crashes.
    A runaway allocation is recorded as a MemoryError crash."""
    with tempfile.TemporaryDirectory() as tmp, address_space_limit(extra_memory_mb):
        fz = Fuzzer(Path(work or tmp))
        t0 = time.perf_counter()
        crashes: dict[str, tuple[str, list[int]]] = {}  # kind -> (first detail, iterations)
        slowest = (0.0, -1)
        done = 0
        for i in iterations:
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                break
            blob = fz.mutate(random.Random(f"{seed}:{i}"))
            t = time.perf_counter()
            problem = fz.check(blob)
            slowest = max(slowest, (time.perf_counter() - t, i))
            done += 1
            if problem:
                crashes.setdefault(problem[0], (problem[1], []))[1].append(i)
                if save:
                    save.mkdir(parents=True, exist_ok=True)
                    (save / f"seed{seed}-iter{i}.gguf").write_bytes(blob)
        return {"iterations": done, "seconds": time.perf_counter() - t0, "slowest": slowest,
                "crashes": crashes}


def test_fuzz_short(tmp_path):
    r = campaign(SEED, range(8000), budget_s=20.0, work=tmp_path)
    assert r["iterations"] >= 500, r
    assert not r["crashes"], "\n".join(f"{k}: {d} (seed {SEED}, iterations {its[:5]})"
                                       for k, (d, its) in r["crashes"].items())
    assert r["slowest"][0] < 1.0, r["slowest"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--iterations", type=int, default=200_000)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--only", type=int, default=None, help="replay one iteration")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=None, help="stop each job after this long")
    ap.add_argument("--save", type=Path, default=None, help="keep crashing inputs here")
    ap.add_argument("--memory-mb", type=int, default=2048, help="address space each job may add")
    a = ap.parse_args()
    if a.only is not None:
        with tempfile.TemporaryDirectory() as tmp:
            fz = Fuzzer(Path(tmp))
            blob = fz.mutate(random.Random(f"{a.seed}:{a.only}"))
            print(fz.check(blob) or "no crash")
            if a.save:
                a.save.mkdir(parents=True, exist_ok=True)
                (a.save / f"seed{a.seed}-iter{a.only}.gguf").write_bytes(blob)
        return 0
    budget = a.minutes * 60 if a.minutes else None
    stop = a.start + a.iterations
    # Job j takes iterations start+j, start+j+jobs, ...: the union is the same whatever --jobs.
    parts = [range(a.start + j, stop, a.jobs) for j in range(a.jobs)]
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(a.jobs) as ex:
        n = a.jobs
        results = list(ex.map(campaign, [a.seed] * n, parts, [budget] * n, [a.save] * n, [None] * n,
                              [a.memory_mb] * n))
    crashes: dict[str, tuple[str, list[int]]] = {}
    for r in results:
        for k, (d, its) in r["crashes"].items():
            crashes.setdefault(k, (d, []))[1].extend(its)
    done = sum(r["iterations"] for r in results)
    slow_t, slow_i = max(r["slowest"] for r in results)
    print(f"seed {a.seed}: {done} iterations in {max(r['seconds'] for r in results):.0f} s "
          f"({a.jobs} jobs); slowest input {slow_t * 1000:.0f} ms (iteration {slow_i}); "
          f"{len(crashes)} kinds of crash")
    for k, (d, its) in sorted(crashes.items()):
        print(f"  {k}: {len(its)} inputs, e.g. iterations {sorted(its)[:5]}\n    {d}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
