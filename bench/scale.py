"""Section 7 of bench/run.py: an ImageNet-sized cache, 1,281,167 x 1000 logits, in float16, int8,
top-32 and top-8: bytes per sample, write throughput, and the memory training from it takes.

Writing: the four stores in one pass (bench/synthetic.py's LogitBank: every batch drawn once and
encoded for each store; each store's writer thread compresses while the next batch is drawn),
laid out and recorded as a dump writes them. float16 is 2.56 GB before compression.

Memory: per encoding, a fresh process (`python bench/scale.py --child STORE`) builds a student
(cnn_tiny, 1000 classes, SGD) and one batch of 256 random 3x32x32 images, takes one CE step (so
autograd's buffers exist), records its RSS and resets its peak (/proc/self/clear_refs), then
opens the cache's train targets (`open_cache(path)["train"]`: every table loaded as stored) and
trains 50 steps with KD against targets gathered for random batches (soft_target, or
soft_target_topk for top-k). Reported: peak RSS minus the RSS before opening (what the targets
cost the training process beyond the model and images), next to the tables' nbytes.
Target (figure 7): top-32 stays under 2 GB beyond the model and images.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # synthetic.py, when run as a script

import torch  # noqa: E402

from kdcache import store as stores  # noqa: E402
from kdcache.encodings import LogitCodec  # noqa: E402
from synthetic import LogitBank, write_logit_stores  # noqa: E402
from timing import Figure  # noqa: E402

ROWS = 1_281_167  # ImageNet-1k's train split
CLASSES = 1000
ENCODINGS = {
    "float16": LogitCodec("float16", None, CLASSES),
    "int8": LogitCodec("int8", None, CLASSES),
    "top-32": LogitCodec("float16", 32, CLASSES),
    "top-8": LogitCodec("float16", 8, CLASSES),
}
STEPS, BATCH, STUDENT = 50, 256, "cnn_tiny"  # a tiny student: the memory is the targets', not the model's
LIMIT = 2e9  # bytes of RSS beyond the model and images that top-32 must stay under


def bench_scale(work: str, keep: bool = False, rows: int = ROWS) -> tuple[list[Figure], list[str]]:
    paths = {enc: os.path.join(work, f"scale-{enc}.zarr") for enc in ENCODINGS}
    start = time.perf_counter()
    write_logit_stores({paths[e]: c for e, c in ENCODINGS.items()}, LogitBank(CLASSES), rows)
    write_s = time.perf_counter() - start
    lines = [f"   {rows:,} x {CLASSES} logits (bench/synthetic.py), the four stores written in one pass in {write_s:.0f} s "
             f"({rows / write_s:,.0f} samples/s for all four); memory: a fresh process each, {STEPS} KD steps of "
             f"{STUDENT}, batch {BATCH}",
             f"   {'encoding':<10}{'B/sample':>9}{'on disk':>9}{'tables in RAM':>15}{'peak RSS beyond':>17}"
             f"{'load s':>8}{'ms/step':>9}"]
    results = {}
    try:
        for enc, path in paths.items():
            with stores.open_store(path) as store:
                disk = sum(store.stored_bytes(f"train/{a}") for a in store.array_names("train") if a != "labels") / rows
            child = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path,
                                    "--threads", str(torch.get_num_threads())],
                                   capture_output=True, text=True)
            if child.returncode != 0:
                lines.append(f"   {enc:<10} child failed: {child.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(child.stdout.strip().splitlines()[-1])
            results[enc] = r
            lines.append(f"   {enc:<10}{ENCODINGS[enc].bytes_per_view():>9,}{disk:>9,.1f}{r['nbytes'] / 1e6:>12,.0f} MB"
                         f"{r['peak_beyond'] / 1e6:>14,.0f} MB{r['load_s']:>8.1f}{1000 * r['step_s']:>9.1f}")
    finally:
        if not keep:
            for path in paths.values():
                stores.remove_store(path)
    figures = []
    if "top-32" in results:
        r = results["top-32"]
        figures.append(Figure("7", f"top-32, {rows / 1e6:.2f}M x {CLASSES}: training RSS beyond model and images",
                              r["peak_beyond"] / 1e9, None, LIMIT / 1e9, f"< {LIMIT / 1e9:.0f} GB", unit=" GB",
                              fmt=".2f", at_most=True,
                              note=f"tables {r['nbytes'] / 1e6:,.0f} MB; peak RSS {r['peak'] / 1e9:.2f} GB, "
                                   f"{r['before'] / 1e9:.2f} GB before opening the cache (python, torch, student, images)"))
    return figures, lines


# --- the child: one encoding's training process ---------------------------------------------------

def _status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(path: str) -> dict:
    import torch.nn.functional as F

    from kdcache import losses
    from kdcache.encodings import TopK
    from kdcache.models import create_model
    from kdcache.targets import open_cache

    torch.manual_seed(0)
    model = create_model(STUDENT, num_classes=CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = torch.randn(BATCH, 3, 32, 32)

    def step(loss_of):
        loss = loss_of(model(images))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(lambda out: F.cross_entropy(out, torch.zeros(BATCH, dtype=torch.int64)))  # allocates the step's buffers
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # peak RSS (VmHWM) := RSS now
        f.write("5")
    start = time.perf_counter()
    targets = open_cache(path)["train"]
    load_s = time.perf_counter() - start
    n = len(targets)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(STEPS):
        rows = torch.randint(0, n, (BATCH,), generator=g)
        got = targets[rows]["logits"]
        y = targets.labels[rows]

        def loss_of(out):
            kd = losses.soft_target_topk(out, got) if isinstance(got, TopK) else losses.soft_target(out, got)
            return 0.1 * F.cross_entropy(out, y) + 0.9 * kd

        step(loss_of)
    step_s = (time.perf_counter() - start) / STEPS
    peak = _status("VmHWM")
    return {"before": before, "peak": peak, "peak_beyond": peak - before, "nbytes": targets.nbytes,
            "load_s": load_s, "step_s": step_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="one encoding's training process (run by bench/run.py)")
    parser.add_argument("--child", required=True, help="the store to train from")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(child(args.child)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
