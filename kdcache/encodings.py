"""Compact encodings of teacher logits: dense float, int8 per-row affine, top-K with the exact tail
(float or 8-bit values, plain or bit-packed indices), or S classes sampled from the tempered teacher.

`LogitCodec.encode` runs on the teacher's device per batch (only the small arrays cross to the
host); `LogitCodec.decode` runs in training after the gather of a batch's rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdcache import choices
from kdcache.errors import KDCacheError

__all__ = ["ActivationCodec", "stored_dtypes", "CODEC_ATTRS", "DTYPES", "INDEX_LAYOUTS", "LogitCodec", "Sampled", "TopK", "from_storage", "index_bits", "index_dtype",
           "overflowed", "check_finite", "check_stored", "encode_checked", "pack_indices", "recode_topk", "round_float", "to_storage", "unpack_indices"]

DTYPES = ("float32", "float16", "bfloat16", "int8", "uint8")  # choices.DTYPES; int8: dense logits only, uint8: top-k values only
TOPK_VALUE_DTYPES = ("float32", "float16", "bfloat16", "uint8")
# what a top-k store's `logits` hold (root attr topk_values), always with the float32 log_tail array:
# rounded values are log-probabilities v - lse, float32 ones the raw logits (no rounding, so bit-exact),
# uint8 ones codes of the log-probabilities below the row's largest (with a float32 scale per row).
# Top-k stores without it (schema 2) rounded raw logits and kept no tail.
TOPK_VALUES = ("log_prob", "logit", "log_prob_code")
INDEX_LAYOUTS = choices.INDEX_LAYOUTS  # class indices in the smallest unsigned dtype, or ceil(log2 C) bits each
CODE_MAX = 254  # uint8 top-k codes 0 .. 254 span the row's finite log-probabilities; 255 is probability 0
CODE_ZERO = 255
MAX_DRAWS = 255  # sampled targets: counts are uint8
# every root attr LogitCodec.attrs() may write: a re-encoded store drops SRC's before writing its own
CODEC_ATTRS = ("dtype", "topk", "num_classes", "encoding", "topk_values", "indices", "index_bits", "sample",
               "sample_temperature", "sample_seed")

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


def index_bits(num_classes: int) -> int:
    """Bits of one bit-packed class index: ceil(log2 C), at least 1 (10 at 1,000 classes, 18 at 152k)."""
    assert 1 <= num_classes <= 2**32, num_classes
    return max(1, (num_classes - 1).bit_length())


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 indices [..., K] in [0, 2^bits) -> uint8 [..., ceil(K * bits / 8)], same device.

    Index k takes bits k * bits .. (k + 1) * bits - 1 of the row's bit string, least significant
    first, and byte j holds bits 8j .. 8j + 7 (bit 8j in its lowest place); the last byte's unused
    high bits are 0. Integer shifts and masks only: exact for every width up to 32.
    """
    assert 1 <= bits <= 32, bits
    k = indices.shape[-1]
    shifts = torch.arange(bits, device=indices.device)
    stream = ((indices.long().unsqueeze(-1) >> shifts) & 1).to(torch.uint8).flatten(-2)  # [..., K * bits]
    nbytes = -(-k * bits // 8)
    stream = F.pad(stream, (0, nbytes * 8 - k * bits))
    weights = (1 << torch.arange(8, device=indices.device)).to(torch.int16)
    return (stream.unflatten(-1, (nbytes, 8)).to(torch.int16) * weights).sum(-1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """pack_indices undone: uint8 [..., ceil(K * bits / 8)] -> int64 [..., K], same device."""
    assert 1 <= bits <= 32 and packed.shape[-1] == -(-k * bits // 8), (bits, k, tuple(packed.shape))
    stream = (packed.unsqueeze(-1).long() >> torch.arange(8, device=packed.device)) & 1  # [..., nbytes, 8]
    stream = stream.flatten(-2)[..., : k * bits].unflatten(-1, (k, bits))
    return (stream << torch.arange(bits, device=packed.device)).sum(-1)


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

    def argmax(self, dim: int = -1) -> torch.Tensor:
        """The teacher's class per row [...]: the first kept class (values are sorted), as a dense
        tensor's argmax over its classes (dim must be the class dim)."""
        assert dim in (-1, self.indices.dim() - 1), dim
        return self.indices[..., 0]

    def index_select(self, rows: torch.Tensor) -> TopK:
        """The rows `rows` of the leading dimension (a batch gather)."""
        return TopK(self.values[rows], self.indices[rows], self.logsumexp[rows], self.log_tail[rows], self.num_classes)

    def to(self, device) -> TopK:
        return TopK(self.values.to(device), self.indices.to(device), self.logsumexp.to(device),
                    self.log_tail.to(device), self.num_classes)


@dataclass
class Sampled:
    """S classes drawn per row, with replacement, from the teacher's tempered distribution
    q = softmax(l / T), as distinct classes with their counts: random-sampling KD's targets.

    Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs", ACL 2025:
    unlike the top K, whose renormalised or tail-bucketed targets are biased, the draws give an
    unbiased estimate of the full KD loss and of its gradient (losses.soft_target_sampled).

    indices [..., S] int64 (distinct classes, most drawn first; unused slots hold class 0),
    counts [..., S] float32 (times each was drawn, summing to `draws`; 0 in unused slots),
    log_q [..., S] float32: the proposal's log-probability log q_i of each class drawn at the
    temperature `temperature` (0 in unused slots), what an importance-weighted estimate needs.
    """

    indices: torch.Tensor
    counts: torch.Tensor
    log_q: torch.Tensor
    draws: int
    temperature: float
    num_classes: int

    def weights(self) -> torch.Tensor:
        """counts / draws [..., S]: the sparse target each row's draws give (E[weights] scattered = q)."""
        return self.counts / self.draws

    def argmax(self, dim: int = -1) -> torch.Tensor:
        """The class drawn most often per row [...] (slot 0): a sampled target's top-1 class, as a
        dense tensor's argmax over its classes gives the teacher's (dim must be the class dim)."""
        assert dim in (-1, self.indices.dim() - 1), dim
        return self.indices[..., 0]

    def index_select(self, rows: torch.Tensor) -> Sampled:
        return Sampled(self.indices[rows], self.counts[rows], self.log_q[rows], self.draws, self.temperature,
                       self.num_classes)

    def to(self, device) -> Sampled:
        return Sampled(self.indices.to(device), self.counts.to(device), self.log_q.to(device), self.draws,
                       self.temperature, self.num_classes)


# ---------------------------------------------------------------------------------------------
# The codec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitCodec:
    """How one view's logits [C] are stored: the arrays, and encode/decode between them.

    dtype "float32" | "float16" | "bfloat16": dense logits, rounded to that type; with topk the
        type of the top-K values; with sample the type of the drawn classes' log q.
    dtype "int8": dense logits, per-row affine: x ~= q * scale + offset, q in [-128, 127], one
        float32 scale and offset per row, |error| <= scale / 2 = (max - min) / 510.
    topk K: the K largest logits sorted descending; rounded to float16/bfloat16 they are stored as
        log-probabilities v_k - lse (their rounding error is then ~|log p_k| ulp, which is 0 for
        the top class however large the raw logits, rather than ~|v_k| ulp: 3-4x closer T = 4
        targets for a confident teacher), in float32 as the raw logits, bit for bit;
        their class indices, the float32 logsumexp lse of the whole row and the float32 log-mass
        of the tail (the classes not kept), computed before rounding; decodes to a TopK.
    dtype "uint8" (top-k only): the values as 8-bit codes of how far each log-probability lies below
        the row's largest, c_k = round((log p_1 - log p_k) / scale), scale = (log p_1 - log p_K) / 254
        (float32, per row), 255 for probability 0: |error| <= scale / 2 before the K are rescaled to
        the exact top mass 1 - tail (which moves each by at most scale / 2 more).
    indices "packed" (top-k, sample): class indices bit-packed, index_bits(C) bits each, into uint8
        bytes (pack_indices): 32 indices of 1,000 classes take 40 bytes, not 64.
    sample S: S classes drawn per row (with replacement) from softmax(l / sample_temperature),
        stored as distinct classes (uint8 counts) with their log-probability under that proposal;
        the draws are a pure function of the row's logits and sample_seed (a counter-based hash,
        so a resumed, converted or distributed dump draws the same); decodes to a Sampled.
    -inf logits (a class the teacher rules out) are kept by float dense encodings and by top-k
    (probability 0) and never drawn; int8 refuses them, and NaN or +inf, since its per-row range
    would be infinite.
    """

    dtype: str  # "float32" | "float16" | "bfloat16" | "int8" | "uint8" (top-k only)
    topk: int | None  # None: dense logits
    num_classes: int  # C, the teacher's output size
    indices: str = "plain"  # top-k / sampled class indices: "plain" (uint8/16/32) or "packed" (index_bits(C) each)
    sample: int | None = None  # S draws per row: sampled targets (random-sampling KD) instead of logits
    sample_temperature: float | None = None  # the proposal's T: sampled targets train at this temperature only
    sample_seed: int = 0  # with the row's logits, names its draws for good

    def validate(self) -> LogitCodec:
        """Raise KDCacheError, naming the fix, for a combination that cannot be stored."""
        if self.dtype not in DTYPES:
            raise KDCacheError(f"--dtype {self.dtype!r} is not a logit dtype; use one of {', '.join(DTYPES)}")
        if self.indices not in INDEX_LAYOUTS:
            raise KDCacheError(f"--topk-indices {self.indices!r} is not a layout; use one of {', '.join(INDEX_LAYOUTS)}")
        if self.sample is not None:
            return self._validate_sample()
        if self.topk is None:
            if self.dtype == "uint8":
                raise KDCacheError("--dtype uint8 stores 8-bit codes of top-k log-probabilities; add --topk K, or use "
                                   "--dtype int8 for dense logits")
            if self.indices == "packed":
                raise KDCacheError("--topk-indices packed packs the class indices of top-k (or sampled) targets; add "
                                   "--topk K, or drop --topk-indices for dense logits")
            return self
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or not 1 <= self.topk <= self.num_classes:
            raise KDCacheError(f"--topk {self.topk!r} must be a whole number from 1 to the teacher's "
                               f"{self.num_classes} classes; pick one in that range or drop --topk for dense logits")
        if self.dtype == "int8":
            raise KDCacheError("--topk stores its values as floats (or 8-bit codes, --dtype uint8) and int8 is for "
                               "dense logits; use --dtype float16 (or bfloat16, float32, uint8) with --topk, or drop "
                               "--topk to keep int8")
        if self.indices == "packed" and self.num_classes > 2**32:
            raise KDCacheError(f"{self.num_classes} classes need more than 32 bits an index; use --topk-indices plain")
        return self

    def _validate_sample(self) -> LogitCodec:
        s, t = self.sample, self.sample_temperature
        if self.topk is not None:
            raise KDCacheError("--sample draws classes from the whole teacher distribution and --topk keeps the largest; "
                               "pass one of them")
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= MAX_DRAWS:
            raise KDCacheError(f"--sample {s!r} must be a whole number of draws per row from 1 to {MAX_DRAWS} "
                               "(counts are stored in 8 bits); ~12 match full KD in Anshumann et al. 2025")
        if self.dtype not in TOPK_VALUE_DTYPES[:3]:
            raise KDCacheError(f"--sample stores each drawn class's log-probability as a float, not {self.dtype}; "
                               "use --dtype float16 (or float32, bfloat16)")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
            raise KDCacheError(f"--sample-temperature {t!r} must be a positive number: the temperature students "
                               "will train at (train-student --temperature, default 4)")
        if isinstance(self.sample_seed, bool) or not isinstance(self.sample_seed, int) or not 0 <= self.sample_seed < 2**32:
            raise KDCacheError(f"--sample-seed {self.sample_seed!r} must be a whole number from 0 to 2^32 - 1")
        return self

    @property
    def index_bits(self) -> int:
        """Bits of one packed class index (index_bits(C))."""
        return index_bits(self.num_classes)

    # --- what is stored ---------------------------------------------------------------------

    def arrays(self) -> dict[str, tuple[tuple, str]]:
        """name -> (trailing shape of one view, storage numpy dtype)."""
        c = self.num_classes
        if self.sample is not None:
            s = self.sample
            return {
                "logits": ((s,), _storage_float(self.dtype)),  # log q of each class drawn: a loss value, not its gradient
                "sample_indices": self._index_array(s),
                "sample_counts": ((s,), "uint8"),  # 0 marks a slot left unused (fewer distinct classes than draws)
            }
        if self.topk is not None:
            if self.dtype == "uint8":
                values = {"logits": ((self.topk,), "uint8"), "logits_scale": ((), "float32")}
            else:
                values = {"logits": ((self.topk,), _storage_float(self.dtype))}
            return {
                **values,
                "topk_indices": self._index_array(self.topk),
                "logsumexp": ((), "float32"),  # float32 even for float16 values: v_k = lse + stored
                "log_tail": ((), "float32"),  # exact tail mass: rounded values cannot give 1 - sum p_k
            }
        if self.dtype == "int8":
            return {"logits": ((c,), "int8"), "logits_scale": ((), "float32"), "logits_offset": ((), "float32")}
        return {"logits": ((c,), _storage_float(self.dtype))}

    def _index_array(self, n: int) -> tuple[tuple, str]:
        if self.indices == "packed":
            return (-(-n * self.index_bits // 8),), "uint8"
        return (n,), index_dtype(self.num_classes)

    def bytes_per_view(self) -> int:
        """Uncompressed bytes of one view's logits over all arrays."""
        return sum(math.prod(shape) * np.dtype(dt).itemsize for shape, dt in self.arrays().values())

    def attrs(self) -> dict:
        """The store's root attrs that say how logits were encoded (plain JSON data). The keys of the
        encodings of schema 3 (dense, float top-k with plain indices) are those it wrote; packed
        indices and sampled targets add theirs."""
        value = {"bfloat16": "bfloat16-as-uint16", "int8": "int8-affine-per-row",
                 "uint8": "uint8-log-prob-codes-per-row"}.get(self.dtype)
        parts = [f"sampled-{self.sample}-at-T{self.sample_temperature:g}-seed{self.sample_seed}"] if self.sample else []
        parts += [value] if value else []
        parts += [f"indices-packed-{self.index_bits}bit"] if self.indices == "packed" else []
        out = {"dtype": self.dtype, "topk": self.topk, "num_classes": self.num_classes,
               "encoding": "+".join(parts) or None, "topk_values": self.topk_values}
        if self.indices == "packed":
            out.update(indices="packed", index_bits=self.index_bits)
        if self.sample is not None:
            out.update(sample=self.sample, sample_temperature=self.sample_temperature, sample_seed=self.sample_seed)
        return out

    @property
    def topk_values(self) -> str | None:
        """What a top-k store's values are: "log_prob" (rounded), "logit" (float32) or "log_prob_code"
        (uint8); None when dense or sampled."""
        if self.topk is None:
            return None
        if self.dtype == "uint8":
            return TOPK_VALUES[2]
        return TOPK_VALUES[1] if self.dtype == "float32" else TOPK_VALUES[0]

    @classmethod
    def from_attrs(cls, d: dict) -> LogitCodec:
        """The codec of a store from its root attrs; num_classes may also come from d["teacher"]."""
        num_classes = d.get("num_classes") or (d.get("teacher") or {}).get("num_classes")
        if "dtype" not in d or num_classes is None:
            raise KDCacheError("the store's attrs do not say how its logits are encoded (dtype, num_classes); "
                               "it was written by an older kdcache: dump the teacher again")
        codec = cls(dtype=d["dtype"], topk=d.get("topk"), num_classes=int(num_classes), indices=d.get("indices", "plain"),
                    sample=d.get("sample"), sample_temperature=d.get("sample_temperature"),
                    sample_seed=d.get("sample_seed", 0)).validate()
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
            uint8 top-k values     logits torch.uint8 codes; logits_scale torch.float32 [...]
            topk_indices uint8     torch.uint8 (also every packed index array)
            topk_indices uint16    torch.int16 with the index's bits (>= 32768 reads negative)
            topk_indices uint32    torch.int32 with the index's bits
            logsumexp, log_tail    torch.float32 [...]
            sample_counts          torch.uint8
        int8 raises KDCacheError on a row with NaN or +-inf, top-k and sample on NaN or +inf (see the class doc).
        """
        assert logits.shape[-1] == self.num_classes, (tuple(logits.shape), self.num_classes)
        x = logits.float()
        if self.sample is not None:
            _refuse_nan_or_inf(x, f"sampled ({self.sample} draws)")
            return self._encode_sampled(x)
        if self.topk is not None:
            _refuse_nan_or_inf(x, f"top-{self.topk} logits")
            values, indices = x.topk(self.topk, dim=-1, sorted=True)
            lse, log_tail = _lse_and_log_tail(x, values, indices)
            lse = lse.unsqueeze(-1)
            return {**self._topk_values(values, values - lse), "topk_indices": self._store_indices(indices),
                    "logsumexp": lse.squeeze(-1), "log_tail": log_tail}
        if self.dtype == "int8":
            _refuse(x, ~torch.isfinite(x), "int8 logits")
            return _int8_encode(x)
        return {"logits": round_float(x, self.dtype)}

    def _topk_values(self, raw: torch.Tensor, log_probs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored form of the K values: raw logits [..., K] float32 and their log-probabilities."""
        if self.topk_values == "logit":
            return {"logits": round_float(raw, "float32")}
        if self.topk_values == "log_prob_code":
            return _code_log_probs(log_probs)
        return {"logits": round_float(_clamp_finite(log_probs, self.dtype), self.dtype)}

    def _store_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 class indices [..., n] -> their stored carrier (plain) or bytes (packed)."""
        if self.indices == "packed":
            return pack_indices(indices, self.index_bits)
        return _index_bits(indices, index_dtype(self.num_classes))

    def _read_indices(self, stored: torch.Tensor, n: int) -> torch.Tensor:
        """Stored class indices (any carrier) -> int64 [..., n]."""
        if self.indices == "packed":
            return unpack_indices(stored, self.index_bits, n)
        return _unsigned(stored)

    def _encode_sampled(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [..., C] float32 -> the S draws of every row, in row pieces of ~4M classes (the draws
        hold a few float64 and int64 copies of a piece: ~200 MB, not a block's gigabytes)."""
        lead, c = x.shape[:-1], self.num_classes
        flat = x.reshape(-1, c)
        step = max(1, (1 << 22) // c)
        pieces = [self._draw(flat[i : i + step]) for i in range(0, flat.shape[0], step)]
        if not pieces:
            pieces = [self._draw(flat)]
        joined = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
        return {k: t.reshape(*lead, *t.shape[1:]) for k, t in joined.items()}

    def _draw(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """rows [R, C] float32 -> the stored arrays of their draws: inverse-CDF sampling of
        softmax(rows / T) in float64 at counter-hash uniforms (_row_uniforms)."""
        r, s = rows.shape[0], self.sample
        log_q = torch.log_softmax(rows.double() / self.sample_temperature, dim=-1)  # [R, C]
        cdf = log_q.exp().cumsum(-1)
        u = _row_uniforms(rows, self.sample_seed, s) * cdf[:, -1:]  # in (0, total): class i on [cdf_{i-1}, cdf_i)
        drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=self.num_classes - 1).sort(-1).values  # [R, S]
        first = torch.ones_like(drawn, dtype=torch.bool)
        first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
        slot = first.long().cumsum(-1) - 1  # the distinct class each draw counts for
        counts = torch.zeros(r, s, dtype=torch.long, device=rows.device).scatter_add_(1, slot, torch.ones_like(slot))
        classes = torch.zeros_like(drawn).scatter_(1, slot, drawn)
        counts, order = counts.sort(dim=-1, descending=True, stable=True)  # most drawn first: slot 0 is the top-1
        classes = classes.gather(1, order)
        used = counts > 0
        classes = torch.where(used, classes, 0)
        lq = torch.where(used, log_q.gather(1, classes), 0.0).float()
        return {"logits": round_float(_clamp_finite(lq, self.dtype), self.dtype),
                "sample_indices": self._store_indices(classes), "sample_counts": counts.to(torch.uint8)}

    def predictions(self, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's class [...] per row of stored arrays (as decode takes them), any encoding:
        what teacher top-1 and a student's agreement with the teacher are measured against."""
        return self.decode(arrays).argmax(-1)

    def decode(self, arrays: dict[str, torch.Tensor]) -> torch.Tensor | TopK | Sampled:
        """Tensors as encode() returns them, or as from_storage() reads them back, any leading shape.

        Dense -> float32 [..., C]; int8 -> q * scale + offset, float32 [..., C]; topk -> TopK;
        sample -> Sampled.
        """
        if self.sample is not None:
            return Sampled(indices=self._read_indices(arrays["sample_indices"], self.sample),
                           counts=arrays["sample_counts"].float(), log_q=_float_bits(arrays["logits"]),
                           draws=self.sample, temperature=float(self.sample_temperature), num_classes=self.num_classes)
        if self.topk is not None:
            lse = arrays["logsumexp"].float()
            log_tail = arrays["log_tail"].float()
            if self.topk_values == "logit":
                values = _float_bits(arrays["logits"])  # the raw logits, bit for bit
            else:
                values = _stored_log_probs(self, arrays, lse, log_tail) + lse.unsqueeze(-1)
            return TopK(
                values=values,
                indices=self._read_indices(arrays["topk_indices"], self.topk),
                logsumexp=lse,
                log_tail=log_tail,
                num_classes=self.num_classes,
            )
        if self.dtype == "int8":
            scale = arrays["logits_scale"].float().unsqueeze(-1)
            offset = arrays["logits_offset"].float().unsqueeze(-1)
            return arrays["logits"].float() * scale + offset
        return _float_bits(arrays["logits"])


def _stored_log_probs(codec: LogitCodec, arrays: dict, lse: torch.Tensor, log_tail: torch.Tensor) -> torch.Tensor:
    """A top-k store's values as log-probabilities at T = 1, [..., K] float32: rounded ones as stored,
    float32 raw logits less lse, uint8 codes placed below the exact top mass 1 - tail (TopK.log_probs
    rescales them all to that mass again, a no-op for the codes)."""
    stored = arrays["logits"]
    if codec.topk_values == "logit":
        return _float_bits(stored) - lse.unsqueeze(-1)
    if codec.topk_values == "log_prob":
        return _float_bits(stored)
    rel = torch.where(stored == CODE_ZERO, -math.inf, -stored.float() * arrays["logits_scale"].float().unsqueeze(-1))
    # the codes fix the K log-probabilities up to one shift; the exact top mass 1 - tail fixes it
    top = torch.log(-torch.expm1(log_tail))
    return rel - torch.logsumexp(rel, dim=-1, keepdim=True) + top.unsqueeze(-1)


def recode_topk(old: LogitCodec, new: LogitCodec, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Top-K arrays (as encode() returns them) -> `new`'s top-K' (K' <= K), any value dtype and index layout.

    The first K' of the sorted classes and the same logsumexp; values of the same dtype are kept bit
    for bit (uint8 codes with their scale), others made from the stored log-probabilities. Indices
    of the same plain layout are kept bit for bit, others unpacked and stored anew. The tail grows
    by the K - K' classes dropped, with the probabilities training would give them
    (TopK.log_probs), so it stays exact to the source's rounding of those classes.
    """
    assert old.topk is not None and new.topk is not None and new.topk <= old.topk, (old, new)
    k = new.topk
    lse = arrays["logsumexp"].float()
    log_tail = arrays["log_tail"].float()
    if new.dtype == old.dtype:
        values = {"logits": arrays["logits"][..., :k]}
        if old.dtype == "uint8":  # codes below the row's largest: the first K' keep their meaning and scale
            values["logits_scale"] = arrays["logits_scale"]
    else:
        log_probs = _stored_log_probs(old, arrays, lse, log_tail)[..., :k]
        values = new._topk_values(log_probs + lse.unsqueeze(-1), log_probs)
    if new.indices == old.indices == "plain":
        indices = arrays["topk_indices"][..., :k]
    else:
        indices = new._store_indices(old._read_indices(arrays["topk_indices"], old.topk)[..., :k])
    if k < old.topk:
        dropped = old.decode(arrays).log_probs()[..., k:]
        log_tail = torch.logaddexp(log_tail, torch.logsumexp(dropped, dim=-1))
    return {**values, "topk_indices": indices, "logsumexp": arrays["logsumexp"], "log_tail": log_tail}


def activation_dtype(dtype: str) -> str:
    """Activations keep a float dtype: int8's per-row affine quantization and uint8 top-k codes are for logits only."""
    return "float16" if dtype in ("int8", "uint8") else dtype


@dataclass(frozen=True)
class ActivationCodec:
    """How a store keeps activations, beside LogitCodec for its logits: one float dtype (float32,
    float16, or bfloat16 kept as its uint16 bits), whatever the logits' encoding.

    encode: float tensor -> the tensor to_storage writes (rounded on its device); decode: a stored
    array -> a tensor of the logical dtype (bfloat16 viewed from its bits, no copy)."""

    dtype: str = "float16"

    @classmethod
    def for_logits(cls, logit_dtype: str) -> "ActivationCodec":
        """What a dump stores activations as beside logits of `logit_dtype` (int8 and uint8: float16)."""
        return cls(activation_dtype(logit_dtype))

    @classmethod
    def from_attrs(cls, attrs: dict) -> "ActivationCodec":
        """A store's, from its root attrs (activation_dtype; stores older than it: from the logits' dtype)."""
        return cls(attrs.get("activation_dtype") or activation_dtype(attrs.get("dtype", "float16")))

    @property
    def storage_dtype(self) -> str:
        """The dtype of the arrays on disk (bfloat16: uint16)."""
        return "uint16" if self.dtype == "bfloat16" else self.dtype

    def attrs(self) -> dict:
        return {"activation_dtype": self.dtype}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return round_float(x, self.dtype)

    def decode(self, values: np.ndarray) -> torch.Tensor:
        t = from_storage(values, self.storage_dtype)
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t


def stored_dtypes(codec: LogitCodec, act: ActivationCodec, activations) -> dict[str, str]:
    """{array relative to a split: the storage dtype the root attrs say it holds}, for the logit
    arrays of `codec` and the named `activations` (what checked reads and verify hold arrays to)."""
    return {**{k: dt for k, (_, dt) in codec.arrays().items()},
            **{f"activations/{n}": act.storage_dtype for n in activations}}


TAIL_EXACT_BELOW = 1e-30  # a tail this far below the top class is summed again, shifted by its own largest logit


def _lse_and_log_tail(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row's logsumexp [...] and the log-mass of the classes not in `indices` [...] (-inf when
    all are kept), from the unrounded logits x [..., C] with their top values [..., K] (sorted).

    One exp pass serves both: e = exp(x - top), lse = top + log(sum e), tail = sum of e outside the
    top K (the kept entries zeroed, never subtracted, so nothing cancels). Where the tail is below
    TAIL_EXACT_BELOW of the top class, float32's exp may have lost it to underflow: those rows are
    summed again shifted by the tail's own largest logit, as logsumexp would, so the tail stays exact.
    """
    top = values[..., :1]
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row of -inf: no NaN from -inf - -inf
    e = torch.exp(x - top)
    total = e.sum(-1)
    lse = top.squeeze(-1) + torch.log(total)
    if indices.shape[-1] == x.shape[-1]:
        return lse, torch.full_like(lse, -math.inf)
    tail = e.scatter_(-1, indices, 0.0).sum(-1)
    log_tail = torch.log(tail) - torch.log(total)
    small = tail < TAIL_EXACT_BELOW
    if bool(small.any()):
        rows = x[small].scatter(-1, indices[small], -math.inf)
        log_tail[small] = torch.logsumexp(rows, dim=-1) - lse[small]
    return lse, log_tail


def _refuse_nan_or_inf(x: torch.Tensor, what: str) -> None:
    """_refuse NaN and +inf (-inf is a class ruled out); one sum over the batch when there are none."""
    if not bool(torch.isfinite(x.sum())):  # a NaN or an inf anywhere makes the sum non-finite
        _refuse(x, torch.isnan(x) | (x == math.inf), what)


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


def _code_log_probs(log_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sorted log-probabilities [..., K] -> uint8 codes of their distance below the row's largest,
    c = round((log p_1 - log p_k) / scale), scale = (log p_1 - log p_K) / 254 per row (finite ones;
    255: a class of probability 0). A row whose K are equal stores scale 0 and codes 0."""
    rel = log_probs - log_probs[..., :1]  # <= 0, sorted descending; -inf for a ruled-out class
    finite = torch.isfinite(rel)
    span = torch.where(finite, -rel, 0.0).amax(dim=-1, keepdim=True)
    scale = span / CODE_MAX
    step = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.where(finite, torch.round(-rel / step).clamp_(0, CODE_MAX), float(CODE_ZERO))  # clamp: rounding past 254
    return {"logits": codes.to(torch.uint8), "logits_scale": scale.squeeze(-1)}


# --- counter-based hashing: the draws of sampled targets ------------------------------------
# A row's draws depend on its logits and the seed only, never on the batch it came in, the device's
# generator state or the rank: a resumed, re-run or converted dump stores the same classes. Integer
# ops on non-negative int64 holding 32-bit values, so no product overflows and >> is logical.

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), in two 16-bit halves of c: no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash, Wellons' lowbias32 (bias 0.17 of an ideal hash's avalanche)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _row_uniforms(rows: torch.Tensor, seed: int, n: int) -> torch.Tensor:
    """[R, C] float32 rows -> [R, n] float64 uniforms in (0, 1), a pure function of each row's bits,
    the seed and the draw number."""
    c = rows.shape[-1]
    bits = rows.float().contiguous().view(torch.int32).long() & _M32
    salt = _mix32(torch.arange(c, device=rows.device))  # a class's position matters, not just its value
    h = _mix32(bits ^ salt).sum(-1)  # [R], < C * 2^32: no overflow below 2^31 classes
    key = _mix32(_mix32((h ^ (h >> 32)) & _M32) ^ _mix32(torch.tensor(seed, device=rows.device)))
    draw = _mul32(torch.arange(1, n + 1, device=rows.device), 0x9E3779B9)  # Weyl sequence of the draw numbers
    u = _mix32((_mix32(key.unsqueeze(-1) ^ draw) + key.unsqueeze(-1)) & _M32)
    return (u.double() + 0.5) / 2.0**32


# ---------------------------------------------------------------------------------------------
# The teacher's outputs checked before they are stored (dump-teacher, images and tokens alike)
# ---------------------------------------------------------------------------------------------


def encode_checked(codec: LogitCodec, logits: torch.Tensor, first_row: int, *, allow_nonfinite: bool = False) -> dict:
    """codec.encode(logits [B, ...]) after refusing NaN/inf teacher rows (unless allow_nonfinite), and
    refusing finite rows that the stored dtype would turn into inf; `first_row`: the batch's first sample."""
    if not allow_nonfinite:
        check_finite(logits.flatten(1), first_row)
    encoded = codec.encode(logits)
    check_stored("logits", logits.flatten(1), _decoded_rows(codec, encoded, len(logits)), codec.dtype, first_row)
    return encoded


def finite_rows(values: torch.Tensor) -> torch.Tensor:
    """[B] bool, True where row b of values [B, ...] holds no NaN or inf: one sum per row, and the exact
    test only for rows whose sum is not finite (a NaN or inf in them, or finite values summing past
    float32's range)."""
    ok = torch.isfinite(values.sum(dim=1))
    if not bool(ok.all()):
        ok = ok | torch.isfinite(values).all(dim=1)
    return ok


def check_finite(values: torch.Tensor, first_row: int, what: str = "output") -> None:
    """`values` [B, ...]: stop at the first sample with a NaN or Inf anywhere in its row."""
    bad = ~finite_rows(values)
    if bad.any():
        row = first_row + int(bad.nonzero()[0])
        raise KDCacheError(f"teacher {what} for sample {row} is not finite (NaN or Inf); check the teacher weights "
                           "and input, or pass --allow-nonfinite to keep such rows")


def _decoded_rows(codec, encoded: dict, b: int) -> torch.Tensor:
    """What a reader gets back from `encoded`, [B, V * ...] float32 (top-k: the values; sampled: their log q)."""
    decoded = codec.decode(encoded)
    if isinstance(decoded, Sampled):
        return decoded.log_q.reshape(b, -1)
    return (decoded.values if isinstance(decoded, TopK) else decoded).reshape(b, -1)


def check_stored(what: str, source: torch.Tensor, decoded: torch.Tensor | None, dtype: str, first_row: int) -> None:
    """Stop where a finite teacher value [B, ...] would be stored as inf/NaN: float16 rounds values
    above 65504 to inf (checked after the teacher's own finiteness, which --allow-nonfinite waives),
    int8's per-row scale can overflow. Training on such a row gives NaN losses."""
    finite = finite_rows(source)
    if decoded is not None:
        lost = finite & ~torch.isfinite(decoded).all(dim=1)
    else:
        lost = overflowed(source, dtype)
    if lost.any():
        row = first_row + int(lost.nonzero()[0])
        peak = float(source[lost][0].abs().max())
        raise KDCacheError(f"teacher {what} for sample {row} reaches {peak:.4g}, which {dtype} stores as inf; "
                           "dump with --dtype bfloat16 or float32 (same range as the teacher's float32) and --overwrite "
                           "(the partial store this dump left holds the old dtype)")
