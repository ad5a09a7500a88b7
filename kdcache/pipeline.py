"""`kdcache run FILE.yaml`: the stages of a pipeline file, in order, each with its own options.

A pipeline is plain data: `stages:` is a list of one-key mappings, `{command: {option: value}}`,
with the same option names as the command line (dashes or underscores).
"""
from __future__ import annotations

import dataclasses
import os

from kdcache.config import DumpConfig, TrainConfig, read_yaml, resolve
from kdcache.errors import KDCacheError
from kdcache.progress import log


def run_pipeline(path: str, *, resume: bool = False) -> None:
    """Run every stage of the pipeline file `path`, after checking them all.

    `resume` (kdcache run --resume): re-run a pipeline that stopped or already ran: a dump whose
    store is complete is skipped, an interrupted one resumed, a missing one made; trainings skip
    the students already trained and continue the interrupted ones from their last epoch.
    """
    from kdcache import store as stores
    from kdcache.dump import dump_teacher
    from kdcache.sweep import train_student

    commands = {"dump-teacher": (DumpConfig, dump_teacher), "train-student": (TrainConfig, train_student)}
    spec = read_yaml(path)
    unknown = set(spec) - {"stages", "description"}
    if unknown:
        raise KDCacheError(f"pipeline '{path}' has unknown keys {sorted(map(str, unknown))}; it takes 'stages' "
                           "(and 'description')")
    stages = spec.get("stages")
    if not isinstance(stages, list) or not stages:
        raise KDCacheError(f"pipeline '{path}' needs a non-empty 'stages:' list of {{command: {{options}}}}")
    # resolve every stage first, so a typo in the last stage fails before the first one runs
    plan = []
    for i, stage in enumerate(stages, 1):
        if not isinstance(stage, dict) or len(stage) != 1 or next(iter(stage)) not in commands:
            raise KDCacheError(f"pipeline '{path}' stage {i} must be one of {', '.join(commands)} with its options")
        (command, options), = stage.items()
        where = f"{path} stage {i} ({command})"
        if options is not None and not isinstance(options, dict):
            raise KDCacheError(f"{where}: its options must be a mapping {{option: value}}, got a "
                               f"{type(options).__name__}; write - {command}: {{out: ..., ...}}")
        cls, fn = commands[command]
        try:  # values and names (models, losses, schedules, datasets, splits) alike
            plan.append((command, fn, resolve(cls, file_values=options or {}, source=where), options or {}))
        except KDCacheError as e:
            raise KDCacheError(f"{where}: {e}" if where not in str(e) else str(e)) from None
    _check_stages(path, plan)  # what a stage needs from the machine and from the stages before it
    for i, (command, fn, cfg, options) in enumerate(plan, 1):
        log.info(f"== stage {i}/{len(plan)}: kdcache {command}")
        note = default_dataset_note(cfg, named="dataset" in options, fix="add dataset: NAME to the stage for yours")
        if note:
            log.info(note)
        if resume and not cfg.overwrite:
            if command == "dump-teacher":
                found = stores.state(cfg.out)
                if found == "complete":
                    log.info(f"{cfg.out} is complete: stage {i} skipped (--resume)")
                    continue
                cfg = dataclasses.replace(cfg, resume=found == "partial")
            else:
                cfg = dataclasses.replace(cfg, resume=True)
        result = fn(cfg)
        if command == "dump-teacher":
            log.info(f"wrote {result}")  # as dump-teacher itself says


def default_dataset_note(cfg, *, named: bool, fix: str) -> str | None:
    """The line that says the default dataset is used: the one default that picks the data is said,
    not silent (a token cache brings its own sequences, so it needs none)."""
    if named or _token_cache(cfg):
        return None
    return f"dataset: {cfg.dataset} (the default; {fix})"


def _token_cache(cfg) -> bool:
    if not getattr(cfg, "cache", None):
        return False
    from kdcache.tokens.train import is_token_cache

    try:
        return is_token_cache(cfg.cache)
    except KDCacheError:  # a missing cache: the training says so
        return False


def _check_stages(path: str, plan: list) -> None:
    """Before any stage runs, what each needs besides its own options: its device, a cache that an
    earlier stage dumps (with the split it trains on) or that exists, a teacher checkpoint that
    exists or that an earlier stage may write (under its out folder). A typo there used to surface
    only once the stages before it had run."""
    from kdcache.distributed import resolve_device

    dumped, trained = {}, []  # earlier stages' stores (path -> splits) and training folders
    for i, (command, _, cfg, *_) in enumerate(plan, 1):
        try:
            resolve_device(cfg.device)
            if command == "train-student" and cfg.cache:
                _check_cache(cfg.cache, cfg.train_split, dumped)
            _check_teacher_file(cfg.teacher, trained)
        except KDCacheError as e:
            raise KDCacheError(f"{path} stage {i} ({command}): {e}") from None
        if command == "dump-teacher":
            dumped[_where(cfg.out)] = list(cfg.splits)
        else:
            trained.append(_where(cfg.out))


def _where(path: str) -> str:
    from kdcache.store.remote import is_url

    return str(path).rstrip("/") if is_url(path) else os.path.abspath(path)


def _check_cache(cache: str, split: str, dumped: dict) -> None:
    from kdcache import store as stores

    stores.backend_for(cache)  # an unknown suffix
    splits = dumped.get(_where(cache))
    if splits is not None:
        if split not in splits:
            raise KDCacheError(f"cache {cache} is dumped by an earlier stage with splits {', '.join(splits)}, which "
                               f"lack the split '{split}' this stage trains on; add it to that stage's splits")
    elif not stores.is_url(cache) and stores.state(cache) == "missing":
        outs = ", ".join(dumped) or "none"
        raise KDCacheError(f"cache {cache} does not exist and no earlier stage dumps it (they write: {outs}); "
                           "check the path")


def _check_teacher_file(teacher: str | None, trained: list) -> None:
    """A teacher given as a checkpoint path (not a model name, a hub model or a module:callable)."""
    if not teacher or teacher.startswith(("hf:", "timm:")) or not (
            "/" in teacher or os.sep in teacher or teacher.endswith((".pt", ".pth", ".ckpt"))):
        return
    where = os.path.abspath(teacher)
    if os.path.isfile(where) or any(where.startswith(folder + os.sep) for folder in trained):
        return
    raise KDCacheError(f"teacher checkpoint {teacher} does not exist and no earlier stage trains into its folder; "
                       "check the path")
