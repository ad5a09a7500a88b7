"""Compact encodings of teacher logits: dense float, int8 per-row affine, or top-K with the exact tail.

`LogitCodec.encode` runs on the teacher's device per batch (only the small arrays cross to the
host); `LogitCodec.decode` runs in training after the gather of a batch's rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kdcache.errors import KDCacheError

__all__ = ["DTYPES", "LogitCodec", "TopK", "from_storage", "index_dtype", "overflowed", "recode_topk", "round_float", "to_storage"]

DTYPES = ("float32", "float16", "bfloat16", "int8")  # int8 is for dense logits only
TOPK_VALUE_DTYPES = ("float32", "float16", "bfloat16")
# what a top-k store's `logits` hold (root attr topk_values), always with the float32 log_tail array:
# rounded values are log-probabilities v - lse, float32 ones the raw logits (no rounding, so bit-exact).
# Top-k stores without it (schema 2) rounded raw logits and kept no tail.
TOPK_VALUES = ("log_prob", "logit")

# Torch lacks (or only half supports, device by device) uint16 and uint32, and neither zarr v3 nor
# HDF5 knows bfloat16. So every tensor encode() returns has its storage dtype's item size and, where
# torch has no such type, the same bits in the signed type of that size: to_storage reinterprets
# them with a numpy view and from_storage undoes it. No value ever passes through a float.
_BITS_CARRIER = {"uint16": torch.int16, "uint32": torch.int32}


def index_dtype(num_classes: int) -> str:
    """Smallest unsigned integer dtype that holds class indices 0 .. num_classes - 1.

    Never a float: float16 holds integers exactly only up to 2048, so index 2049 would read back
    as 2048 (and above 4096 every other index is lost).
    """
    assert num_classes >= 1, num_classes
    for name in ("uint8", "uint16", "uint32"):
        if num_classes - 1 <= np.iinfo(name).max:
            return name
    raise KDCacheError(f"{num_classes} classes do not fit uint32 class indices; store dense logits instead of --topk")


# ---------------------------------------------------------------------------------------------
# Host <-> device conversion of one stored array
# ---------------------------------------------------------------------------------------------


def to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """An encoded tensor as the numpy array of storage dtype `dtype`, on the host.

    Tensors of the storage dtype's item size are reinterpreted bit for bit (int16 -> uint16 for
    bfloat16 bits and uint16 indices, int32 -> uint32 indices). Wider integers, e.g. int64
    indices a caller computed itself, are cast after a range check. Anything lossy, such as float32
    to float16, is refused: rounding is encode()'s job.
    """
    target = np.dtype(dtype)
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16
    a = t.detach().cpu().numpy()
    if a.dtype == target:
        return a
    if a.dtype.kind in "iu" and target.kind in "iu":
        if a.dtype.itemsize == target.itemsize:
            return a.view(target)
        info = np.iinfo(target)
        if a.size and (a.min() < info.min or a.max() > info.max):
            raise ValueError(f"to_storage: values {a.min()}..{a.max()} do not fit {dtype}")
        return a.astype(target)
    raise ValueError(f"to_storage: a {t.dtype} tensor cannot be stored as {dtype} without rounding; "
                     f"encode it with LogitCodec.encode first")


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored array read back, as the tensor encode() would have returned (CPU, shares memory).

    uint16 comes back as int16 and uint32 as int32 holding the same bits; decode() knows from the
    codec whether those bits are bfloat16 values or class indices.
    """
    a = np.ascontiguousarray(a)
    if a.dtype != np.dtype(dtype):
        raise ValueError(f"from_storage: array of {a.dtype} but the store declares {dtype}")
    if dtype in _BITS_CARRIER:
        return torch.from_numpy(a.view(np.dtype(dtype.replace("u", ""))))  # uint16 -> int16 bits
    return torch.from_numpy(a)


def _unsigned(t: torch.Tensor) -> torch.Tensor:
    """Class indices as int64 from any carrier: a signed tensor narrower than 64 bits holds bits."""
    if t.dtype in (torch.int8, torch.int16, torch.int32):
        return t.long() & ((1 << (8 * t.element_size())) - 1)
    return t.long()


