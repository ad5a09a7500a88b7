"""Augmentation-consistent caching on digits: does replaying the teacher's views close the gap to online KD?

Test top-1 of one student trained with the `digits` augmentation (rotation, shift, scale) and
  no KD;
  KD from a clean single-view cache while the student augments (targets made on other inputs: the
  inconsistent case, what an offline cache gives without views);
  KD from consistent caches of K = 1, 4 and 16 views per sample (`dump-teacher --views K
  --augment digits`; each epoch a student replays one stored view per sample, --view-policy random);
  online KD, the teacher run on every batch of the same augmentation (a fresh view every epoch);
and, for reference, no KD and clean-cache KD without augmentation (the demo's setting). Same
student, epochs, seeds and KD settings in every row. Then the storage and dump time of each cache.

Teacher: runs/digits/teacher/resnet20/model.pt from `kdcache run pipelines/digits.yaml` (trained
without augmentation), or, when that is absent, a resnet20 trained here the same way (8 epochs).
Caches are float16, the default. Run: `.venv/bin/python bench/views.py --threads 1` (about 10
minutes on one CPU core; the thread count changes float sums, so figures move by a sample or two
with it). Writes runs/views/ (replaced on each run) and prints markdown tables.
"""
from __future__ import annotations

import os
import statistics
import sys
import time


from kdcache import dump_teacher, train_student
from kdcache.report import describe_store

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # digits_experiment.py, run as a script
from digits_experiment import parse_args, teacher_checkpoint  # noqa: E402

AUGMENT = "digits"  # kdcache/augment.py: RandomAffine(10 degrees, 10% shift, scale 0.9-1.1), bilinear
KD = dict(alpha=0.9, temperature=4.0)  # digits.yaml's end alpha, held constant: one setting for every row
VIEWS = [1, 4, 16]


def dump(teacher: str, out: str, **views) -> tuple[str, float]:
    """A cache of the train and test splits, and the seconds the dump took."""
    started = time.perf_counter()
    path = dump_teacher(teacher=teacher, dataset="digits", out=out, **views)
    return path, time.perf_counter() - started


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "runs/views")

    teacher = teacher_checkpoint(args.out)
    caches, seconds = {}, {}
    caches["clean"], seconds["clean"] = dump(teacher, os.path.join(args.out, "clean.zarr"))
    for k in VIEWS:
        caches[k], seconds[k] = dump(teacher, os.path.join(args.out, f"views{k}.zarr"), views=k, augment=AUGMENT)

    aug = dict(augment=AUGMENT)
    variants = [  # (row, folder, options)
        ("no KD, no augmentation (reference)", "plain", {}),
        ("KD, clean cache, no augmentation (reference)", "clean", dict(cache=caches["clean"], **KD)),
        ("no KD", "plain-aug", aug),
        ("KD, clean 1-view cache, student augments (inconsistent)", "inconsistent",
         dict(cache=caches["clean"], **aug, **KD)),
        *[(f"KD, consistent cache, K = {k}", f"views{k}", dict(cache=caches[k], **KD)) for k in VIEWS],
        ("online KD, same augmentation (fresh views)", "online", dict(teacher=teacher, **aug, **KD)),
    ]
    results = {}
    for name, key, options in variants:
        top1 = []
        for seed in args.seeds:
            rows = train_student(students=[args.student], dataset="digits", epochs=args.epochs, seed=seed,
                                 out=os.path.join(args.out, "students", key, str(seed)), **options)
            top1.append(rows[0]["top1"])
        results[name] = top1

    print(f"\nstudent {args.student}, teacher {teacher}, digits, --augment {AUGMENT}, {args.epochs} epochs, "
          f"seeds {args.seeds}, alpha {KD['alpha']} constant, T {KD['temperature']}, {args.threads} thread(s)\n")
    print("| training | test top-1 (mean ± sd) | per seed |")
    print("|---|---|---|")
    for name, top1 in results.items():
        sd = statistics.stdev(top1) if len(top1) > 1 else 0.0
        print(f"| {name} | {statistics.mean(top1):.2f} ± {sd:.2f} | {' / '.join(f'{v:.2f}' for v in top1)} |")
    report = {key: describe_store(path) for key, path in caches.items()}
    print(f"| teacher (resnet20), clean test images | {report['clean']['splits']['test']['teacher_top1']:.2f} | |")

    print("\nthe caches: train split (1,437 samples) float16; dump time covers train and test (360 clean images)\n")
    print("| cache | teacher top-1 on its train views | B/sample | on disk | dump seconds |")
    print("|---|---|---|---|---|")
    for key, r in report.items():
        train = r["splits"]["train"]
        name = "clean, 1 view" if key == "clean" else f"--views {key} --augment {AUGMENT}"
        print(f"| {name} | {train['teacher_top1']:.2f} | {train['bytes_per_sample']:,} | "
              f"{train['stored_bytes']:,} B | {seconds[key]:.1f} |")


if __name__ == "__main__":
    main()
