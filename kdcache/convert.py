"""`kdcache convert`: re-encode a finished cache (another logit encoding, another backend) without the teacher.

SRC is read a block at a time and DST written as a dump writes it: at DST.partial, in whole blocks
with progress records (so `resume` skips what is on disk), `complete` last, then renamed into place.
"""
from __future__ import annotations

import datetime
import os

import numpy as np
import torch

from kdcache import encodings
from kdcache import store as stores
from kdcache.encodings import (CODEC_ATTRS, ActivationCodec, LogitCodec, from_storage, recode_topk, stored_dtypes,
                               to_storage)
from kdcache.errors import KDCacheError
from kdcache.progress import log
from kdcache.store import records, writer
from kdcache.version import __version__

__all__ = ["DENSE", "convert_store", "target_codec", "convert_logits"]

DENSE = 0  # topk=0 asks for dense logits (topk=None keeps SRC's)
MAX_PENDING = 2  # pieces queued for the writer: reading SRC is the slow side, two overlap it with the writes
# split attrs that describe how DST itself is laid out and written: made anew, never copied from SRC
_WRITTEN_ATTRS = ("layout", "checksums", "block_rows", "rows_written", "complete")


def convert_store(src: str, dst: str, *, dtype: str | None = None, topk: int | None = None, overwrite: bool = False,
                  resume: bool = False, chunk_bytes: int | None = None, indices: str | None = None,
                  sample: int | None = None, sample_temperature: float | None = None, sample_seed: int | None = None,
                  budget: str | None = None, temperature: float = 4.0, candidates=None, ranker=None) -> str:
    """Write the complete store `src` again at `dst` with logits in `dtype` / top-`topk` (None: SRC's;
    topk=0: dense) with `indices` plain or packed (None: SRC's), or as `sample` classes drawn per view
    at `sample_temperature` (default 4) with `sample_seed`; return `dst`. Zarr or HDF5 by `dst`'s suffix.

    `budget` ("64B" per sample, or a total such as "40GB" over every split) instead picks the
    encoding: the most faithful candidate of the fidelity report (kdcache.fidelity, measured on
    SRC's train split at the training `temperature`) whose measured bytes fit; it is logged in one
    line and its figures recorded in DST's root attrs (`fidelity`). `candidates`: the encodings it
    chooses among (fidelity.parse_candidate names; default fidelity.default_candidates). `ranker`
    ranks the fitting candidates another way before the choice: kdcache.probe.student_ranker(SRC)
    trains a probe student from each (`--rank student`).

    Labels, view records (view_seeds, mix_partner, ...) and activations are copied as stored;
    activations change dtype only with `dtype`, to what dump-teacher would store for it (int8 and
    uint8 logits keep float16 activations). `chunk_bytes` (default: SRC's dump setting) sizes DST's chunks.
    Whatever would need logits SRC never stored (top-k -> dense, or to a larger K) is refused.

    A token store (root attr kind "tokens") converts the same way, its position axis where views
    are, its tokens, labels and tokenizer records copied as stored; `sample` and `budget` are refused
    (token students train from top-k or dense targets, and kdcache fidelity measures image stores).
    """
    src, dst = str(src).rstrip("/"), str(dst).rstrip("/")
    stores.backend_for(dst)  # an unknown suffix fails before any work
    if overwrite and resume:
        raise KDCacheError("--resume finishes an interrupted convert and --overwrite starts over; pass one of them")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise KDCacheError(f"convert writes a new store: DST '{dst}' is SRC itself; choose another DST path")
    with stores.open_store(src) as source:
        stores.check_complete(source)
        attrs = source.get_attrs()
        old = LogitCodec.from_attrs(attrs)
        if attrs.get("kind") == "tokens":
            _check_token_options(src, sample=sample, budget=budget)
        fidelity = None
        if budget is not None:
            chosen = {"--dtype": dtype, "--topk": topk, "--topk-indices": indices, "--sample": sample}
            if any(v is not None for v in chosen.values()):
                given = ", ".join(k for k, v in chosen.items() if v is not None)
                raise KDCacheError(f"--budget chooses the encoding itself; drop {given}, or drop --budget")
        else:
            new = target_codec(old, dtype, topk, src=src, indices=indices, sample=sample,
                               sample_temperature=sample_temperature, sample_seed=sample_seed)
        with stores.StoreLock(dst, what="convert"):  # one writer per store, as for a dump
            action = stores.decide(dst, overwrite=overwrite, resume=resume, what="convert", flag="DST")
            if action == "done":
                log.info(f"{dst} is already complete; nothing to resume")
                return dst
            if budget is not None:  # measured once DST is known to be wanted: the sample takes seconds
                new, fidelity = _plan_budget(source, src, dst, attrs, budget, temperature, candidates, ranker)
            chunk_bytes = chunk_bytes or (attrs.get("config") or {}).get("chunk_bytes") or stores.CHUNK_BYTES
            _convert(source, src, attrs, old, new, dst, action, chunk_bytes, fidelity)
    return dst