def _float_bits(t: torch.Tensor) -> torch.Tensor:
    """Stored floats (float32, float16, or bfloat16 as 16-bit integers) -> float32."""
    if t.dtype in (torch.int16, torch.uint16):
        t = t.view(torch.bfloat16)
    return t.float()


# ---------------------------------------------------------------------------------------------
# Top-K teacher
# ---------------------------------------------------------------------------------------------


@dataclass
class TopK:
    """A teacher's K largest logits per row, the full row's logsumexp and the tail's exact log-mass.

    values [..., K] float32 raw logits sorted descending, indices [..., K] int64, logsumexp [...]
    float32, log_tail [...] float32: log of the T = 1 probability of the C - K classes not kept,
    computed from the unrounded logits when the row was encoded (-inf when K == C).

    Why log_tail is stored: the values are rounded (float16, bfloat16), and for a confident teacher
    the rounding error of sum_k exp(v_k - lse) is larger than the tail itself, so 1 - sum_k p_k
    gave a tail of ~0 on 43% of a digits teacher's rows (tail error 100%, T = 4 targets off by a
    total variation of 0.25). With log_tail the tail is exact, and log_probs() rescales the K rounded
    probabilities to the known top mass 1 - tail, so the K + 1 bins always sum to 1.
    How the tail's mass splits over the C - K other classes is not kept.
    """

    values: torch.Tensor
    indices: torch.Tensor
    logsumexp: torch.Tensor
    log_tail: torch.Tensor
    num_classes: int

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def log_tail_mass(self) -> torch.Tensor:
        """log of the tail's probability at T = 1, [...], as stored (-inf: no tail)."""
        return self.log_tail

    def log_probs(self) -> torch.Tensor:
        """The top K classes' log-probabilities at T = 1, [..., K], summing with the tail to exactly 1.

        log p_k = v_k - logsumexp(v) + log(1 - tail): the rounded values fix the ratios within the
        top K, the stored tail their total. A ruled-out class (-inf) keeps probability 0.
        """
        top = torch.log(-torch.expm1(self.log_tail))  # log(1 - tail), exact also for a tail of 1e-30
        return self.values - torch.logsumexp(self.values, dim=-1, keepdim=True) + top.unsqueeze(-1)

    def tail_logit(self) -> torch.Tensor:
        """The one logit every non-top-K class gets under an even spread, [...]:

            l_tail = lse + log(tail_mass / (C - K)),

        so that (C - K) * exp(l_tail - lse) = tail_mass. Needs K < C.
        """
        assert self.k < self.num_classes, "no tail: K == C"
        return self.logsumexp + self.log_tail - math.log(self.num_classes - self.k)

    def dense(self, fill: str = "even") -> torch.Tensor:
        """FKD-style reconstruction of the full logits, [..., C] float32.

        Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022.
        The top-K classes get lse + log_probs(); every other class gets tail_logit(), so softmax at
        T = 1 gives the top K their probabilities and the tail its exact total, spread evenly.
        With K == C the result is exactly the stored logits, scattered back into class order.
        """
        if fill != "even":
            raise ValueError(f"TopK.dense: fill={fill!r} is not known; use fill='even'")
        shape = (*self.values.shape[:-1], self.num_classes)
        if self.k == self.num_classes:
            return self.values.new_empty(shape).scatter_(-1, self.indices, self.values)
        out = self.tail_logit().unsqueeze(-1).expand(shape).clone()
        return out.scatter_(-1, self.indices, self.logsumexp.unsqueeze(-1) + self.log_probs())

    def index_select(self, rows: torch.Tensor) -> TopK:
        """The rows `rows` of the leading dimension (a batch gather)."""
        return TopK(self.values[rows], self.indices[rows], self.logsumexp[rows], self.log_tail[rows], self.num_classes)

    def to(self, device) -> TopK:
        return TopK(self.values.to(device), self.indices.to(device), self.logsumexp.to(device),
                    self.log_tail.to(device), self.num_classes)


