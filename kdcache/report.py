"""What is in a store, for `kdcache inspect`: splits, arrays, bytes, teacher, dataset, quality; of a
token store also its tokenizer, sequences and bytes per token."""
from __future__ import annotations

import numpy as np

from kdcache import store as stores
from kdcache.encodings import LogitCodec, from_storage
from kdcache.store.records import rows_written


def describe_store(path: str) -> dict:
    """Plain data describing the store at `path` (complete or not)."""
    with stores.open_store(path) as store:
        attrs = store.get_attrs()
        report = {
            "path": str(path), "complete": bool(attrs.get("complete")), "schema_version": attrs.get("schema_version"),
            "kdcache_version": attrs.get("kdcache_version"), "created": attrs.get("created"),
            "teacher": attrs.get("teacher"), "dtype": attrs.get("dtype"), "views": attrs.get("views"),
            "augment": attrs.get("augment"), "topk": attrs.get("topk"), "splits": {},
            "encoding": attrs.get("encoding"), "sample": attrs.get("sample"),
            "sample_temperature": attrs.get("sample_temperature"), "fidelity": attrs.get("fidelity"),
            "converted_from": attrs.get("converted_from"), "autocast": attrs.get("autocast"),
        }
        tokens = attrs.get("kind") == "tokens"
        if tokens:
            report.update(kind="tokens", tokens=attrs.get("tokens"))
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
                     "rows_written": rows_written(store, split) if "block_rows" in split_attrs else 0, "views": split_attrs.get("views", 1),
                     "view_transform": split_attrs.get("view_transform"), "arrays": arrays,
                     "block_rows": split_attrs.get("block_rows"), "layout": split_attrs.get("layout"),
                     "bytes_per_sample": sum(a["bytes_per_sample"] for a in arrays.values()),
                     "stored_bytes": sum(a["stored_bytes"] for a in arrays.values())}
            if entry["complete"] and store.has_array(f"{split}/logits"):
                entry["teacher_top1"] = _teacher_top1(store, split, LogitCodec.from_attrs(attrs))
            if tokens:
                entry.update(_token_counts(store, split, entry))
            report["splits"][split] = entry
    return report


def _token_counts(store, split: str, entry: dict) -> dict:
    """A token split's sequences, positions and target positions (those with a next token to
    predict), and its bytes on disk per target position (per token) and per position."""
    d = entry["dataset"] or {}
    n, length = store.array(f"{split}/labels").shape[:2]
    targets = d.get("targets")
    if targets is None:  # not recorded: counted from the labels (-100: no target)
        targets = int((np.asarray(store.read(f"{split}/labels")) != -100).sum())
    positions = n * length
    return {"sequences": n, "seq_len": length, "positions": positions, "target_positions": targets,
            "stored_bytes_per_token": entry["stored_bytes"] / max(targets, 1),
            "stored_bytes_per_position": entry["stored_bytes"] / max(positions, 1),
            "bytes_per_position": entry["bytes_per_sample"] / max(length, 1)}


def _teacher_top1(store, split: str, codec) -> float:
    """Top-1 of the cached logits over every view, one block of rows at a time: an ImageNet cache
    never has to fit in memory as float32 just to be inspected. A mixed view counts as the class
    of the sample with the larger weight. Every block read is checked against its recorded
    checksum: a damaged one stops inspect with one line naming it (store.CheckedReads)."""
    mixed = store.has_array(f"{split}/mix_partner")
    dtypes = {k: dt for k, (_, dt) in codec.arrays().items()}  # an edited dtype would give another top-1
    reads = stores.CheckedReads(store, split, [*dtypes, "labels", *(["mix_partner", "mix_lambda"] if mixed else [])],
                                dtypes=dtypes)
    logits, labels = store.array(f"{split}/logits"), reads.read("labels")
    if mixed:
        partner, lam = reads.read("mix_partner"), reads.read("mix_lambda")
    rows, correct, counted = reads.block_rows, 0, 0
    for b, start in enumerate(range(0, logits.shape[0], rows)):
        stored = {k: reads.read_block(k, b) for k in codec.arrays()}
        block = codec.predictions({k: from_storage(v, str(v.dtype)) for k, v in stored.items()}).numpy()  # [rows, V]
        if labels.ndim == 2:  # a token store: [rows, L] next tokens, -100 where a position has no target
            truth = labels[start : start + rows]
            counted += int((truth != -100).sum())
        else:
            truth = np.broadcast_to(labels[start : start + rows, None], block.shape)
            counted += block.size
        if mixed:
            truth = np.where(lam[start : start + rows] >= 0.5, truth, labels[partner[start : start + rows]])
        correct += int((block == truth).sum())
    return 100.0 * correct / max(counted, 1)


