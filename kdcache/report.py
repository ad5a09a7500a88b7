"""What is in a store, for `kdcache inspect`: splits, arrays, bytes, teacher, dataset, quality."""
from __future__ import annotations

import numpy as np

from kdcache import store as stores
from kdcache.targets import decode


def describe_store(path: str) -> dict:
    """Plain data describing the store at `path` (complete or not)."""
    with stores.open_store(path) as store:
        attrs = store.get_attrs()
        report = {
            "path": str(path), "complete": bool(attrs.get("complete")), "schema_version": attrs.get("schema_version"),
            "kdcache_version": attrs.get("kdcache_version"), "created": attrs.get("created"),
            "teacher": attrs.get("teacher"), "dtype": attrs.get("dtype"), "views": attrs.get("views"),
            "topk": attrs.get("topk"), "splits": {},
        }
        for split in store.group_names():
            split_attrs = store.get_attrs(split)
            arrays = {}
            for name in store.array_names(split):
                a = store.array(f"{split}/{name}")
                logical = np.dtype(a.dtype).itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
                arrays[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "bytes_per_sample": logical,
                                "stored_bytes": store.stored_bytes(f"{split}/{name}"),
                                "form": attrs.get("activations", {}).get(name.removeprefix("activations/"), {}).get("form")}
            entry = {"dataset": split_attrs.get("dataset"), "complete": bool(split_attrs.get("complete")),
                     "rows_written": split_attrs.get("rows_written"), "arrays": arrays}
            if entry["complete"] and store.has_array(f"{split}/logits"):
                entry["teacher_top1"] = _teacher_top1(store, split, attrs.get("encoding"))
            report["splits"][split] = entry
    return report


def _teacher_top1(store, split: str, encoding) -> float:
    """Top-1 of the cached logits, one chunk of rows at a time: an ImageNet cache never has to
    fit in memory as float32 just to be inspected."""
    logits, labels = store.array(f"{split}/logits"), np.asarray(store.read(f"{split}/labels"))
    rows, correct = logits.chunks[0], 0
    for start in range(0, logits.shape[0], rows):
        block = decode(logits[start : start + rows], encoding)[:, 0]
        correct += int((block.argmax(1).numpy() == labels[start : start + rows]).sum())
    return 100.0 * correct / max(len(labels), 1)


def format_report(r: dict) -> str:
    t = r.get("teacher") or {}
    lines = [
        f"store      {r['path']}  ({'complete' if r['complete'] else 'INCOMPLETE'}, schema {r['schema_version']}, "
        f"kdcache {r['kdcache_version']}, created {r['created']})",
        f"teacher    {t.get('arch')}  {t.get('num_classes')} classes  weights sha256 {str(t.get('weights_sha256'))[:16]}",
        f"encoding   {r['dtype']}, views {r['views']}, topk {r['topk'] or '-'}",
    ]
    for split, s in r["splits"].items():
        d = s.get("dataset") or {}
        top1 = f", teacher top-1 {s['teacher_top1']:.2f}%" if "teacher_top1" in s else ""
        lines.append(f"split {split}: {d.get('name')} {d.get('length')} samples, fingerprint "
                     f"{str(d.get('fingerprint'))[:12]}{top1}{'' if s['complete'] else ', INCOMPLETE'}")
        for name, a in s["arrays"].items():
            form = f" [{a['form']}]" if a.get("form") else ""
            lines.append(f"  {name:<28} {str(tuple(a['shape'])):<20} {a['dtype']:<8} "
                         f"{a['bytes_per_sample']:>8,} B/sample  {a['stored_bytes']:>12,} B on disk{form}")
    return "\n".join(lines)