# ---------------------------------------------------------------------------------------------
# The codec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitCodec:
    """How one view's logits [C] are stored: the arrays, and encode/decode between them.

    dtype "float32" | "float16" | "bfloat16": dense logits, rounded to that type; with topk the
        type of the top-K values.
    dtype "int8": dense logits, per-row affine: x ~= q * scale + offset, q in [-128, 127], one
        float32 scale and offset per row, |error| <= scale / 2 = (max - min) / 510.
    topk K: the K largest logits sorted descending; rounded to float16/bfloat16 they are stored as
        log-probabilities v_k - lse (their rounding error is then ~|log p_k| ulp, which is 0 for
        the top class however large the raw logits, rather than ~|v_k| ulp: 3-4x closer T = 4
        targets for a confident teacher), in float32 as the raw logits, bit for bit;
        their class indices, the float32 logsumexp lse of the whole row and the float32 log-mass
        of the tail (the classes not kept), computed before rounding; decodes to a TopK.
    -inf logits (a class the teacher rules out) are kept by float dense encodings and by top-k
    (probability 0); int8 refuses them, and NaN or +inf, since its per-row range would be infinite.
    """

    dtype: str  # "float32" | "float16" | "bfloat16" | "int8"
    topk: int | None  # None: dense logits
    num_classes: int  # C, the teacher's output size

    def validate(self) -> LogitCodec:
        """Raise KDCacheError, naming the fix, for a combination that cannot be stored."""
        if self.dtype not in DTYPES:
            raise KDCacheError(f"--dtype {self.dtype!r} is not a logit dtype; use one of {', '.join(DTYPES)}")
        if self.topk is None:
            return self
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or not 1 <= self.topk <= self.num_classes:
            raise KDCacheError(f"--topk {self.topk!r} must be a whole number from 1 to the teacher's "
                               f"{self.num_classes} classes; pick one in that range or drop --topk for dense logits")
        if self.dtype == "int8":
            raise KDCacheError("--topk stores its values as floats and int8 is for dense logits; use --dtype "
                               "float16 (or bfloat16, float32) with --topk, or drop --topk to keep int8")
        return self

    # --- what is stored ---------------------------------------------------------------------

    def arrays(self) -> dict[str, tuple[tuple, str]]:
        """name -> (trailing shape of one view, storage numpy dtype)."""
        c = self.num_classes
        if self.topk is not None:
            return {
                "logits": ((self.topk,), _storage_float(self.dtype)),
                "topk_indices": ((self.topk,), index_dtype(c)),
                "logsumexp": ((), "float32"),  # float32 even for float16 values: v_k = lse + stored
                "log_tail": ((), "float32"),  # exact tail mass: rounded values cannot give 1 - sum p_k
            }
        if self.dtype == "int8":
            return {"logits": ((c,), "int8"), "logits_scale": ((), "float32"), "logits_offset": ((), "float32")}
        return {"logits": ((c,), _storage_float(self.dtype))}

    def bytes_per_view(self) -> int:
        """Uncompressed bytes of one view's logits over all arrays."""
        return sum(math.prod(shape) * np.dtype(dt).itemsize for shape, dt in self.arrays().values())

    def attrs(self) -> dict:
        """The store's root attrs that say how logits were encoded (plain JSON data)."""
        encoding = {"bfloat16": "bfloat16-as-uint16", "int8": "int8-affine-per-row"}.get(self.dtype)
        return {"dtype": self.dtype, "topk": self.topk, "num_classes": self.num_classes, "encoding": encoding,
                "topk_values": self.topk_values}

    @property
    def topk_values(self) -> str | None:
        """What a top-k store's values are: "log_prob" (rounded) or "logit" (float32); None when dense."""
        if self.topk is None:
            return None
        return TOPK_VALUES[1] if self.dtype == "float32" else TOPK_VALUES[0]

    @classmethod
    def from_attrs(cls, d: dict) -> LogitCodec:
        """The codec of a store from its root attrs; num_classes may also come from d["teacher"]."""
        num_classes = d.get("num_classes") or (d.get("teacher") or {}).get("num_classes")
        if "dtype" not in d or num_classes is None:
            raise KDCacheError("the store's attrs do not say how its logits are encoded (dtype, num_classes); "
                               "it was written by an older kdcache: dump the teacher again")
        codec = cls(dtype=d["dtype"], topk=d.get("topk"), num_classes=int(num_classes)).validate()
        if codec.topk is not None and d.get("topk_values") != codec.topk_values:
            raise KDCacheError(f"this top-{codec.topk} cache was written by an older kdcache (schema "
                               f"{d.get('schema_version')}), which rounded the values without keeping the tail's mass, "
                               f"so its targets cannot be rebuilt exactly; dump the teacher again with --topk {codec.topk}")
        if "encoding" in d and d["encoding"] != codec.attrs()["encoding"]:
            raise KDCacheError(f"the store's attrs disagree: dtype {codec.dtype} but encoding {d['encoding']!r}; "
                               f"the store is damaged or hand-edited: dump the teacher again")
        return codec

    # --- per batch ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """logits [..., C] (finite) -> {name: tensor [..., *shape]} for each of arrays(), same device.

        Each tensor has its storage dtype's item size; to_storage(t, dtype) makes the numpy array:
            float32 / float16      torch.float32 / torch.float16
            bfloat16               torch.int16, the bfloat16 bits (stored uint16)
            int8                   logits torch.int8; logits_scale, logits_offset torch.float32 [...]
            topk_indices uint8     torch.uint8
            topk_indices uint16    torch.int16 with the index's bits (>= 32768 reads negative)
            topk_indices uint32    torch.int32 with the index's bits
            logsumexp, log_tail    torch.float32 [...]
        int8 raises KDCacheError on a row with NaN or +-inf, top-k on NaN or +inf (see the class doc).
        """
        assert logits.shape[-1] == self.num_classes, (tuple(logits.shape), self.num_classes)
        x = logits.float()
        if self.topk is not None:
            _refuse(x, torch.isnan(x) | (x == math.inf), f"top-{self.topk} logits")
            lse = torch.logsumexp(x, dim=-1, keepdim=True)
            values, indices = x.topk(self.topk, dim=-1, sorted=True)
            # the tail's log-mass from the unrounded row: logsumexp of every class not kept
            log_tail = torch.logsumexp(x.scatter(-1, indices, -math.inf), dim=-1) - lse.squeeze(-1)
            if self.topk_values == "log_prob":
                values = _clamp_finite(values - lse, self.dtype)
            return {
                "logits": round_float(values, self.dtype),
                "topk_indices": _index_bits(indices, index_dtype(self.num_classes)),
                "logsumexp": lse.squeeze(-1),
                "log_tail": log_tail,
            }
        if self.dtype == "int8":
            _refuse(x, ~torch.isfinite(x), "int8 logits")
            return _int8_encode(x)
        return {"logits": round_float(x, self.dtype)}

    def decode(self, arrays: dict[str, torch.Tensor]) -> torch.Tensor | TopK:
        """Tensors as encode() returns them, or as from_storage() reads them back, any leading shape.

        Dense -> float32 [..., C]; int8 -> q * scale + offset, float32 [..., C]; topk -> TopK.
        """
        if self.topk is not None:
            lse = arrays["logsumexp"].float()
            values = _float_bits(arrays["logits"])
            return TopK(
                values=values + lse.unsqueeze(-1) if self.topk_values == "log_prob" else values,  # raw logits
                indices=_unsigned(arrays["topk_indices"]),
                logsumexp=lse,
                log_tail=arrays["log_tail"].float(),
                num_classes=self.num_classes,
            )
        if self.dtype == "int8":
            scale = arrays["logits_scale"].float().unsqueeze(-1)
            offset = arrays["logits_offset"].float().unsqueeze(-1)
            return arrays["logits"].float() * scale + offset
        return _float_bits(arrays["logits"])


def recode_topk(old: LogitCodec, new: LogitCodec, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Top-K arrays (as encode() returns them) -> `new`'s top-K' (K' <= K), any value dtype.

    The first K' of the sorted classes and the same logsumexp; values of the same dtype are kept bit
    for bit, others rounded from the stored log-probabilities. The tail grows by the K - K' classes
    dropped, with the probabilities training would give them (TopK.log_probs), so it stays exact
    to the source's rounding of those classes.
    """
    assert old.topk is not None and new.topk is not None and new.topk <= old.topk, (old, new)
    k = new.topk
    stored = arrays["logits"]
    if new.dtype == old.dtype:
        values = stored[..., :k]
    else:
        values = _float_bits(stored[..., :k])
        lse = arrays["logsumexp"].float().unsqueeze(-1)
        if old.topk_values == "logit":
            values = values - lse
        values = round_float(_clamp_finite(values, new.dtype), new.dtype) if new.topk_values == "log_prob" else values + lse
    log_tail = arrays["log_tail"].float()
    if k < old.topk:
        dropped = old.decode(arrays).log_probs()[..., k:]
        log_tail = torch.logaddexp(log_tail, torch.logsumexp(dropped, dim=-1))
    return {"logits": values, "topk_indices": arrays["topk_indices"][..., :k], "logsumexp": arrays["logsumexp"],
            "log_tail": log_tail}


