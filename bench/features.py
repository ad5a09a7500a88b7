"""Feature KD on digits: test top-1 of one student trained without KD, with soft_target, soft_target
plus attention transfer, soft_target plus FitNets hints, and dkd / nkd (same epochs, same seeds),
and the bytes per sample of each stored activation form.

Teacher: runs/digits/teacher/resnet20/model.pt from `kdcache run pipelines/digits.yaml`, or, when
that is absent, a resnet20 trained here the same way (8 epochs). Each form is dumped to its own
float16 cache (layer1..3 of the teacher), so the bytes are those a user would store.
The attention rows train from the `:attention` cache, the others from the full one.
Run: `.venv/bin/python bench/features.py --threads 1` (about 3 minutes on one CPU core; the thread
count changes float sums, so figures move by a sample or two with it); `--seeds 0` for one seed.
Writes runs/features/ (replaced on each run) and prints markdown tables.
"""
from __future__ import annotations

import os
import statistics
import sys


from kdcache import dump_teacher, train_student
from kdcache.report import describe_store

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # digits_experiment.py, run as a script
from digits_experiment import parse_args, teacher_checkpoint  # noqa: E402

LAYERS = ["layer1", "layer2", "layer3"]  # the teacher's three stages, for the bytes table
FORMS = ["full", "attention", "pool"]
KD = dict(alpha=0.9, temperature=4.0)  # digits.yaml's end alpha, held constant: one setting for every row
AT = dict(loss="soft_target", feature_weight=1000.0, **KD)  # feature weights are the CRD benchmark's (Tian et
FITNET = dict(loss="soft_target", feature_weight=100.0, **KD)  # al. 2020); their scales differ ~1000x; not tuned here
# (row, folder, cache form, options). cnn_tiny's stages are at 16, 8 and 4 pixels, resnet20's at 32, 16 and 8:
# layer3=layer3 pairs the last stages (the student's 4x4 map is resized to 8x8), layer2=layer3 pairs equal 8x8 maps.
VARIANTS = [
    ("no KD", "plain", None, {}),
    ("soft_target", "soft_target", "full", dict(loss="soft_target", **KD)),
    ("soft_target + attention layer3=layer3", "at33", "attention", dict(features=["layer3=layer3:attention"], **AT)),
    ("soft_target + attention layer2=layer3", "at23", "attention", dict(features=["layer2=layer3:attention"], **AT)),
    ("soft_target + fitnet layer3=layer3", "fitnet33", "full", dict(features=["layer3=layer3:fitnet"], **FITNET)),
    ("soft_target + fitnet layer2=layer3", "fitnet23", "full", dict(features=["layer2=layer3:fitnet"], **FITNET)),
    ("soft_target + fitnet layer2=layer3, weight 1", "fitnet23w1", "full",
     dict(features=["layer2=layer3:fitnet"], **dict(FITNET, feature_weight=1.0))),  # the default weight
    ("soft_target + fitnet layer3=layer3, pooled", "fitnet33pool", "pool", dict(features=["layer3=layer3:fitnet"], **FITNET)),
    ("dkd", "dkd", "full", dict(loss="dkd", **KD)),
    ("nkd", "nkd", "full", dict(loss="nkd", **KD)),
]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "runs/features")

    teacher = teacher_checkpoint(args.out)
    caches = {form: dump_teacher(teacher=teacher, dataset="digits", out=os.path.join(args.out, f"cache-{form}.zarr"),
                                 activations=[f"{layer}:{form}" for layer in LAYERS])
              for form in FORMS}

    results = {}
    for name, key, form, options in VARIANTS:
        top1 = []
        for seed in args.seeds:
            cache = {"cache": caches[form]} if form else {}
            rows = train_student(students=[args.student], dataset="digits", epochs=args.epochs, seed=seed,
                                 out=os.path.join(args.out, "students", key, str(seed)), **cache, **options)
            top1.append(rows[0]["top1"])
        results[name] = top1

    print(f"\nstudent {args.student}, teacher {teacher}, digits, {args.epochs} epochs, seeds {args.seeds}\n")
    print("| training | test top-1 (mean ± sd) | per seed |")
    print("|---|---|---|")
    for name, top1 in results.items():
        sd = statistics.stdev(top1) if len(top1) > 1 else 0.0
        print(f"| {name} | {statistics.mean(top1):.2f} ± {sd:.2f} | {' / '.join(f'{v:.2f}' for v in top1)} |")
    teacher_top1 = describe_store(caches["full"])["splits"]["test"]["teacher_top1"]
    print(f"| teacher (resnet20) | {teacher_top1:.2f} | |")

    print("\nbytes per sample of each stored form (float16; logits: 20 B/sample)\n")
    print("| teacher activation | shape | " + " | ".join(FORMS) + " |")
    print("|---|---|" + "---|" * len(FORMS))
    sizes = {form: describe_store(path)["splits"]["train"]["arrays"] for form, path in caches.items()}
    for layer in LAYERS:
        shape = "x".join(map(str, sizes["full"][f"activations/{layer}"]["shape"][2:]))
        cells = [f"{sizes[form][f'activations/{layer}']['bytes_per_sample']:,}" for form in FORMS]
        print(f"| {layer} | {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