def _check_token_options(src: str, *, sample, budget) -> None:
    if sample is not None:
        raise KDCacheError(f"--sample applies to image caches, and '{src}' is a token cache: language-model students "
                           "train from top-k or dense next-token targets; drop --sample (--topk K keeps the K likeliest)")
    if budget is not None:
        raise KDCacheError(f"--budget measures encodings with kdcache fidelity, which reads image caches only, and "
                           f"'{src}' is a token cache; choose the encoding yourself, e.g. --topk 32 --dtype float16")


def _plan_budget(source, src: str, dst: str, attrs: dict, budget: str, temperature: float,
                 candidates, ranker=None) -> tuple[LogitCodec, dict]:
    """(DST's codec, the fidelity record for DST's attrs): the best candidate within `budget`, the most
    faithful unless `ranker` ranks them (report, bytes per sample) -> report."""
    from kdcache import fidelity

    amount, per_sample = fidelity.parse_budget(budget)
    total = sum(source.array(f"{split}/logits").shape[0] for split in attrs["splits"])
    per = amount if per_sample else amount / max(total, 1)
    report = fidelity.measure(src, temperature=temperature, candidates=candidates,
                              suffix=stores.backend_for(dst).suffixes[0])
    if ranker is not None:
        report = ranker(report, per)
    best, line = fidelity.choose(report, per)
    if not per_sample:
        line = f"{budget} over {total:,} samples; {line}"
    log.info(line)
    record = {"budget": budget, "budget_bytes_per_sample": per, "chosen": best["name"], "why": line,
              **{k: report[k] for k in ("split", "samples", "of", "views", "temperature", "source_dtype", "backend",
                                        "full_ece")},
              **{k: report[k] for k in ("rank", "probe") if k in report},
              "measured_from": os.path.abspath(src), "candidates": fidelity.as_json(report)["candidates"]}
    return LogitCodec.from_attrs(best["codec"]), record


def target_codec(old: LogitCodec, dtype: str | None, topk: int | None, *, src: str = "SRC", indices: str | None = None,
                 sample: int | None = None, sample_temperature: float | None = None,
                 sample_seed: int | None = None) -> LogitCodec:
    """DST's codec from SRC's and the options; refuses, naming the fix, what SRC cannot give."""
    if old.sample is not None:
        asked = {"dtype": dtype, "indices": indices, "sample": sample, "sample_temperature": sample_temperature,
                 "sample_seed": sample_seed}
        if topk is None and all(v is None or v == getattr(old, k) for k, v in asked.items()):
            return old  # another backend, the same draws
        raise KDCacheError(f"'{src}' holds sampled targets ({old.sample} classes drawn per view), from which no other "
                           "encoding can be made; convert the full-precision store it came from instead")
    if sample is not None:
        if old.topk is not None and old.topk < old.num_classes:
            raise KDCacheError(f"'{src}' keeps only the top {old.topk} of {old.num_classes} logits per view, and --sample "
                               "draws from every class; convert a dense store, or dump the teacher again with --sample")
        floats = ("float32", "float16", "bfloat16")
        return LogitCodec(dtype or (old.dtype if old.dtype in floats else "float16"), None, old.num_classes,
                          indices=indices or "plain", sample=sample,
                          sample_temperature=4.0 if sample_temperature is None else sample_temperature,
                          sample_seed=sample_seed or 0).validate()
    dtype = dtype or old.dtype
    if topk is None:  # keep SRC's K, unless int8 (dense only) is asked for
        topk = None if dtype == "int8" else old.topk
    elif topk == DENSE:
        topk = None
    indices = indices or (old.indices if topk is not None else "plain")
    new = LogitCodec(dtype, topk, old.num_classes, indices=indices).validate()
    if old.topk is not None and old.topk < old.num_classes and (new.topk is None or new.topk > old.topk):
        want = f"the top {new.topk}" if new.topk is not None else f"dense {'int8 ' if dtype == 'int8' else ''}logits"
        again = f"with --topk {new.topk}" if new.topk is not None else "without --topk"
        raise KDCacheError(f"'{src}' keeps only the top {old.topk} of {old.num_classes} logits per view, so it cannot "
                           f"give {want}: the tail classes' logits were never stored; dump the teacher again {again}")
    return new