def _refuse(x: torch.Tensor, bad: torch.Tensor, what: str) -> None:
    if bad.any():
        row = int(bad.flatten(0, -2).any(dim=-1).nonzero()[0]) if x.dim() > 1 else 0
        raise KDCacheError(f"{what} cannot hold NaN or infinite teacher outputs (row {row} of the batch has one); "
                           "store them dense with --dtype float32, or fix the teacher")


def _clamp_finite(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Finite log-probabilities below the dtype's range (p < e^-65504 in float16, i.e. 0) stay finite."""
    if dtype != "float16":
        return x
    low = torch.finfo(torch.float16).min
    return torch.where(torch.isfinite(x), x.clamp(min=low), x)


def overflowed(source: torch.Tensor, dtype: str) -> torch.Tensor:
    """[...] bool over the leading dims of `source` [..., D]: rows with a finite value that `dtype`
    rounds to inf (float16 above 65504; bfloat16 and float32 span float32's range)."""
    if dtype != "float16":
        return torch.zeros(source.shape[:-1], dtype=torch.bool, device=source.device)
    return (torch.isfinite(source) & torch.isinf(source.to(torch.float16))).any(dim=-1)


def _storage_float(dtype: str) -> str:
    return "uint16" if dtype == "bfloat16" else dtype


def round_float(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Floats in storage dtype `dtype`, on their device: bfloat16 as its int16 bits (stored uint16)."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16)  # stored as uint16: same bits
    return x.to(getattr(torch, dtype))


def _index_bits(indices: torch.Tensor, dtype: str) -> torch.Tensor:
    """int64 indices -> the carrier tensor of `dtype`'s width (see encode)."""
    if dtype == "uint8":
        return indices.to(torch.uint8)
    carrier = _BITS_CARRIER[dtype]
    half = torch.iinfo(carrier).max + 1
    # two's complement by hand: an out-of-range integer cast is not defined the same on every device
    return torch.where(indices >= half, indices - 2 * half, indices).to(carrier)


def _int8_encode(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row affine int8: q = round((x - min) / scale) - 128, scale = (max - min) / 255."""
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    scale = (hi - lo) / 255
    # a constant row stores scale 0 and offset = its value, so it decodes exactly
    step = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((x - lo) / step).clamp_(0, 255) - 128  # clamp: (max - min) / scale may round past 255
    offset = lo + 128 * scale
    return {"logits": q.to(torch.int8), "logits_scale": scale.squeeze(-1), "logits_offset": offset.squeeze(-1)}
