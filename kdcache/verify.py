"""`kdcache verify`: is a store whole and sound? A list of problems, empty when it is."""
from __future__ import annotations

import numpy as np

from kdcache import store as stores


def verify_store(path: str) -> list[str]:
    problems = []
    with stores.open_store(path) as store:
        attrs = store.get_attrs()
        if not attrs.get("complete"):
            problems.append("store is not marked complete (interrupted dump?)")
        for split in attrs.get("splits", []):
            if split not in store.group_names():
                problems.append(f"split '{split}' is missing")
                continue
            split_attrs = store.get_attrs(split)
            n = (split_attrs.get("dataset") or {}).get("length")
            if split_attrs.get("rows_written") != n:
                problems.append(f"split '{split}': {split_attrs.get('rows_written')} of {n} rows written")
            for name in store.array_names(split):
                a = store.array(f"{split}/{name}")
                if a.shape[0] != n:
                    problems.append(f"{split}/{name}: {a.shape[0]} rows, expected {n}")
                values = np.asarray(store.read(f"{split}/{name}"))
                if values.dtype.kind == "f" and not np.isfinite(values).all():
                    bad = int(np.argwhere(~np.isfinite(values.reshape(len(values), -1)).all(1))[0][0])
                    problems.append(f"{split}/{name}: non-finite values, first at row {bad}")
    return problems
