"""`kdcache fidelity`: what each candidate encoding of a store's logits costs on disk and how far its
targets lie from the full ones, measured on a sample of the store's blocks; `convert --budget` picks from it.

Bytes are measured, not estimated: the candidate's arrays for the sample are written through the real
store backend (zarr with its compressor, or HDF5) to a temporary store and its files counted. Fidelity
is taken through the codec interface only: encode the full logits, write, read back, decode, rebuild
the target a student trains towards, compare it with the full target.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdcache import store as stores
from kdcache.encodings import LogitCodec, Sampled, TopK, from_storage, to_storage
from kdcache.errors import KDCacheError

__all__ = ["DEFAULT_KS", "DEFAULT_SAMPLES", "candidate_name", "choose", "default_candidates", "format_report",
           "measure", "parse_budget", "parse_candidate", "rebuilt_log_probs"]

DEFAULT_KS = (8, 16, 32, 64)  # top-k sizes tried: 8 loses the most tail, 64 is ~the float16 row of 32 classes
DEFAULT_SAMPLES = (12, 32)  # sampled draws per row: ~12 match full KD in Anshumann et al. (ACL 2025)
SAMPLE_FLOAT_BYTES = 64 << 20  # the sample's full float32 logits held at once: 16k rows of 1,000 classes, 100 of 152k
MIN_ROWS, MAX_ROWS = 256, 2048  # samples measured: enough blocks to compress as a store does; more only narrows the means (1/sqrt(rows))
ECE_BINS = 15  # equal-width confidence bins: the common choice (Guo et al., ICML 2017)
FULL_PRECISION = ("float32", "float16")  # targets other encodings can be measured against
PIECE_VALUES = 1 << 22  # classes x rows compared at once: a few [rows, C] float32 copies of ~16 MB
_NAME = re.compile(r"(?:top(?P<k>\d+)|sample(?P<s>\d+))?-?(?P<dtype>float32|float16|bfloat16|int8|uint8)?(?P<packed>-packed)?")


# --- candidates -------------------------------------------------------------------------------


def candidate_name(codec: LogitCodec) -> str:
    """float16, int8, top32-float16, top32-uint8-packed, sample12-float16-packed: parse_candidate's names."""
    packed = "-packed" if codec.indices == "packed" else ""
    if codec.sample is not None:
        return f"sample{codec.sample}-{codec.dtype}{packed}"
    if codec.topk is not None:
        return f"top{codec.topk}-{codec.dtype}{packed}"
    return codec.dtype


def parse_candidate(name: str, num_classes: int, temperature: float) -> LogitCodec:
    """The codec a candidate name stands for (sampled ones drawn at `temperature`)."""
    m = _NAME.fullmatch(name.strip().lower())
    example = "float16, int8, top32-float16, top32-uint8-packed, sample12-float16-packed"
    if not m or not (m["k"] or m["s"] or m["dtype"]) or (m["packed"] and not (m["k"] or m["s"])) \
            or (m["dtype"] is None and m["k"]):
        raise KDCacheError(f"unknown candidate {name!r}; name one like {example}")
    k, s = (int(m[g]) if m[g] else None for g in ("k", "s"))
    if (k is not None and k > num_classes) or (s is not None and s == 0):
        raise KDCacheError(f"candidate {name!r} keeps {k or s} classes of the teacher's {num_classes}; pick fewer")
    codec = LogitCodec(m["dtype"] or "float16", k, num_classes, indices="packed" if m["packed"] else "plain",
                       sample=s, sample_temperature=temperature if s else None)
    try:
        return codec.validate()
    except KDCacheError as e:
        raise KDCacheError(f"candidate {name!r}: {e}") from None


def default_candidates(num_classes: int, temperature: float) -> list[LogitCodec]:
    """Dense float16, bfloat16 and int8; top-K for each K of DEFAULT_KS below C in float16, bfloat16,
    float16 with packed indices and uint8 with packed indices; sampled targets of DEFAULT_SAMPLES draws."""
    names = ["float16", "bfloat16", "int8"]
    for k in DEFAULT_KS:
        if k < num_classes:
            names += [f"top{k}-float16", f"top{k}-bfloat16", f"top{k}-float16-packed", f"top{k}-uint8-packed"]
    names += [f"sample{s}-float16-packed" for s in DEFAULT_SAMPLES]
    return [parse_candidate(n, num_classes, temperature) for n in names]


