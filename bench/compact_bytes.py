"""Section 10 of bench/run.py: how small the compact encodings are at 1,000 classes, and what they keep.

1,000-class synthetic teacher logits with class structure (bench/synthetic.py), written once per
encoding the way dump-teacher writes them (LogitCodec.encode per batch of 256, BlockWriter, the
zarr store's zstd): float16, int8, top-32 and top-8 (float16 values, uint16 indices), top-32 and
top-8 with bit-packed 10-bit indices and uint8 log-probability codes, and 12 sampled classes
(random-sampling KD, float16 log q, packed indices). Bytes per sample are what the files take
(the logit arrays, labels left out). Beside them, `kdcache fidelity`'s figures for the same
encodings against the float32 logits (KL and TV at T 4, top-1 agreement: kdcache.fidelity.measure
on a sample of the store), and what `convert --budget` picks for a few budgets.
Figure 10: bytes per sample of top-32 with packed indices and uint8 values, target <= 100 B.
"""
from __future__ import annotations

import os


from kdcache import fidelity
from kdcache import store as stores
from kdcache.encodings import LogitCodec
from encoding_costs import stored_per_sample, write_encoded  # the dump's write path, as section 5 measures it
from synthetic import draw_logits
from timing import Figure

CLASSES = 1000  # ImageNet's
ROWS = 32_768  # as section 5: 131 MB of float32 logits drawn once
BATCH = 256  # dump-teacher's default batch
FIDELITY_ROWS = 2048  # kdcache fidelity's default sample
TEMPERATURE = 4.0  # train-student's default KD temperature
ENCODINGS = {  # name -> the fidelity candidate it is (fidelity.parse_candidate)
    "float16": "float16",
    "int8": "int8",
    "top-32": "top32-float16",
    "top-8": "top8-float16",
    "top-32 packed u8": "top32-uint8-packed",
    "top-8 packed u8": "top8-uint8-packed",
    "sampled 12": "sample12-float16-packed",
}
BUDGETS = ("2000B", "200B", "100B", "64B", "32B")  # per sample
TARGET = 100.0  # B/sample: the goal for an encoding at 1,000 classes


def bench_compact_bytes(work: str, rows: int = ROWS, fidelity_rows: int = FIDELITY_ROWS) -> tuple[list[Figure], list[str]]:
    logits, labels = draw_logits(rows, CLASSES, seed=0)
    labels = labels.numpy()
    codecs = {name: fidelity.parse_candidate(c, CLASSES, TEMPERATURE) for name, c in ENCODINGS.items()}
    full = os.path.join(work, "compact-full.zarr")
    write_encoded(full, LogitCodec("float32", None, CLASSES), logits, labels)
    sizes = {}
    for name, codec in codecs.items():
        path = os.path.join(work, f"compact-{name.replace(' ', '-')}.zarr")
        write_encoded(path, codec, logits, labels)
        sizes[name] = stored_per_sample(path, rows)
        stores.remove_store(path)
    report = fidelity.measure(full, candidates=list(ENCODINGS.values()), temperature=TEMPERATURE,
                              rows=min(fidelity_rows, rows))
    stores.remove_store(full)
    measured = {e["name"]: e for e in report["candidates"]}

    lines = [f"   {rows:,} x {CLASSES} synthetic logits with class structure, written as a dump writes them (zarr, zstd 1); "
             f"fidelity on {report['samples']:,} of them against float32, T {TEMPERATURE:g}",
             f"   {'encoding':<18}{'B/sample':>10}{'raw B':>8}{'vs fp16':>9}{'KL':>10}{'TV':>9}{'top-1 agree':>13}"]
    for name, codec in codecs.items():
        e = measured[ENCODINGS[name]]
        kl = "inf" if e["kl"] == float("inf") else f"{e['kl']:.4f}"
        lines.append(f"   {name:<18}{sizes[name]:>10,.1f}{codec.bytes_per_view():>8,}{sizes[name] / sizes['float16']:>8.3f}x"
                     f"{kl:>10}{e['tv']:>9.4f}{e['top1_agreement']:>12.2f}%")
    lines.append("   convert --budget (on these candidates; its bytes measured on the fidelity sample):")
    for budget in BUDGETS:
        try:
            best, _ = fidelity.choose(report, fidelity.parse_budget(budget)[0])
            lines.append(f"     {budget:>6}: {best['name']} ({best['bytes_per_sample']:,.1f} B/sample)")
        except Exception as e:  # a budget below every candidate: say so, and go on
            lines.append(f"     {budget:>6}: {e}")
    small = sizes["top-32 packed u8"]
    figures = [Figure("10", "top-32 packed u8 B/sample, 1,000 classes", small, None, TARGET,
                      f"<= {TARGET:.0f} B", unit=" B", at_most=True, judge="median", fmt=",.1f",
                      note=f"top-32 float16 {sizes['top-32']:,.1f} B, float16 {sizes['float16']:,.1f} B")]
    return figures, lines