def format_report(r: dict) -> str:
    if r.get("kind") == "tokens":
        return _format_tokens(r)
    t = r.get("teacher") or {}
    lines = [
        _store_line(r),
        f"teacher    {t.get('arch')}  {t.get('num_classes')} classes  weights sha256 {str(t.get('weights_sha256'))[:16]}",
        f"encoding   {r['dtype']}, views {r['views']}, topk {r['topk'] or '-'}"
        + (f", sampled {r['sample']} draws at T {r['sample_temperature']:g}" if r.get("sample") else "")
        + (f" ({r['encoding']})" if r.get("encoding") else ""),
    ]
    lines += _converted_lines(r)
    lines += _fidelity_lines(r.get("fidelity"))
    a = r.get("augment")
    if a:
        mix = f", --mix {a['mix']} (alpha {a['mix_alpha']})" if a.get("mix") else ""
        lines.append(f"views      {a['views']} per sample of {', '.join(a['splits'])}: --augment {a['preset']}, "
                     f"seed {a['seed']}{mix}; other splits: the eval transform, one view")
    for split, s in r["splits"].items():
        d = s.get("dataset") or {}
        views = s.get("views", 1)
        over = f" over its {views} views" if views > 1 else ""
        top1 = f", teacher top-1{over} {s['teacher_top1']:.2f}%" if "teacher_top1" in s else ""
        lines.append(f"split {split}: {d.get('name')} {d.get('length')} samples{f' x {views} views' if views > 1 else ''}, "
                     f"fingerprint {str(d.get('fingerprint'))[:12]}{top1}{'' if s['complete'] else ', INCOMPLETE'}")
        if s.get("view_transform"):
            lines.append(f"  views of {s['view_transform']}")
        lines += _array_lines(s, "sample")
        if views > 1:  # what a view costs: the figure to weigh K against
            lines.append(f"  {'total':<28} {'':<20} {'':<8} {s['bytes_per_sample']:>8,} B/sample  "
                         f"{s['stored_bytes']:>12,} B on disk, {s['bytes_per_sample'] / views:,.0f} B/view")
    return "\n".join(lines)


def _format_tokens(r: dict) -> str:
    """format_report of a token store: sequences of L tokens, the tokenizer, bytes per token."""
    t, k = r.get("teacher") or {}, r.get("tokens") or {}
    tok = k.get("tokenizer") or {}
    lines = [
        _store_line(r),
        f"teacher    {t.get('arch')}  vocabulary {t.get('num_classes')}, context {t.get('context')}  "
        f"weights sha256 {str(t.get('weights_sha256'))[:16]}",
        f"encoding   {r['dtype']}, topk {r['topk'] or '-'} of the next-token logits" + (f" ({r['encoding']})" if r.get("encoding") else ""),
        f"tokens     sequences of {k.get('seq_len')} tokens, packing {k.get('packing')}; tokenizer vocabulary "
        f"{tok.get('vocab_size')}, sha256 {str(tok.get('sha256'))[:12]}, eos {tok.get('eos_id')}, pad {tok.get('pad_id')}, "
        f"from {tok.get('source')}",
        *_converted_lines(r),
    ]
    for split, s in r["splits"].items():
        d = s.get("dataset") or {}
        top1 = f", teacher next-token top-1 {s['teacher_top1']:.2f}%" if "teacher_top1" in s else ""
        lines.append(f"split {split}: {d.get('name')} {s['sequences']:,} sequences of {s['seq_len']} tokens, "
                     f"{s['target_positions']:,} target positions, fingerprint {str(d.get('fingerprint'))[:12]}{top1}"
                     f"{'' if s['complete'] else ', INCOMPLETE'}")
        lines += _array_lines(s, "sequence")
        lines.append(f"  {'total':<28} {'':<20} {'':<8} {s['bytes_per_sample']:>8,} B/sequence  {s['stored_bytes']:>12,} "
                     f"B on disk: {s['stored_bytes_per_token']:,.1f} B/token (per target position), "
                     f"{s['stored_bytes_per_position']:,.1f} B/position")
    return "\n".join(lines)


def _store_line(r: dict) -> str:
    return (f"store      {r['path']}  ({'complete' if r['complete'] else 'INCOMPLETE'}, schema {r['schema_version']}, "
            f"kdcache {r['kdcache_version']}, created {r['created']})")


def _converted_lines(r: dict) -> list[str]:
    """The store's convert history, newest first."""
    lines, c = [], r.get("converted_from")
    while c:
        lines.append(f"converted  from {c.get('path')} ({c.get('dtype')}, topk {c.get('topk') or '-'}, "
                     f"kdcache {c.get('kdcache_version')}, created {c.get('created')})")
        c = c.get("converted_from")
    return lines


def _array_lines(s: dict, unit: str) -> list[str]:
    """One line per array of split entry `s`: shape, dtype, bytes per `unit` (a sample, a sequence), bytes on disk."""
    lines = []
    for name, a in s["arrays"].items():
        form = f" [{a['form']}]" if a.get("form") else ""
        lines.append(f"  {name:<28} {str(tuple(a['shape'])):<20} {a['dtype']:<8} "
                     f"{a['bytes_per_sample']:>8,} B/{unit}  {a['stored_bytes']:>12,} B on disk{form}")
    return lines


def _fidelity_lines(f: dict | None) -> list[str]:
    """What `convert --budget` measured and chose (root attr fidelity), for format_report."""
    if not f:
        return []
    chosen = next((c for c in f["candidates"] if c["name"] == f["chosen"]), {})
    kl = "inf" if chosen.get("kl") is None else f"{chosen['kl']:.4g}"
    return [f"fidelity   {f['chosen']} chosen for --budget {f['budget']} ({f['budget_bytes_per_sample']:,.1f} B/sample): "
            f"{chosen.get('bytes_per_sample', 0):,.1f} B/sample on disk, KL {kl} and TV {chosen.get('tv', 0):.4g} at "
            f"T {f['temperature']:g}, top-1 agreement {chosen.get('top1_agreement', 0):.2f}%, ECE {chosen.get('ece', 0):.4f} "
            f"(full teacher {f['full_ece']:.4f}); measured on {f['samples']:,} samples of {f['split']} against the "
            f"{f['source_dtype']} logits of {f['measured_from']}, {len(f['candidates'])} candidates"
            + (f"; ranked by a probe student ({f['probe']['student']}, {f['probe']['epochs']} epoch{'s' * (f['probe']['epochs'] != 1)}, seed "
               f"{f['probe']['seed']}): test top-1 {chosen.get('probe_top1', 0):.2f}" if f.get("rank") == "student" else "")]
