"""`train-student` as a whole: every student of a sweep (and its baseline), one after another or
in --jobs processes, then OUT/summary.csv, the table and summary.png.

One student's training (data, teacher, epochs, checkpoint) is kdcache/train.py's `fit`.
"""
from __future__ import annotations

import contextlib
import csv
import os

import torch

from kdcache import distributed, features, jobs
from kdcache.config import TrainConfig, resolve
from kdcache.errors import KDCacheError, closest
from kdcache.models import count_parameters, create_model, load_checkpoint, model_from_checkpoint
from kdcache.progress import log
from kdcache.store.lock import StoreLock
from kdcache.losses import KD_LOSSES
from kdcache.train import Setup, fit, student_line


def train_student(cfg: TrainConfig | None = None, **options) -> list[dict]:
    """Train every student of `cfg` (and its baseline); return the summary rows.

    Python API: `kdcache.train_student(cache="cache.zarr", students=["resnet8"], epochs=5)`.
    Under `torchrun` every rank runs this and each student is trained with DDP across them.
    """
    cfg = cfg or resolve(TrainConfig, overrides=options, source="train_student()")
    if _is_token_run(cfg):  # language-model students on token sequences: kdcache/tokens/train.py
        from kdcache.tokens.train import train_lm_students

        return train_lm_students(cfg, distributed.resolve_device(cfg.device))
    for name in cfg.students:
        create_model(name, num_classes=2)  # an unknown student fails before any data is read
    if cfg.loss not in KD_LOSSES:
        raise KDCacheError(f"--loss {cfg.loss} is a token-level loss (language-model caches); image students train "
                           f"with {', '.join(KD_LOSSES)} (closest: {closest(cfg.loss, KD_LOSSES)})")
    dist = distributed.Dist.from_env()
    if cfg.jobs > 1 and dist.world_size > 1:
        raise KDCacheError("--jobs trains several students side by side in one launch; under torchrun each student "
                           "is already spread over the processes: drop --jobs or run without torchrun")
    device = distributed.device_for(dist, distributed.resolve_device(cfg.device))
    with distributed.process_group(device.type) as dist:
        setup = Setup(cfg, device, dist)
        if setup.pairs:  # a student layer, or shapes no adapter can join, fail here, before any training
            probe = features.probe_batch(setup.train_data.dataset, device)
            for name in cfg.students:
                student = create_model(name, num_classes=setup.train_data.num_classes, in_chans=setup.train_data.in_chans)
                features.build_feature_kd(setup.pairs, student.to(device), setup.teacher, probe)
        teacher_top1 = None
        if setup.teacher_pred is not None:
            teacher_top1 = 100.0 * (setup.teacher_pred == torch.as_tensor(setup.test_data.labels)).float().mean().item()
        # one training per OUT at a time (rank 0 holds it for all ranks): a second one would write the
        # same students' checkpoints and summary; it fails here, at once, naming the first
        with StoreLock(cfg.out, what="training") if dist.is_main else contextlib.nullcontext():
            runs, folders = plan_runs(cfg, setup.mode)  # what OUT holds, judged while no one else writes it
            todo = [run for run in runs if not _finished(cfg, folders[run])]
            if cfg.jobs > 1 and len(todo) > 1:
                trained = jobs.run(cfg, todo, folders)  # each job sets up its own data and teacher
            else:
                trained = {run: fit(run[0], run[1], setup, folders[run]) for run in todo}
            rows = []
            for name, kind in runs:
                row = trained.get((name, kind))
                if row is None:  # trained by an earlier run (--resume): said here, the others when they finished
                    row = finished_row(name, kind, cfg, os.path.join(folders[(name, kind)], "model.pt"))
                    if dist.is_main:
                        log.info(student_line(row) + "  (trained earlier)")
                row["teacher_top1"] = teacher_top1
                rows.append(row)
            if dist.is_main:
                write_summary(cfg.out, rows)
        return rows


def _is_token_run(cfg: TrainConfig) -> bool:
    """A token cache, or no cache and a text dataset: the students are language models."""
    from kdcache.tokens.text import is_text_dataset

    if cfg.cache:
        from kdcache.tokens.train import is_token_cache

        return is_token_cache(cfg.cache)
    return is_text_dataset(cfg.dataset)


def plan_runs(cfg: TrainConfig, mode: str) -> tuple[list, dict]:
    """[(student, kind)] in order and each one's folder; refuses to overwrite a trained student."""
    runs = [(name, mode) for name in cfg.students]
    if cfg.baseline and mode != "plain":
        runs += [(name, "baseline") for name in cfg.students]
    # "mymod:net" -> OUT/mymod.net: a colon in a folder name breaks PATH-like lists, Windows, and scp
    folders = {run: os.path.join(cfg.out, run[0].replace(":", ".") + ("-baseline" if run[1] == "baseline" else ""))
               for run in runs}
    for folder in folders.values():
        if cfg.overwrite or cfg.resume:
            continue
        if os.path.exists(os.path.join(folder, "model.pt")):
            raise KDCacheError(f"'{folder}' already holds a trained student; pass --resume to keep it, "
                               "--overwrite to retrain it, or choose another --out")
        if os.path.exists(os.path.join(folder, "last.pt")):  # killed after an epoch: not silently started over
            raise KDCacheError(f"'{folder}' holds a training that was interrupted; pass --resume to continue it "
                               "from its last epoch, --overwrite to start over, or choose another --out")
    return runs, folders


def _finished(cfg: TrainConfig, folder: str) -> bool:
    """A resumed sweep skips students already trained."""
    return cfg.resume and not cfg.overwrite and os.path.exists(os.path.join(folder, "model.pt"))


SUMMARY_COLUMNS = ["student", "kind", "params", "epochs", "top1", "top5", "agreement", "teacher_top1", "seconds", "folder"]


def write_summary(out: str, rows: list[dict]) -> None:
    """OUT/summary.csv, a table on stdout, and OUT/summary.png (top-1 against parameters)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    log.info(format_table(rows))
    from kdcache.plots import plot_summary

    plot_summary(rows, os.path.join(out, "summary.png"))


def format_table(rows: list[dict]) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"{'student':<16} {'params':>9} {'kind':<9} {'top1':>6} {'agree':>6}"]
    for r in rows:
        lines.append(f"{r['student']:<16} {r['params']:>9,} {r['kind']:<9} {fmt(r['top1'], '6.2f')} "
                     f"{fmt(r.get('agreement'), '6.2f')}")
    if rows and rows[0].get("teacher_top1") is not None:
        lines.append(f"{'teacher':<16} {'':>9} {'':<9} {rows[0]['teacher_top1']:6.2f}")
    return "\n".join(lines)


def finished_row(name: str, kind: str, cfg: TrainConfig, checkpoint: str) -> dict:
    """The summary row of a student trained earlier, from its checkpoint."""
    ckpt = load_checkpoint(checkpoint)
    m = ckpt["metrics"]
    params = count_parameters(model_from_checkpoint(ckpt, arch=name, path=checkpoint))  # its arch: this run's --student
    return {"student": name, "kind": kind, "params": params, "epochs": m.get("epoch", cfg.epochs), "top1": m["top1"],
            "top5": m["top5"], "agreement": m.get("agreement"), "seconds": m["seconds"],
            "folder": os.path.dirname(checkpoint), "step_losses": []}


# --- resumable training: the state after each epoch ------------------------------------------
