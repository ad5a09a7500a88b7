"""Section 5 of bench/run.py: what each logit encoding costs on disk and to write, and what zarr's
compressors make of the logits.

Encodings: float32, float16, bfloat16, int8 (per-row affine) and top-32 / top-8 (float16 values,
uint16 indices, float32 logsumexp), in a zarr and an HDF5 store. A side is the dump's write path
after the teacher: `LogitCodec.encode` of float32 logits [256, C] (the dump's batch), the host
arrays, `BlockWriter.put`, and the store made as `dump-teacher` makes it (bench/synthetic.py):
blocks as plan_blocks cuts them, a checksum per block, the split finished. The logits are drawn
once, before timing (bench/synthetic.py: class structure, so compression is realistic). Every
encoding runs once per round, alternating; its throughput is judged against float16's on the same
backend as the median of per-round ratios.

Compressors: the float16 and int8 logits arrays written block by block (kdcache's chunks, crc32c
after the compressor as kdcache adds it) and read whole (as open_cache loads a table), with zstd
levels 1 (kdcache's, kdcache/store/zarr_store.py), 3, 9, blosc-lz4 (byte shuffle), blosc-zstd level 3 (byte shuffle, one
block per chunk) and none; ratios against kdcache's.
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np
import torch

from kdcache import store as stores
from kdcache.encodings import LogitCodec
from kdcache.store.zarr_store import ZSTD_LEVEL
from synthetic import SplitWriter, codec_specs, draw_logits, host_rows, root_attrs
from timing import alternate, paired

CLASSES = 1000  # ImageNet's: where the choice of encoding matters
ROWS = 32_768  # 131 MB of float32 logits in memory; a float16 side writes 66 MB (~1.3 s on 2 busy cores)
BATCH = 256  # dump-teacher's default batch
COMPRESSOR_ROWS = 16_384  # zstd level 9 writes ~90 MB/s, blosc-zstd ~30: a side stays under a second
ENCODINGS = {
    "float32": LogitCodec("float32", None, CLASSES),
    "float16": LogitCodec("float16", None, CLASSES),
    "bfloat16": LogitCodec("bfloat16", None, CLASSES),
    "int8": LogitCodec("int8", None, CLASSES),
    "top-32": LogitCodec("float16", 32, CLASSES),
    "top-8": LogitCodec("float16", 8, CLASSES),
}
BACKENDS = {"zarr": ".zarr", "hdf5": ".h5"}


def write_encoded(path: str, codec: LogitCodec, logits: torch.Tensor, labels: np.ndarray) -> None:
    """The dump's write path for teacher outputs `logits` [N, C] float32, batch after batch."""
    with stores.create_store(path) as store:
        store.update_attrs(root_attrs(codec))
        split = SplitWriter(store, codec_specs(codec), labels)
        for start in range(0, len(logits), BATCH):
            split.put(host_rows(codec.encode(logits[start:start + BATCH]), codec))
        split.close()
        store.update_attrs({"complete": True})


def stored_per_sample(path: str, n: int) -> float:
    """Bytes on disk of the split's logits arrays (labels left out) per sample."""
    with stores.open_store(path) as store:
        return sum(store.stored_bytes(f"train/{a}") for a in store.array_names("train") if a != "labels") / n


def bench_encodings(work: str, rounds: int, rows: int = ROWS) -> tuple[list[str], dict]:
    logits, labels = draw_logits(rows, CLASSES, seed=0)
    labels = labels.numpy()
    paths = {(enc, be): os.path.join(work, f"enc-{enc}{suffix}") for enc in ENCODINGS for be, suffix in BACKENDS.items()}
    sides = {f"{enc}|{be}": (lambda p=path, c=ENCODINGS[enc]: write_encoded(p, c, logits, labels))
             for (enc, be), path in paths.items()}
    times = alternate(sides, rounds)
    disk = {key: stored_per_sample(path, rows) for key, path in paths.items()}
    for path in paths.values():
        stores.remove_store(path)
    t = {k: v for k, v in times.items()}

    def side(enc, be):
        return t[f"{enc}|{be}"]

    lines = [f"   {rows:,} x {CLASSES} logits, encoded per batch of {BATCH} and written as a dump writes; "
             f"{rounds} rounds; write rate: best round; 'vs float16': median of per-round rate ratios, same backend",
             f"   {'encoding':<10}{'B/sample':>9}{'zarr disk':>11}{'hdf5 disk':>11}{'zarr write/s':>14}{'vs fp16':>9}"
             f"{'hdf5 write/s':>14}{'vs fp16':>9}{'hdf5/zarr':>11}"]
    summary = {}
    for enc, codec in ENCODINGS.items():
        cells = []
        for be in BACKENDS:
            runs = {"x": side(enc, be), "ref": side("float16", be)}
            cells.append((rows / min(runs["x"]), paired(runs, lambda x, ref: ref / x)))
        h5_vs_zarr = paired({"z": side(enc, "zarr"), "h": side(enc, "hdf5")}, lambda z, h: z / h)
        summary[enc] = dict(bytes=codec.bytes_per_view(), zarr_disk=disk[(enc, "zarr")], hdf5_disk=disk[(enc, "hdf5")],
                            zarr_rate=cells[0][0], zarr_vs_fp16=cells[0][1], hdf5_rate=cells[1][0],
                            hdf5_vs_fp16=cells[1][1])
        lines.append(f"   {enc:<10}{codec.bytes_per_view():>9,}{disk[(enc, 'zarr')]:>11,.1f}{disk[(enc, 'hdf5')]:>11,.1f}"
                     f"{cells[0][0]:>14,.0f}{cells[0][1]:>9.2f}{cells[1][0]:>14,.0f}{cells[1][1]:>9.2f}{h5_vs_zarr:>11.2f}")
    return lines, summary


