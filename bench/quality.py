"""Section 8 of bench/run.py: does a student learn as much from compact targets as from float16?

On `digit-pairs` (100 classes with real structure: pairs that share a digit look alike, and the
swapped pair most of all), a teacher is trained with `kdcache.train_student` and dumped with
`kdcache.dump_teacher` once per encoding (float16, int8, top-32, top-8: the route users take,
`dump-teacher --topk K`), and the float16 store is also re-encoded to top-32 with `kdcache convert`
(`top-32 cv`), which must give the same targets. The same
student is then trained from each cache with the same seed (same init, same data order), for each
seed; KD settings are train-student's defaults (soft_target, T 4, alpha 0.9; top-k: the sparse
K + 1 bin reconstruction), or another temperature (`--kd-temperature`): at T != 1 top-k targets
must guess how the tail's mass tempers (losses.soft_target_topk; the sparse form packs it at the
K-th logit, a sharper teacher than the real one), so T matters; at T = 1 they are exact.
Also dumped: top-32 and top-8 with bit-packed indices and uint8 log-probability codes (`u8p`:
`--topk K --dtype uint8 --topk-indices packed`) and 12 sampled classes per sample (`--sample 12`,
drawn at the KD temperature: random-sampling KD, an unbiased loss).
Reported: the student's test top-1 per encoding and its difference to float16's, seed by seed.
Figure 8: top-32 - float16, mean over seeds, target >= -0.5 points.
Figure 8b: top-32 u8p (84 B/sample at 1,000 classes) - float16, target >= -0.3 points.
Figure 8c: `convert --budget --rank student` on a grid of budgets (each trained encoding's measured
bytes): the student top-1 of what it picks (kdcache.probe: one 1-epoch probe run per candidate from
the float16 store, seed 1000, not the students' seeds) against the best trained encoding within the
same budget; the largest shortfall, target <= 0.2 points. The default --rank fidelity's picks are
shown beside it.
On 2 CPU cores the teacher takes ~2 minutes and each student ~20 s.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import time

from kdcache import dump_teacher, fidelity, train_student
from kdcache.convert import convert_store
from kdcache.probe import probe_candidates
from kdcache.report import describe_store
from timing import Figure

DATASET = "digit-pairs"  # 20,000 train and 4,000 test pairs: one test error is 0.025 points
TEACHER, TEACHER_EPOCHS = "cnn_small", 3  # 4 epochs gave 96% top-1 in 220 s on 2 busy cores; 3 save a minute
STUDENT, STUDENT_EPOCHS = "cnn_tiny", 2  # the smallest student: where the teacher's targets matter most
SEEDS = (0, 1)  # the students' seeds; each encoding is trained with every one
ENCODINGS = {"float16": {}, "int8": dict(dtype="int8"), "top-32": dict(topk=32), "top-8": dict(topk=8),
             "top-32 cv": dict(topk=32, convert=True),  # cv: converted from the float16 dump
             "top-32 u8p": dict(topk=32, dtype="uint8", topk_indices="packed"),
             "top-8 u8p": dict(topk=8, dtype="uint8", topk_indices="packed"),
             "sampled 12": dict(sample=12, topk_indices="packed")}  # drawn at the KD temperature
CANDIDATES = {"float16": "float16", "int8": "int8", "top-32": "top32-float16", "top-8": "top8-float16",
              "top-32 u8p": "top32-uint8-packed", "top-8 u8p": "top8-uint8-packed",
              "sampled 12": "sample12-float16-packed"}  # the budget grid's: kdcache.fidelity names
TOLERANCE = 0.5  # points of top-1 that top-32 may lose against float16
COMPACT_TOLERANCE = 0.3  # points that the <= 100 B/sample encoding (top-32 u8p) may lose against float16
BUDGET_TOLERANCE = 0.2  # points that --budget's pick may fall short of the best encoding within its budget


def bench_quality(work: str, seeds=SEEDS, dataset: str = DATASET, teacher_epochs: int = TEACHER_EPOCHS,
                  student_epochs: int = STUDENT_EPOCHS, temperature: float | None = None) -> tuple[list[Figure], list[str]]:
    folder = os.path.join(work, "quality")
    os.makedirs(folder, exist_ok=True)
    log = os.path.join(folder, "log.txt")
    started = time.perf_counter()
    with open(log, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        teacher_rows = train_student(students=[TEACHER], dataset=dataset, epochs=teacher_epochs, seed=0,
                                     out=os.path.join(folder, "teacher"))
    teacher = os.path.join(folder, "teacher", TEACHER, "model.pt")
    teacher_s = time.perf_counter() - started

    caches, made_by = {}, {}
    with open(log, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        caches["float16"] = dump_teacher(teacher=teacher, dataset=dataset, out=os.path.join(folder, "float16.zarr"))
        made_by["float16"] = "dump"
        for enc, options in ENCODINGS.items():
            if enc == "float16":
                continue
            path = os.path.join(folder, f"{enc.replace(' ', '-')}.zarr")
            options = dict(options)
            if "sample" in options:  # sampled targets train only at the temperature they were drawn at
                options["sample_temperature"] = temperature or 4.0
            if options.pop("convert", False):
                caches[enc] = convert_store(caches["float16"], path, dtype=options.get("dtype"), topk=options.get("topk"))
                made_by[enc] = "convert"
            else:
                caches[enc] = dump_teacher(teacher=teacher, dataset=dataset, out=path, **options)
                made_by[enc] = "dump"
    sizes = {enc: describe_store(path)["splits"]["train"] for enc, path in caches.items()}

    kd = {} if temperature is None else {"temperature": temperature}  # None: train-student's default
    top1: dict = {enc: {} for enc in ENCODINGS}
    failed = {}
    for seed in seeds:
        for enc, path in caches.items():
            if enc in failed:
                continue
            try:
                with open(log, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                    rows = train_student(students=[STUDENT], dataset=dataset, epochs=student_epochs, seed=seed,
                                         cache=path, out=os.path.join(folder, "students", enc, str(seed)), **kd)
                top1[enc][seed] = rows[0]["top1"]
            except Exception as e:  # training from compact caches is new: report, and go on with the others
                failed[enc] = f"{type(e).__name__}: {e}"

    lines = [f"   {dataset}: teacher {TEACHER} ({teacher_epochs} epochs, {teacher_s:.0f} s) test top-1 "
             f"{teacher_rows[0]['top1']:.2f}; student {STUDENT}, {student_epochs} epochs from each cache, KD temperature "
             f"{temperature or 'default (4)'}, seeds {', '.join(map(str, seeds))}; log {log} (kept with --keep)",
             f"   {'targets':<12}{'made by':<9}{'B/sample':>9}{'on disk':>9}  {'top-1 per seed':<22}{'mean':>7}"
             f"{'vs float16, per seed':>24}{'mean':>8}"]
    diffs = {}
    for enc in ENCODINGS:
        if enc in failed:
            lines.append(f"   {enc:<12}{made_by.get(enc, '-'):<9} training failed: {failed[enc]}")
            continue
        s = sizes[enc]
        logits_bytes = sum(a["bytes_per_sample"] for k, a in s["arrays"].items() if k != "labels")
        disk = sum(a["stored_bytes"] for k, a in s["arrays"].items() if k != "labels") / s["arrays"]["labels"]["shape"][0]
        ours = [top1[enc][seed] for seed in seeds]
        paired_diffs = [top1[enc][seed] - top1["float16"][seed] for seed in seeds] if "float16" not in failed else []
        diffs[enc] = paired_diffs
        diff_cells = " / ".join(f"{d:+.2f}" for d in paired_diffs) if enc != "float16" else ""
        mean_diff = f"{statistics.mean(paired_diffs):+.2f}" if paired_diffs and enc != "float16" else ""
        lines.append(f"   {enc:<12}{made_by[enc]:<9}{logits_bytes:>9,}{disk:>9,.1f}  "
                     f"{' / '.join(f'{v:.2f}' for v in ours):<22}{statistics.mean(ours):>7.2f}{diff_cells:>24}{mean_diff:>8}")
    figures = []
    if diffs.get("top-32 u8p"):
        d = diffs["top-32 u8p"]
        figures.append(Figure("8b", "KD quality: top-32 u8p - float16, student top-1", statistics.mean(d), None,
                              -COMPACT_TOLERANCE, f">= -{COMPACT_TOLERANCE} points", unit=" pt", fmt="+.2f",
                              note=f"paired differences {' / '.join(f'{v:+.2f}' for v in d)} (seeds {', '.join(map(str, seeds))}); "
                                   f"float16 top-1 spread over seeds {_spread(top1['float16'], seeds)}"))
    grid_lines, shortfall = _budget_grid(caches["float16"], top1, failed, seeds, temperature or 4.0)
    lines += grid_lines
    if shortfall is not None:
        figures.append(Figure("8c", "convert --budget --rank student: best in budget - its pick", shortfall, None,
                              BUDGET_TOLERANCE, f"<= {BUDGET_TOLERANCE} points", unit=" pt", fmt="+.2f", at_most=True,
                              note="largest shortfall over the grid of budgets above"))
    if diffs.get("top-32"):
        d = diffs["top-32"]
        figures.append(Figure("8", "KD quality: top-32 - float16 targets, student top-1", statistics.mean(d), None,
                              -TOLERANCE, f">= -{TOLERANCE} points", unit=" pt", fmt="+.2f",
                              note=f"mean over seeds {', '.join(map(str, seeds))} of paired differences "
                                   f"({' / '.join(f'{v:+.2f}' for v in d)}); {STUDENT} on {dataset}, teacher {TEACHER}, T {temperature or 4}"))
    return figures, lines


def _spread(values: dict, seeds) -> str:
    v = [values[s] for s in seeds if s in values]
    return f"{max(v) - min(v):.2f} points" if len(v) > 1 else "- (one seed)"


def _budget_grid(float16_store: str, top1: dict, failed: dict, seeds, temperature: float) -> tuple[list[str], float | None]:
    """What --budget picks at each trained encoding's measured bytes, ranked by fidelity and by probe
    students (--rank student), and each pick's shortfall in student top-1 against the best trained
    encoding within that budget (mean over seeds); returns the probe-ranked pick's largest shortfall."""
    trained = {enc: name for enc, name in CANDIDATES.items() if enc not in failed and len(top1[enc]) == len(seeds)}
    if not trained:
        return [], None
    report = fidelity.measure(float16_store, candidates=list(trained.values()), temperature=temperature)
    started = time.perf_counter()
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        probed = probe_candidates(float16_store, json.loads(json.dumps(report)))  # every candidate, once
    probe_s = time.perf_counter() - started
    measured = {e["name"]: e for e in report["candidates"]}
    probes = {e["name"]: e["probe_top1"] for e in probed["candidates"]}
    score = {name: statistics.mean(top1[enc].values()) for enc, name in trained.items()}
    p = probed["probe"]
    lines = [f"   --budget on the float16 store's fidelity report ({report['samples']:,} samples, T {temperature:g}); "
             f"--rank student: probe {p['student']}, {p['epochs']} epoch, seed {p['seed']}, {probe_s:.0f} s for "
             f"{len(probes)} candidates",
             f"   {'budget':>10}  {'best within budget':<22}{'top-1':>7}  {'--rank fidelity picks':<22}{'short':>7}"
             f"  {'--rank student picks':<22}{'probe':>7}{'short':>7}  {'per seed':<16}"]
    enc_of = {name: enc for enc, name in trained.items()}
    worst, worst_fidelity = 0.0, 0.0
    for budget in sorted({e["bytes_per_sample"] for e in measured.values()}):
        by_fidelity, _ = fidelity.choose(report, budget)
        by_student, _ = fidelity.choose(probed, budget)
        best = max((n for n, e in measured.items() if e["bytes_per_sample"] <= budget), key=score.get)
        short_f, short_s = score[best] - score[by_fidelity["name"]], score[best] - score[by_student["name"]]
        worst, worst_fidelity = max(worst, short_s), max(worst_fidelity, short_f)
        paired = [top1[enc_of[best]][seed] - top1[enc_of[by_student["name"]]][seed] for seed in seeds]
        lines.append(f"   {budget:>8,.1f} B  {best:<22}{score[best]:>7.2f}  {by_fidelity['name']:<22}{short_f:>+7.2f}"
                     f"  {by_student['name']:<22}{probes[by_student['name']]:>7.2f}{short_s:>+7.2f}  "
                     f"{' / '.join(f'{d:+.2f}' for d in paired):<16}")
    lines.append(f"   largest shortfall: --rank fidelity {worst_fidelity:+.2f}, --rank student {worst:+.2f} points; per seed: "
                 f"the shortfall of --rank student's pick seed by seed (a sign change: the two are not told apart by "
                 f"{len(seeds)} seeds)")
    return lines, worst