def convert_logits(old: LogitCodec, new: LogitCodec, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One piece of rows of SRC's logit arrays {name: [R, V, ...] as stored} -> DST's, as stored.

    The same codec copies the arrays bit for bit (int8 decoded and quantized again could move);
    top-K -> top-K' (K' <= K) keeps the first K' classes and the logsumexp and grows the exact
    tail by the classes dropped (encodings.recode_topk); everything else is decoded to float32 and
    encoded by `new`, as a dump would (so the tail of a dense SRC is exact to SRC's precision).
    """
    if old == new:
        return arrays
    tensors = {name: from_storage(arrays[name], dt) for name, (_, dt) in old.arrays().items()}
    if old.topk is not None and new.topk is not None:
        recoded = recode_topk(old, new, tensors)
    else:
        decoded = old.decode(tensors)
        if old.topk is not None:  # K == C (target_codec refuses K < C): every logit is there, in top-K order
            decoded = decoded.dense()
        if new.topk is None and new.sample is None:  # dense floats: float16 turns logits above 65504 into inf
            _refuse_overflow("logits", decoded, new.dtype)
        recoded = new.encode(decoded)
    return {name: to_storage(t, new.arrays()[name][1]) for name, t in recoded.items()}


def _convert(source, src: str, attrs: dict, old: LogitCodec, new: LogitCodec, dst: str, action: str,
             chunk_bytes: int, fidelity: dict | None = None) -> None:
    partial = stores.partial_path(dst)
    act_from = ActivationCodec.from_attrs(attrs)
    act_to = ActivationCodec.for_logits(new.dtype) if new.dtype != old.dtype else act_from
    # SRC's own encoding attrs go (DST writes its codec's), and so do fidelity figures measured for SRC
    kept = {k: v for k, v in attrs.items() if k not in (*CODEC_ATTRS, "fidelity")}
    root_attrs = dict(
        kept,
        **({"fidelity": fidelity} if fidelity else {}),  # convert --budget: what was measured, and the choice
        schema_version=stores.SCHEMA_VERSION,  # DST is laid out by this kdcache, whatever SRC's age
        kdcache_version=__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        complete=False,
        **new.attrs(),  # dtype, topk, encoding: how DST's logits are stored
        **act_to.attrs(),  # activation_dtype: changed only with the logits' dtype
        converted_from={"path": os.path.abspath(src), "dtype": old.dtype, "topk": old.topk,
                        "kdcache_version": attrs.get("kdcache_version"), "created": attrs.get("created"),
                        **({"converted_from": attrs["converted_from"]} if "converted_from" in attrs else {})},
    )
    # SRC's arrays, dtypes and block records checked before DST is made; each block as it is read
    reads = {split: _checked_reads(source, split, old, act_from) for split in attrs["splits"]}
    splits = {split: _split_specs(source, split, old, new, act_to) for split in attrs["splits"]}
    if action == "resume":
        out = stores.backend_for(partial)(partial, read_only=False)
        _check_resumable(out, root_attrs)
    else:
        _check_free_space(dst, source, splits)
        out = stores.create_store(partial)
        out.update_attrs(root_attrs)
    try:
        for split, specs in splits.items():
            _prepare_split(source, out, split, specs, chunk_bytes, reads[split].read("labels"))
            _convert_split(reads[split], out, split, specs, old, new, act_from, act_to)
        out.update_attrs({"complete": True})  # written last: only now does DST read as complete
    finally:
        out.close()
    stores.publish(partial, dst)  # the old store (--overwrite) goes only once the new one is complete


def _checked_reads(source, split: str, old: LogitCodec, act: ActivationCodec) -> stores.CheckedReads:
    """SRC's split read block by block, each block checked against the checksum its writer recorded
    (a missing chunk reads as zeros, silently, and would be converted as data): every array, labels too."""
    stores.block_rows_of(source, split)  # a store written before blocks is refused in its own line
    stored = source.array_names(split)
    dtypes = stored_dtypes(old, act, [n.removeprefix("activations/") for n in stored if n.startswith("activations/")])
    names = [*dtypes, *(name for name in stored if name not in dtypes)]
    return stores.CheckedReads(source, split, names, dtypes=dtypes)


def _split_specs(source, split: str, old: LogitCodec, new: LogitCodec, act: ActivationCodec) -> dict:
    """{array relative to the split: (shape, storage dtype)} of DST's split, labels aside."""
    n, views = source.array(f"{split}/logits").shape[:2]
    specs = {name: ((n, views) + tail, dt) for name, (tail, dt) in new.arrays().items()}
    for name in source.array_names(split):
        if name in old.arrays() or name == "labels":
            continue
        a = source.array(f"{split}/{name}")
        dt = act.storage_dtype if name.startswith("activations/") else str(np.dtype(a.dtype))
        specs[name] = (tuple(a.shape), dt)
    return specs


def _prepare_split(source, out, split: str, specs: dict, chunk_bytes: int, labels: np.ndarray) -> None:
    """DST's arrays, labels ([N] int64, or [N, L] int32 of a token store) and attrs of a split,
    blocks planned for DST's row sizes."""
    kept = {k: v for k, v in source.get_attrs(split).items() if k not in _WRITTEN_ATTRS}
    stores.create_split(out, split, specs, labels, chunk_bytes, kept)


def _convert_split(reads, out, split: str, specs: dict, old, new, act_from: ActivationCodec,
                   act_to: ActivationCodec) -> None:
    """DST's blocks of one split that are not on disk yet, then the split's completion."""
    attrs = out.get_attrs(split)
    if attrs.get("complete"):
        return
    block, n = attrs["block_rows"], specs["logits"][0][0]
    n_blocks = -(-n // block)
    known = records.read_progress(out, split, specs, n_blocks)
    done = records.blocks_done(known, n_blocks)
    todo = [b for b in range(n_blocks) if b not in done]
    if todo:
        record = records.ProgressRecord(out, split, 0, n_blocks, known)
        arrays = {f"{split}/{key}": out.array(f"{split}/{key}") for key in specs}
        writer.write_blocks(arrays, _converted(reads, split, _spans(todo, block, n), old, new, act_from, act_to),
                            block_rows=block, blocks=todo, record=record, max_pending=MAX_PENDING)
    known = records.read_progress(out, split, specs, n_blocks)
    missing = n_blocks - len(records.blocks_done(known, n_blocks))
    assert missing == 0, f"{missing} blocks of {split} were not written"
    records.finish_split(out, split, known, n)


def _converted(reads, split: str, spans, old, new, act_from: ActivationCodec, act_to: ActivationCodec):
    """SRC's rows of `spans`, piece by piece, re-encoded as DST stores them ({path in DST: rows})."""
    for rows in _read_rows(reads, spans):
        rows.update(convert_logits(old, new, {k: rows.pop(k) for k in old.arrays()}))
        if act_from != act_to:
            rows.update({k: _cast_activation(v, act_from, act_to) for k, v in rows.items() if k.startswith("activations/")})
        yield {f"{split}/{k}": v for k, v in rows.items()}


def _spans(blocks: list[int], block: int, n: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) covering `blocks` (sorted), neighbours merged."""
    spans: list[tuple[int, int]] = []
    for b in blocks:
        start, stop = b * block, min((b + 1) * block, n)
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], stop)
        else:
            spans.append((start, stop))
    return spans


def _read_rows(reads, spans):
    """Yield {array: rows as stored} for the rows of `spans`, in order, in pieces within one SRC block.

    SRC is read in whole blocks (its unit of writing, each checked as it is read: reads is its
    split's CheckedReads), one block in memory at a time however large the store.
    """
    block, names = reads.block_rows, [name for name in reads.names if name != "labels"]
    current, values = None, {}
    for start, stop in spans:
        row = start
        while row < stop:
            b = row // block
            if b != current:
                current, values = b, {name: reads.read_block(name, b) for name in names}
            end = min(stop, (b + 1) * block)
            yield {name: v[row - b * block : end - b * block] for name, v in values.items()}
            row = end


def _cast_activation(values: np.ndarray, old: ActivationCodec, new: ActivationCodec) -> np.ndarray:
    """Stored activations [R, ...] of codec `old` -> stored as `new`'s."""
    t = old.decode(values).float()
    _refuse_overflow("activations", t, new.dtype)
    return to_storage(new.encode(t), new.storage_dtype)


def _refuse_overflow(what: str, values: torch.Tensor, dtype: str) -> None:
    """Stop where finite values [R, ...] would be stored as inf in `dtype` (float16 above 65504), as a dump does."""
    lost = encodings.overflowed(values.flatten(1), dtype)
    if lost.any():
        peak = float(values[lost].abs().max())
        raise KDCacheError(f"SRC's {what} reach {peak:.4g}, which {dtype} stores as inf; convert with --dtype bfloat16 "
                           "or float32 (float32's range) and --overwrite (the partial DST this convert left holds the old dtype)")


def _check_resumable(out, root_attrs: dict) -> None:
    old = out.get_attrs()
    for key in ("teacher", "splits", "dtype", "topk", "encoding", "activation_dtype", "converted_from"):
        if old.get(key) != root_attrs[key]:
            raise KDCacheError(f"cannot resume '{out.path}': its {key} differs from this convert's "
                               f"({old.get(key)} vs {root_attrs[key]}); pass --overwrite to start over")


def _check_free_space(dst: str, source, splits: dict) -> None:
    need = sum(int(np.prod(shape)) * np.dtype(dt).itemsize for specs in splits.values() for shape, dt in specs.values())
    labels = [source.array(f"{split}/labels") for split in splits]
    need += sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in labels)
    stores.check_room(dst, need, "choose another DST, or convert to --topk K or --dtype int8 logits")