# --- compressors -----------------------------------------------------------------------------------

REF = f"zstd-{ZSTD_LEVEL}"  # the store's compressor, the reference of every ratio


def compressors() -> dict:
    import numcodecs.blosc
    from zarr.codecs import BloscCodec, ZstdCodec

    numcodecs.blosc.set_nthreads(1)  # one thread per chunk, as zstd runs (zarr spreads chunks over threads)

    return {
        "zstd-1": [ZstdCodec(level=1)],
        "zstd-3": [ZstdCodec(level=3)],
        "zstd-9": [ZstdCodec(level=9)],
        "blosc-lz4": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
        # the question behind the others: zstd finds no repeats in logits at any level, only skewed
        # bytes (sign and exponent), which its entropy coder sees better once byte-shuffled apart;
        # with blosc's own blocks (~32 KiB at clevel 3) the gain is lost, with one block per chunk it is ~9%
        "blosc-zstd-3-shuf": [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", blocksize=stores.CHUNK_BYTES)],
        "none": [],
    }


def write_array(path: str, values: np.ndarray, chunk: int, codecs: list) -> None:
    """A zarr v3 array as kdcache lays out logits: `chunk`-row chunks, written a block (= chunk) at a time."""
    import zarr
    from zarr.codecs import Crc32cCodec

    if os.path.exists(path):
        shutil.rmtree(path)
    a = zarr.create_array(store=path, shape=values.shape, dtype=values.dtype, chunks=(chunk, *values.shape[1:]),
                          fill_value=0, compressors=[*codecs, Crc32cCodec()])
    for start in range(0, len(values), chunk):
        a[start:start + chunk] = values[start:start + chunk]


def read_array(path: str) -> float:
    import zarr

    start = time.perf_counter()
    zarr.open_array(path, mode="r")[...]
    return time.perf_counter() - start


def bench_compressors(work: str, rounds: int, rows: int = COMPRESSOR_ROWS) -> tuple[list[str], dict]:
    logits = draw_logits(rows, CLASSES, seed=1)[0]
    arrays = {"float16": host_rows(ENCODINGS["float16"].encode(logits), ENCODINGS["float16"])["logits"],
              "int8": host_rows(ENCODINGS["int8"].encode(logits), ENCODINGS["int8"])["logits"]}
    comps = compressors()
    lines = [f"   zarr compressors, {rows:,} x {CLASSES} logits arrays (kdcache's chunks, + crc32c), written block by "
             f"block, read whole; {rounds} rounds; MB/s of uncompressed data, best round; 'vs ref': median of "
             f"per-round ratios against {REF}, the store's",
             f"   {'array':<9}{'compressor':<18}{'B/sample':>10}{'vs ref':>10}{'write MB/s':>12}{'vs ref':>10}"
             f"{'read MB/s':>11}{'vs ref':>10}"]
    result = {}
    for name, values in arrays.items():
        chunk = stores.chunk_rows(values[0].nbytes, rows)
        paths = {c: os.path.join(work, f"comp-{name}-{c}.zarr") for c in comps}
        sides = {}
        for c, codecs in comps.items():
            sides[f"w|{c}"] = lambda p=paths[c], codecs=codecs: write_array(p, values, chunk, codecs)
            sides[f"r|{c}"] = lambda p=paths[c]: read_array(p)
        for c, codecs in comps.items():  # the read sides need the arrays from the first round on
            write_array(paths[c], values, chunk, codecs)
        times = alternate(sides, rounds)
        size = {c: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs
                       if f != "zarr.json") / rows for c, p in paths.items()}
        mb = values.nbytes / 1e6
        for c in comps:
            w = {"x": times[f"w|{c}"], "ref": times[f"w|{REF}"]}
            r = {"x": times[f"r|{c}"], "ref": times[f"r|{REF}"]}
            row = dict(bytes=size[c], write=mb / min(w["x"]), write_vs=paired(w, lambda x, ref: ref / x),
                       read=mb / min(r["x"]), read_vs=paired(r, lambda x, ref: ref / x))
            result[(name, c)] = row
            lines.append(f"   {name:<9}{c:<18}{size[c]:>10,.1f}{size[c] / size[REF]:>10.3f}{row['write']:>12,.0f}"
                         f"{row['write_vs']:>10.2f}{row['read']:>11,.0f}{row['read_vs']:>10.2f}")
        for p in paths.values():
            shutil.rmtree(p)
    lines.append("   " + verdict(result, list(arrays)))
    return lines, result


def verdict(result: dict, arrays: list) -> str:
    """Does the measurement support the store's compressor (REF), array by array? Not where another compressor
    stores the array in at most 1% more bytes and writes it at least 10% faster (reads no slower),
    nor where one saves at least 3% of the bytes and writes at most 10% slower."""
    verdicts = []
    for a in arrays:
        ref, better = result[(a, REF)], []
        for (name, c), r in sorted(result.items()):
            if name != a or c == REF:
                continue
            if r["bytes"] <= 1.01 * ref["bytes"] and r["write_vs"] >= 1.1 and r["read_vs"] >= 0.95:
                better.append(f"{c} is as small ({r['bytes'] / ref['bytes']:.3f}x) and writes {r['write_vs']:.2f}x faster")
            elif r["bytes"] <= 0.97 * ref["bytes"] and r["write_vs"] >= 0.9:
                better.append(f"{c} is {1 - r['bytes'] / ref['bytes']:.0%} smaller, writes at {r['write_vs']:.2f}x")
        verdicts.append(f"{a}: " + ("NOT supported: " + "; ".join(better) if better else
                                    "supported (nothing here as small and faster, or smaller as fast)"))
    return f"{REF}, kdcache's choice: " + " | ".join(verdicts)
