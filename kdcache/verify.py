"""`kdcache verify`: is a store whole and sound? A list of problems, empty when it is.

Checks completeness, every block (the unit of writing) against the checksum recorded when it was written (a flipped
byte, a truncated or a deleted chunk file all show), non-finite values, the fingerprint, and that
a sample of a view cache's views still replays to the inputs the teacher saw. `CheckedReads`
makes the block checks as training and inspect read a split, on what they read and nothing more.
"""
from __future__ import annotations


import numpy as np

from kdcache import store as stores
from kdcache.errors import KDCacheError
from kdcache.progress import log
from kdcache.store.records import chunk_checksum


def verify_store(path: str, *, dataset: str | None = None, augment: str | None = None,
                 data_root: str | None = None) -> list[str]:
    """The problems of the store at `path`, [] when it is sound.

    The checks that load the data (fingerprint, replay) use the dataset, view transform and data
    root the user names, else those the store records. A store may name registry entries only: a
    `module:callable` it names is never imported (stores are shared), and the check that needs it
    is skipped with a note saying how to run it (name it: --dataset / --augment).
    """
    problems = []
    with stores.open_store(path) as store:
        attrs = store.get_attrs()
        held = (attrs.get("augment") or {}).get("preset")
        if augment is not None and held is not None and augment != held:
            raise KDCacheError(f"--augment {augment}: store {path} replays the views it was dumped with "
                               f"(--augment {held}); drop --augment, or pass that one")
        named = {"dataset": dataset, "augment": augment, "data_root": data_root}
        if not attrs.get("complete"):
            problems.append("store is not marked complete (interrupted dump?)")
        for split in attrs.get("splits", []):
            if split not in store.group_names():
                problems.append(f"split '{split}' is missing")
                continue
            problems += _verify_split(store, split, attrs, named)
    return problems


REPLAY_SAMPLE = 64  # views regenerated per augmented split, as train-student's --verify-replay default


def _verify_split(store, split: str, attrs: dict, named: dict) -> list[str]:
    problems = []
    split_attrs = store.get_attrs(split)
    dataset = split_attrs.get("dataset") or {}
    n = dataset.get("length")
    if split_attrs.get("rows_written") != n:
        problems.append(f"split '{split}': {split_attrs.get('rows_written')} of {n} rows written")
    checksums = split_attrs.get("checksums", {})
    block = split_attrs.get("block_rows")
    if block is None:
        return problems + [f"split '{split}': no block size recorded (interrupted before its arrays were made?)"]
    for name in store.array_names(split):
        array = store.array(f"{split}/{name}")
        if array.shape[0] != n:
            problems.append(f"{split}/{name}: {array.shape[0]} rows, expected {n}")
        problems += _verify_blocks(array, block, f"{split}/{name}", checksums.get(name))
    problems += _verify_data(store, split, dataset, attrs, split_attrs, named)
    return problems


def _verify_blocks(array, rows: int, label: str, recorded: list | None) -> list[str]:
    """Each block of `rows` rows against the checksum its writer recorded."""
    if recorded is None:
        return [f"{label}: no block checksums recorded"]
    problems = []
    for i, start in enumerate(range(0, array.shape[0], rows)):
        try:
            values = np.asarray(array[start : start + rows])
        except Exception as e:  # the backend's own checksum or decompression failed
            problems.append(f"{label}: block {i} (rows {start}-{start + rows - 1}) is unreadable: {e}")
            continue
        expected = recorded[i] if i < len(recorded) else None
        if expected is None:
            problems.append(f"{label}: block {i} was never written")
        elif chunk_checksum(values) != expected:
            problems.append(f"{label}: block {i} (rows {start}-{start + rows - 1}) does not match its checksum "
                            "(changed, or missing and read as the fill value)")
        elif values.dtype.kind == "f" and not np.isfinite(values).all():
            bad = start + int(np.argwhere(~np.isfinite(values.reshape(len(values), -1)).all(1))[0][0])
            problems.append(f"{label}: non-finite values, first at row {bad}")
    return problems


def _verify_data(store, split: str, dataset: dict, attrs: dict, split_attrs: dict, named: dict) -> list[str]:
    """Where the data can be loaded here: recompute its fingerprint, and replay a sample of the
    split's views (if it has them) against their digests. Skipped, with a note, where it cannot
    (the data are elsewhere) or may not (the store names code the user did not)."""
    from kdcache import augment
    from kdcache.data import load_split

    if not dataset.get("fingerprint"):
        return [f"split '{split}': no dataset fingerprint recorded"]
    name = named["dataset"] or dataset.get("name")
    if not isinstance(name, str):
        return [f"split '{split}': no dataset name recorded"]
    root = named["data_root"] or (attrs.get("config") or {}).get("data_root")
    try:
        data = load_split(name, split, root=root, stored_in=None if named["dataset"] else store.path)
    except KDCacheError as e:
        return _skipped(split, "fingerprint and replay checks", e)
    if data.fingerprint() != dataset["fingerprint"]:
        return [f"split '{split}': dataset {name} no longer matches the recorded fingerprint"]
    recorded = attrs.get("augment") or {}
    if split not in recorded.get("splits", []) or not store.has_array(f"{split}/view_digests"):
        return []
    try:
        recipe = augment.stored_recipe(store, data, recorded, named=named["augment"])
    except KDCacheError as e:
        return _skipped(split, "replay check", e)
    try:
        augment.check_replay(recipe, recipe.stored["view_digests"], REPLAY_SAMPLE, recorded, split_attrs, split)
    except KDCacheError as e:
        return [str(e)]
    return []


def _skipped(split: str, checks: str, why: KDCacheError) -> list[str]:
    """A check that needs data or code not to be had here: said on stdout, not counted as a problem."""
    log.info(f"note: split '{split}': {checks} skipped: {why}")
    return []