# --- the rebuilt target ------------------------------------------------------------------------


def rebuilt_log_probs(decoded, T: float) -> torch.Tensor:
    """The distribution over all C classes a student is trained towards at temperature T, [R, C]
    log-probabilities, from what a codec decodes (rows [R]):

    dense logits   log_softmax(x / T), what losses.soft_target uses;
    TopK           the sparse K + 1 bins of losses.topk_teacher_bins (train-student's default), the tail
                   bucket's mass spread evenly over the C - K classes it holds (the encoding keeps no
                   more of the tail's shape than that);
    Sampled        the draws' weights counts / S on the classes drawn, 0 (-inf) elsewhere, whatever T
                   (they were drawn at theirs): an unbiased target, so a single row's KL is infinite.
    """
    from kdcache.losses import topk_teacher_bins

    if isinstance(decoded, Sampled):
        out = torch.full((decoded.indices.shape[0], decoded.num_classes), -math.inf)
        # unused slots hold class 0 with weight 0: adding (not scattering) keeps a drawn class 0's weight
        weights = torch.zeros(out.shape, dtype=torch.float32).scatter_add_(1, decoded.indices, decoded.weights())
        return torch.where(weights > 0, weights.log(), out)
    if isinstance(decoded, TopK):
        bins = topk_teacher_bins(decoded, T)
        c, k = decoded.num_classes, decoded.k
        if k == c:
            return torch.empty_like(bins).scatter_(1, decoded.indices, bins)
        tail = (bins[:, k] - math.log(c - k)).unsqueeze(1).expand(-1, c).clone()
        return tail.scatter_(1, decoded.indices, bins[:, :k])
    return F.log_softmax(decoded.float() / T, dim=1)


