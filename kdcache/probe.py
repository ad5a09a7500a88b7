"""`convert --budget --rank student`: rank the encodings that fit a budget by what a student learns
from them, measured by training a small probe student from each, instead of by fidelity to the teacher.

Fidelity is the right measure when the targets must stand in for the teacher; it is not always the
measure of the student that comes out: on digit-pairs at T 4 the sparse top-k targets, which temper
their tail less than the real teacher (losses.soft_target_topk), train students 5-8 points better than
the faithful float16 ones (make bench, section 8). A probe measures that instead of assuming it: for
each candidate within the budget, the store is converted to it and one short run of the probe student
(PROBE_STEPS steps, a seed no default run uses) trains from it; candidates rank by the probe's test top-1.
"""
from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager

from kdcache import store as stores
from kdcache.config import TrainConfig
from kdcache.convert import DENSE, convert_store
from kdcache.data import names_code
from kdcache.encodings import LogitCodec
from kdcache.errors import KDCacheError
from kdcache.models import create_model
from kdcache.progress import log
from kdcache.sweep import train_student

__all__ = ["PROBE_SEED", "PROBE_STEPS", "PROBE_STUDENT", "auto_epochs", "probe_candidates", "student_ranker"]

PROBE_STUDENT = "cnn_tiny"  # the smallest registry student: where the choice of targets matters most, and cheapest
PROBE_STEPS = 300  # steps of a probe at least: one epoch of digit-pairs; digits' 23 a epoch teach nothing in one
PROBE_SEED = 1000  # not 0 or 1, the seeds users and make bench train with: the probe is not their run itself


def student_ranker(src: str, *, student: str = PROBE_STUDENT, epochs: int | None = None, seed: int = PROBE_SEED,
                   dataset: str | None = None, data_root: str | None = None):
    """A ranker for convert_store(ranker=...): (report, budget in bytes per sample) -> the report with
    each fitting candidate's probe top-1, ranked by it (fidelity.choose with rank "student").
    `epochs` None: enough for PROBE_STEPS steps."""
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise KDCacheError(f"--probe-epochs {epochs!r} must be a positive number of epochs")
    create_model(student, num_classes=2)  # an unknown probe student fails before the fidelity sample is read

    def rank(report: dict, budget: float) -> dict:
        return probe_candidates(src, report, budget, student=student, epochs=epochs, seed=seed, dataset=dataset,
                                data_root=data_root)

    return rank


def probe_candidates(src: str, report: dict, budget: float = float("inf"), *, student: str = PROBE_STUDENT,
                     epochs: int | None = None, seed: int = PROBE_SEED, dataset: str | None = None,
                     data_root: str | None = None) -> dict:
    """Train `student` for `epochs` from each candidate of the fidelity `report` (of the store `src`)
    whose bytes fit `budget`, and record its test top-1 as the candidate's `probe_top1` (None for
    those that do not fit). The dataset is the store's (or `dataset`, checked against its fingerprint);
    `epochs` None: the fewest whole epochs of train-student's batches that make PROBE_STEPS steps."""
    attrs = _attrs(src)
    source = LogitCodec.from_attrs(attrs)
    dataset, data_root = _dataset_of(src, attrs, dataset, data_root)
    epochs = epochs or auto_epochs(attrs["train_samples"])
    fits = [e for e in report["candidates"] if e["bytes_per_sample"] <= budget]
    for entry in report["candidates"]:
        entry["probe_top1"] = None
    with tempfile.TemporaryDirectory(prefix="kdcache-probe-") as tmp:
        for i, entry in enumerate(fits):
            codec = LogitCodec.from_attrs(entry["codec"])
            with _quiet():
                cache = src if codec == source else convert_store(src, os.path.join(tmp, f"{i}.zarr"), **_options(codec))
                rows = train_student(cache=cache, students=[student], epochs=epochs, seed=seed, dataset=dataset,
                                     data_root=data_root, temperature=report["temperature"],
                                     out=os.path.join(tmp, f"run{i}"))
            entry["probe_top1"] = rows[0]["top1"]
            log.info(f"probe {i + 1}/{len(fits)}: {student} from {entry['name']}: test top-1 {entry['probe_top1']:.2f}")
    report["rank"] = "student"
    report["probe"] = {"student": student, "epochs": epochs, "seed": seed}
    return report


def auto_epochs(samples: int) -> int:
    """The fewest whole epochs of train-student's batches over `samples` that make PROBE_STEPS steps."""
    steps = -(-samples // TrainConfig.batch_size)
    return -(-PROBE_STEPS // max(steps, 1))


def _attrs(src: str) -> dict:
    with stores.open_store(src) as s:
        has_train = "train" in s.group_names()
        return {**s.get_attrs(), "train": s.get_attrs("train") if has_train else {},
                "train_samples": s.array("train/labels").shape[0] if has_train else 0}


def _dataset_of(src: str, attrs: dict, dataset: str | None, data_root: str | None) -> tuple[str, str | None]:
    """The probes' dataset: the user's, or the one the store's train split was dumped from when it
    names a kdcache dataset (a store may not name code that kdcache runs: data.names_code)."""
    if dataset is not None:
        return dataset, data_root
    if not attrs["train"]:
        raise KDCacheError(f"--rank student trains probes on the train split, and '{src}' has none")
    name = (attrs["train"].get("dataset") or {}).get("name")
    if not isinstance(name, str) or names_code(name):
        raise KDCacheError(f"'{src}' does not name its dataset as one kdcache knows ({name!r}); pass the probes' "
                           "data with --dataset")
    return name, data_root or (attrs.get("config") or {}).get("data_root")


def _options(codec: LogitCodec) -> dict:
    """convert_store's options that make `codec` from any dense store."""
    if codec.sample is not None:
        return dict(dtype=codec.dtype, indices=codec.indices, sample=codec.sample,
                    sample_temperature=codec.sample_temperature, sample_seed=codec.sample_seed)
    return dict(dtype=codec.dtype, topk=DENSE if codec.topk is None else codec.topk,
                **({"indices": codec.indices} if codec.topk is not None else {}))


@contextmanager
def _quiet():
    """The probe's own converts and epochs are not the user's: one line per candidate says enough."""
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)