def _kl(log_p: torch.Tensor, p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, float64; a class with p = 0 adds 0, one with p > 0 and q = 0 makes it inf.
    Clamped at 0: two float32 rows of one distribution sum to ~-1e-8 from their rounding alone."""
    terms = torch.where(p > 0, p.double() * (log_p.double() - log_q.double()), 0.0)
    return terms.sum(dim=1).clamp_(min=0.0)


class _Sums:
    """Running sums of one candidate's fidelity over the sample's rows."""

    def __init__(self):
        self.rows = 0
        self.kl = self.tv = self.agree = 0.0
        self.conf = torch.zeros(ECE_BINS, dtype=torch.float64)
        self.hits = torch.zeros(ECE_BINS, dtype=torch.float64)
        self.count = torch.zeros(ECE_BINS, dtype=torch.float64)

    def add(self, full: tuple, ours_t: torch.Tensor, ours_1: torch.Tensor, labels: torch.Tensor) -> None:
        """full: the full target's (log-probabilities, probabilities) [R, C] at T; ours_t the candidate's
        log-probabilities at T, ours_1 at T = 1; labels [R]."""
        full_t, full_p = full
        self.rows += full_t.shape[0]
        self.kl += float(_kl(full_t, full_p, ours_t).double().sum())
        self.tv += float(0.5 * (full_p - ours_t.exp()).abs().sum(dim=1).double().sum())
        self.agree += float((full_t.argmax(1) == ours_t.argmax(1)).sum())
        conf, pred = ours_1.exp().max(dim=1)
        b = (conf * ECE_BINS).long().clamp_(0, ECE_BINS - 1)
        self.conf.index_add_(0, b, conf.double())
        self.hits.index_add_(0, b, (pred == labels).double())
        self.count.index_add_(0, b, torch.ones_like(conf, dtype=torch.float64))

    def result(self) -> dict:
        ece = float((self.conf - self.hits).abs().sum() / max(self.rows, 1))  # sum_b |B_b| / n * |conf_b - acc_b|
        return {"kl": self.kl / self.rows, "tv": self.tv / self.rows, "top1_agreement": 100.0 * self.agree / self.rows,
                "ece": ece}


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class _Sample:
    """The rows measured: full float32 logits [R, V, C], labels [R], and where they came from."""

    logits: torch.Tensor
    labels: torch.Tensor
    split: str
    total: int  # samples in the split
    blocks: list
    chunk_bytes: int


def measure(path: str, *, split: str | None = None, candidates=None, temperature: float = 4.0,
            rows: int | None = None, suffix: str = ".zarr") -> dict:
    """The fidelity report of the store at `path` (plain data; format_report prints it).

    `candidates`: names (parse_candidate) or codecs; default default_candidates. `split`: default
    train (else the store's first). `rows`: samples measured, default what fits SAMPLE_FLOAT_BYTES of
    float32 logits within MIN_ROWS..MAX_ROWS, taken as whole blocks spread evenly over the split.
    `suffix`: the backend whose bytes are measured (.zarr, or .h5).
    """
    if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise KDCacheError(f"--temperature {temperature!r} must be a positive number: the one students train at")
    with stores.open_store(path) as store:
        stores.check_complete(store)
        attrs = store.get_attrs()
        source = LogitCodec.from_attrs(attrs)
        _check_full(source, path)
        sample = _read_sample(store, attrs, source, split, rows)
    codecs = [c if isinstance(c, LogitCodec) else parse_candidate(c, source.num_classes, temperature)
              for c in (candidates if candidates else default_candidates(source.num_classes, temperature))]
    if not codecs:
        raise KDCacheError("--candidates names none; name at least one, e.g. top32-uint8-packed")
    names = [candidate_name(c) for c in codecs]
    if len(set(names)) != len(names):
        raise KDCacheError(f"--candidates names one twice ({', '.join(names)}); name each once")
    r, v, c = sample.logits.shape
    flat = sample.logits.reshape(r * v, c)
    labels = sample.labels.repeat_interleave(v)  # a mixed view counts as its first sample's class
    with tempfile.TemporaryDirectory(prefix="kdcache-fidelity-") as tmp:
        written = [_write_read(codec, flat, sample, os.path.join(tmp, f"{name}{suffix}")) for codec, name in zip(codecs, names)]
    sums = [_Sums() for _ in codecs]
    full_sums = _Sums()  # the full teacher against itself: its own calibration, for reference
    step = max(1, PIECE_VALUES // c)
    for i in range(0, r * v, step):  # each piece's full targets made once, for every candidate
        full_t = F.log_softmax(flat[i : i + step] / temperature, dim=1)
        full = (full_t, full_t.exp())
        piece_labels = labels[i : i + step]
        full_sums.add(full, full_t, F.log_softmax(flat[i : i + step], dim=1), piece_labels)
        for codec, (stored, _), acc in zip(codecs, written, sums):
            decoded = codec.decode({k: t[i : i + step] for k, t in stored.items()})
            acc.add(full, rebuilt_log_probs(decoded, temperature), rebuilt_log_probs(decoded, 1.0), piece_labels)
    entries = [{"name": name, "codec": codec.attrs(), "bytes_per_sample": on_disk / r,
                "raw_bytes_per_sample": codec.bytes_per_view() * v, **acc.result()}
               for codec, name, (_, on_disk), acc in zip(codecs, names, written, sums)]
    return {"store": str(path), "split": sample.split, "samples": r, "of": sample.total, "views": v,
            "num_classes": c, "temperature": float(temperature), "source_dtype": source.dtype,
            "backend": suffix, "blocks": sample.blocks, "full_ece": full_sums.result()["ece"],
            "candidates": entries}


def _check_full(codec: LogitCodec, path: str) -> None:
    full = codec.dtype in FULL_PRECISION and codec.sample is None and (codec.topk is None or codec.topk == codec.num_classes)
    if not full:
        what = (f"sampled targets ({codec.sample} draws)" if codec.sample else
                f"only the top {codec.topk} of {codec.num_classes} logits" if codec.topk else f"{codec.dtype} logits")
        raise KDCacheError(f"fidelity measures encodings against the full teacher targets, and '{path}' holds {what}; "
                           f"run it on the float32 or float16 store this one was made from (dump-teacher --dtype float16)")


def _read_sample(store, attrs: dict, codec: LogitCodec, split: str | None, rows: int | None) -> _Sample:
    """Whole blocks spread evenly over the split, each checked against its checksum as it is read."""
    splits = [s for s in attrs.get("splits", []) if s in store.group_names()]
    split = split or ("train" if "train" in splits else (splits or [None])[0])
    if split not in splits:
        raise KDCacheError(f"'{store.path}' has no split {split!r}; it has {', '.join(splits) or 'none'}: pass --split")
    n_rows, views = store.array(f"{split}/logits").shape[:2]
    if rows is None:
        rows = SAMPLE_FLOAT_BYTES // (4 * codec.num_classes * views)
        rows = min(max(rows, MIN_ROWS), MAX_ROWS)
    elif isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise KDCacheError(f"--rows {rows!r} must be a positive number of samples to measure")
    rows = min(rows, n_rows)
    block = stores.block_rows_of(store, split)
    n_blocks = -(-n_rows // block)
    wanted = min(n_blocks, -(-rows // block))
    picked = sorted({round(i * (n_blocks - 1) / max(wanted - 1, 1)) for i in range(wanted)})
    reads = stores.CheckedReads(store, split, [*codec.arrays(), "labels"])
    labels = reads.read("labels")
    pieces, label_pieces = [], []
    for b in picked:
        stored = {k: from_storage(reads.read_block(k, b), dt) for k, (_, dt) in codec.arrays().items()}
        decoded = codec.decode(stored)
        pieces.append(decoded.dense() if isinstance(decoded, TopK) else decoded)
        label_pieces.append(torch.from_numpy(np.asarray(labels[b * block : b * block + len(pieces[-1])], dtype=np.int64)))
    logits = torch.cat(pieces)[:rows].float()
    chunk_bytes = (attrs.get("config") or {}).get("chunk_bytes") or stores.CHUNK_BYTES
    return _Sample(logits, torch.cat(label_pieces)[:rows], split, n_rows, picked, chunk_bytes)


def _write_read(codec: LogitCodec, flat: torch.Tensor, sample: _Sample, path: str) -> tuple[dict, int]:
    """Encode the sample, write it as a dump lays out a split (blocks, chunks, shards, the backend's
    compressor), read it back; return ({array: stored rows [R * V, ...] as from_storage gives}, bytes on disk)."""
    r, v = sample.logits.shape[:2]
    encoded = {}
    step = max(1, PIECE_VALUES // codec.num_classes)
    for i in range(0, r * v, step):
        for k, t in codec.encode(flat[i : i + step]).items():
            encoded.setdefault(k, []).append(t)
    arrays = {k: to_storage(torch.cat(ts).reshape(r, v, *ts[0].shape[1:]), codec.arrays()[k][1])
              for k, ts in encoded.items()}
    specs = {k: (a.shape, str(a.dtype)) for k, a in arrays.items()}
    with stores.create_store(path) as out:
        stores.create_split(out, "sample", specs, sample.labels.numpy(), sample.chunk_bytes, {})
        for k, a in arrays.items():
            out.array(f"sample/{k}")[...] = a
    with stores.backend_for(path)(path, read_only=True) as back:
        on_disk = sum(back.stored_bytes(f"sample/{k}") for k in arrays)
        stored = {k: from_storage(np.asarray(back.read(f"sample/{k}")), dt).flatten(0, 1)
                  for k, (_, dt) in codec.arrays().items()}
    stores.remove_store(path)
    return stored, on_disk


# --- reading the report ------------------------------------------------------------------------


def _fmt(x: float, spec: str) -> str:
    return "inf" if math.isinf(x) else format(x, spec)


def format_report(report: dict) -> str:
    """The report as a text table, most faithful first."""
    t = report["temperature"]
    ranked = sorted(report["candidates"], key=_rank)
    ref = next((e for e in ranked if e["name"] == "float16"), None)
    views = f" x {report['views']} views" if report["views"] > 1 else ""
    lines = [f"fidelity of '{report['store']}' split {report['split']}: {report['samples']:,} of {report['of']:,} samples"
             f"{views}"
             f" (blocks {', '.join(map(str, report['blocks']))}), {report['num_classes']:,} classes, against its "
             f"{report['source_dtype']} logits; bytes written through {report['backend']}",
             f"{'candidate':<26}{'B/sample':>10}{'raw B':>9}{'vs fp16':>9}{f'KL (T={t:g})':>13}{f'TV (T={t:g})':>13}"
             f"{'top-1 agree':>13}{'ECE':>8}"]
    for e in ranked:
        ratio = f"{e['bytes_per_sample'] / ref['bytes_per_sample']:.3f}x" if ref else "-"
        lines.append(f"{e['name']:<26}{e['bytes_per_sample']:>10,.1f}{e['raw_bytes_per_sample']:>9,}{ratio:>9}"
                     f"{_fmt(e['kl'], '.5f'):>13}{e['tv']:>13.5f}{e['top1_agreement']:>12.2f}%{e['ece']:>8.4f}")
    lines.append(f"ECE of the full teacher (T = 1 vs the labels): {report['full_ece']:.4f}. KL and TV: mean over rows of "
                 f"the full target against the one each rebuilds at T {t:g} (top-k: K + 1 bins, the tail spread evenly; "
                 f"sampled: its draws, so KL is inf, and unbiased on average)")
    return "\n".join(lines)


def as_json(report: dict) -> dict:
    """The report with inf as None, so json.dumps writes standard JSON."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return clean(report)


def _rank(entry: dict) -> tuple:
    """Most faithful first: the smallest KL at the training temperature, then TV, then bytes."""
    return (entry["kl"], entry["tv"], entry["bytes_per_sample"])


# --- a byte budget -----------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
_BUDGET = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)?\s*(/\s*sample)?\s*", re.IGNORECASE)


def parse_budget(text: str) -> tuple[float, bool]:
    """'64B', '64', '2KB/sample' -> (bytes, True: per sample); '40GB', '1.5TiB' -> (bytes, False: in total)."""
    m = _BUDGET.fullmatch(str(text))
    if not m or float(m[1]) <= 0:
        raise KDCacheError(f"--budget {text!r} is not a size; give bytes per sample (64B, 2KB/sample) or a total (40GB)")
    unit = (m[2] or "").lower()
    return float(m[1]) * _UNITS[unit], bool(m[3]) or unit in ("", "b")


def choose(report: dict, budget: float) -> tuple[dict, str]:
    """The best candidate of `report` whose measured bytes per sample fit `budget`, and one line saying
    which and why. Best: the most faithful, or, when kdcache.probe has ranked the report (rank
    "student"), the one whose probe student scored the highest test top-1 (then the most faithful)."""
    by_student = report.get("rank") == "student"
    entries = sorted(report["candidates"], key=_rank)
    fits = [e for e in entries if e["bytes_per_sample"] <= budget]
    if not fits:
        smallest = min(entries, key=lambda e: e["bytes_per_sample"])
        raise KDCacheError(f"no candidate fits {budget:,.1f} B/sample: the smallest, {smallest['name']}, takes "
                           f"{smallest['bytes_per_sample']:,.1f} B/sample on disk (measured); raise --budget to at least that")
    if by_student:
        fits.sort(key=lambda e: -e["probe_top1"])  # stable: equal top-1 keeps the more faithful first
    best = fits[0]
    t = report["temperature"]
    if by_student:
        p = report["probe"]
        score = lambda e: f"probe top-1 {e['probe_top1']:.2f}"  # noqa: E731
        why = (f"the best probe student ({p['student']}, {p['epochs']} epoch{'s' * (p['epochs'] > 1)}, seed {p['seed']}) "
               f"of the {len(fits)} of {len(entries)} candidates that fit")
    else:
        score = lambda e: f"KL {_fmt(e['kl'], '.3g')}"  # noqa: E731
        why = f"the most faithful of the {len(fits)} of {len(entries)} candidates that fit"
    runner = f"; next {fits[1]['name']} ({score(fits[1])})" if len(fits) > 1 else ""
    line = (f"budget {budget:,.1f} B/sample: {best['name']}, {best['bytes_per_sample']:,.1f} B/sample on disk, "
            f"{score(best) + ', ' if by_student else ''}KL {_fmt(best['kl'], '.3g')} at T {t:g}, top-1 agreement "
            f"{best['top1_agreement']:.2f}%: {why}{runner}")
    return best, line
