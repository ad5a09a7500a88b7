"""Bit-packed top-k indices (ceil(log2 C) bits each) and 8-bit top-k values: exact indices at every
width, bounded value error, and every path a store takes: dump, verify, inspect, train, stream, convert, S3."""
import math

import numpy as np
import pytest
import torch

from kdcache import dump_teacher, train_student
from kdcache import store as stores
from kdcache.convert import convert_store
from kdcache.encodings import (LogitCodec, from_storage, index_bits, pack_indices, recode_topk, to_storage,
                               unpack_indices)
from kdcache.errors import KDCacheError
from kdcache.losses import topk_teacher_bins
from kdcache.report import describe_store, format_report
from kdcache.targets import open_cache
from kdcache.verify import verify_store
from helpers.synthetic_store import stored
from helpers.cli import run
from test_remote import point_at

FAST = dict(dataset="digits", epochs=1, batch_size=128)


def through_storage(codec: LogitCodec, arrays: dict) -> dict:
    """Arrays as encode() gives them -> numpy as stored -> what a reader decodes from."""
    return {n: from_storage(to_storage(arrays[n], dt), dt) for n, (_, dt) in codec.arrays().items()}


# ----------------------------------------------------------------------------- index packing


def test_index_bits_are_ceil_log2_of_the_classes():
    assert [index_bits(c) for c in (1, 2, 3, 4, 5, 10, 1000, 1024, 1025, 152_064, 2**32)] == \
           [1, 1, 2, 2, 3, 4, 10, 10, 11, 18, 32]


@pytest.mark.parametrize("bits", range(1, 33))
def test_packed_indices_decode_exactly_at_every_width(bits):
    c = 2**bits
    g = torch.Generator().manual_seed(bits)
    k = 13  # 13 * bits is a whole number of bytes only for bits = 8, 16, 24, 32: the padding is exercised
    idx = (torch.rand(6, k, generator=g, dtype=torch.float64) * c).long().clamp_(max=c - 1)
    idx[0] = torch.tensor([0, c - 1, c // 2, c // 2 - 1, 1, c - 2] + [c - 1] * 7).clamp_(0, c - 1)  # the extremes
    idx[1] = c - 1  # all bits set
    idx[2] = 0
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (6, math.ceil(k * bits / 8))
    assert torch.equal(unpack_indices(packed, bits, k), idx)
    # through a codec of 2^bits classes and its stored arrays: decode gives the indices back exactly
    codec = LogitCodec("uint8", k, c, indices="packed")
    assert codec.arrays()["topk_indices"] == ((math.ceil(k * bits / 8),), "uint8")
    arrays = {"logits": torch.arange(k, dtype=torch.uint8).expand(6, k), "logits_scale": torch.full((6,), 0.1),
              "topk_indices": packed, "logsumexp": torch.zeros(6), "log_tail": torch.full((6,), -3.0)}
    assert torch.equal(codec.decode(through_storage(codec, arrays)).indices, idx)


def test_the_last_bytes_padding_bits_are_zero():
    packed = pack_indices(torch.tensor([[7, 7, 7]]), 3)  # 9 bits in 2 bytes
    assert packed.tolist() == [[0xFF, 0x01]]


# ----------------------------------------------------------------------------- codecs


def logits_batch(b: int, c: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 4 * torch.randn(b, c, generator=g) + 8 * torch.randn(b, 1, generator=g)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_packed_indices_keep_the_plain_codecs_targets_bit_for_bit(dtype):
    x = logits_batch(7, 1000)
    plain, packed = LogitCodec(dtype, 32, 1000), LogitCodec(dtype, 32, 1000, indices="packed")
    a = plain.decode(through_storage(plain, plain.encode(x)))
    b = packed.decode(through_storage(packed, packed.encode(x)))
    for name in ("values", "indices", "logsumexp", "log_tail"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert packed.arrays()["topk_indices"] == ((40,), "uint8") and plain.arrays()["topk_indices"] == ((32,), "uint16")


def test_uint8_values_are_within_one_step_of_the_true_log_probabilities():
    c, k = 1000, 32
    x = logits_batch(50, c)
    codec = LogitCodec("uint8", k, c, indices="packed")
    enc = codec.encode(x)
    top = codec.decode(through_storage(codec, enc))
    true = torch.log_softmax(x, dim=1).gather(1, top.indices)
    scale = enc["logits_scale"].unsqueeze(1)
    # rounding to a code: scale / 2; rescaling the K to the exact top mass moves them all by at most scale / 2 more
    assert ((top.log_probs() - true).abs() <= scale * (1 + 1e-4) + 1e-5 * true.abs()).all()  # float32 at |log p| ~ 10
    assert torch.equal(top.indices, x.topk(k, dim=1).indices)
    torch.testing.assert_close(top.log_tail, torch.logsumexp(torch.log_softmax(x, 1).scatter(1, top.indices, -math.inf), 1))
    bins = topk_teacher_bins(top, 4.0).exp().sum(1)
    torch.testing.assert_close(bins, torch.ones(50), rtol=1e-5, atol=0)  # the K + 1 bins: a distribution
    assert codec.bytes_per_view() == 84  # 32 codes + 40 bytes of indices + scale, logsumexp, tail


def test_uint8_keeps_a_ruled_out_class_at_probability_zero_and_equal_values_exactly():
    x = torch.tensor([[3.0, -math.inf, -math.inf, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0, -2.0]])
    codec = LogitCodec("uint8", 4, 5)
    top = codec.decode(through_storage(codec, codec.encode(x)))
    p = top.log_probs().exp()
    assert p[0, 3] == 0 and top.indices[0, 3] in (1, 2)  # a -inf class, kept last with probability 0
    torch.testing.assert_close(p[0, :3], torch.softmax(x[0], 0)[[0, 3, 4]], rtol=0.02, atol=0)
    torch.testing.assert_close(p[1], torch.softmax(x[1], 0)[:4], rtol=1e-5, atol=0)  # scale 0: exact


def test_recoding_between_float_and_uint8_values_and_layouts_matches_encoding_directly():
    x = logits_batch(9, 300)
    src = LogitCodec("float32", 16, 300)
    arrays = src.encode(x)
    for new in (LogitCodec("uint8", 16, 300, indices="packed"), LogitCodec("float16", 8, 300, indices="packed")):
        got = new.decode(through_storage(new, recode_topk(src, new, arrays)))
        direct = new.decode(through_storage(new, new.encode(x)))
        assert torch.equal(got.indices, direct.indices)
        torch.testing.assert_close(got.log_probs(), direct.log_probs(), rtol=1e-3, atol=1e-3)
    # packed uint8 -> plain uint8 top-8: codes and scale are kept, so the first 8 classes' ratios are those stored
    old = LogitCodec("uint8", 16, 300, indices="packed")
    new = LogitCodec("uint8", 8, 300)
    packed = old.encode(x)
    out = recode_topk(old, new, packed)
    assert torch.equal(out["logits"], packed["logits"][:, :8]) and torch.equal(out["logits_scale"], packed["logits_scale"])
    assert torch.equal(new.decode(out).indices, old.decode(packed).indices[:, :8])


@pytest.mark.parametrize("codec, hint", [
    (LogitCodec("uint8", None, 10), "add --topk K"),
    (LogitCodec("float16", None, 10, indices="packed"), "add --topk K"),
    (LogitCodec("float16", 3, 10, indices="zip"), "use one of plain, packed"),
])
def test_new_encodings_refuse_what_they_cannot_store_in_one_line(codec, hint):
    with pytest.raises(KDCacheError, match=hint) as err:
        codec.validate()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("codec", [LogitCodec("uint8", 32, 1000, indices="packed"), LogitCodec("bfloat16", 3, 10,
                                                                                                 indices="packed")])
def test_attrs_of_packed_and_uint8_codecs_give_the_codec_back(codec):
    attrs = codec.attrs()
    assert attrs["indices"] == "packed" and attrs["index_bits"] == index_bits(codec.num_classes)
    assert LogitCodec.from_attrs(attrs) == codec


def test_a_reader_refuses_packed_attrs_that_contradict_the_encoding():
    attrs = LogitCodec("float16", 3, 10, indices="packed").attrs()
    with pytest.raises(KDCacheError, match="disagree"):
        LogitCodec.from_attrs(dict(attrs, indices="plain"))  # the encoding still names packed indices


# ----------------------------------------------------------------------------- stores


@pytest.fixture(scope="module")
def packed_cache(teacher_ckpt, tmp_path_factory) -> str:
    """The digits teacher's top-4 (of 10 classes: 4-bit indices) with uint8 values, dumped."""
    return dump_teacher(teacher=teacher_ckpt, dataset="digits", topk=4, dtype="uint8", topk_indices="packed",
                        out=str(tmp_path_factory.mktemp("p") / "p.zarr"))


def test_dump_verify_inspect_a_packed_uint8_cache(packed_cache, fp32_cache, capsys):
    arrays = stored(packed_cache)
    assert arrays["topk_indices"].dtype == np.uint8 and arrays["topk_indices"].shape[1:] == (1, 2)  # 4 x 4 bits
    assert arrays["logits"].dtype == np.uint8 and arrays["logits"].shape[1:] == (1, 4)
    assert verify_store(packed_cache) == []
    full = open_cache(fp32_cache)["test"].logits[:, 0]
    top = open_cache(packed_cache)["test"].logits
    assert torch.equal(top.indices[:, 0], full.topk(4, dim=1).indices)
    report = describe_store(packed_cache)
    assert report["splits"]["test"]["teacher_top1"] == describe_store(fp32_cache)["splits"]["test"]["teacher_top1"]
    code, out, err = run(capsys, "inspect", packed_cache)
    assert code == 0 and "uint8-log-prob-codes-per-row+indices-packed-4bit" in out, err
    assert "uint8-log-prob" in format_report(report)


def test_dump_teacher_takes_the_packing_flags_on_the_command_line(teacher_ckpt, tmp_path, capsys):
    out = str(tmp_path / "c.zarr")
    code, _, err = run(capsys, "dump-teacher", "--teacher", teacher_ckpt, "--dataset", "digits", "--split", "test",
                       "--topk", "3", "--dtype", "float16", "--topk-indices", "packed", "--out", out)
    assert code == 0, err
    assert LogitCodec.from_attrs(stores.open_store(out).get_attrs()) == LogitCodec("float16", 3, 10, indices="packed")
    code, _, err = run(capsys, "dump-teacher", "--teacher", teacher_ckpt, "--dataset", "digits", "--dtype", "uint8",
                       "--out", str(tmp_path / "d.zarr"))
    assert code == 2 and "add --topk K" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("targets_in", ["memory", "stream"])
def test_students_train_from_a_packed_uint8_cache_as_from_a_float16_top_k(packed_cache, fp32_cache, tmp_path, targets_in):
    plain = convert_store(fp32_cache, tmp_path / "top4.zarr", topk=4, dtype="float16")
    ours, theirs = (train_student(cache=c, students=["cnn_tiny"], out=str(tmp_path / name), targets_in=targets_in,
                                  **FAST)[0]["step_losses"] for name, c in (("p", packed_cache), ("f", plain)))
    assert all(map(math.isfinite, ours)) and len(ours) == len(theirs)
    # same seed, same batches, targets a few 8-bit steps apart: the same descent, loss for loss
    np.testing.assert_allclose(ours, theirs, rtol=0.05)


def test_convert_to_and_from_packed_uint8_and_across_backends(packed_cache, fp32_cache, tmp_path):
    # fp32 -> packed uint8 top-4 stores what the dump stored
    converted = convert_store(fp32_cache, tmp_path / "p.zarr", topk=4, dtype="uint8", indices="packed")
    assert stored(converted).keys() == stored(packed_cache).keys()
    for name, values in stored(packed_cache).items():
        np.testing.assert_array_equal(stored(converted)[name], values, err_msg=name)
    # to HDF5 and back: bit for bit; then packed uint8 -> plain float16 top-2
    h5 = convert_store(packed_cache, tmp_path / "p.h5")
    for name, values in stored(packed_cache).items():
        np.testing.assert_array_equal(stored(h5)[name], values, err_msg=name)
    assert verify_store(h5) == []
    plain = convert_store(h5, tmp_path / "t2.zarr", topk=2, dtype="float16", indices="plain")
    attrs = stores.open_store(plain).get_attrs()
    assert "indices" not in attrs and "index_bits" not in attrs  # SRC's layout attrs do not leak into DST
    a, b = open_cache(plain)["test"].logits, open_cache(packed_cache)["test"].logits
    assert torch.equal(a.indices, b.indices[..., :2]) and verify_store(plain) == []


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A bucket of its own on the session's S3 server, with admin credentials in the environment."""
    point_at(s3_server, monkeypatch)
    return s3_server.create_bucket("kdc-packed")


def test_a_packed_cache_at_an_s3_url_reads_and_trains_as_a_local_one(packed_cache, s3_bucket, tmp_path):
    url = f"{s3_bucket}/p.zarr"
    convert_store(packed_cache, url)
    assert verify_store(url) == []
    remote, local = open_cache(url)["train"].logits, open_cache(packed_cache)["train"].logits
    assert torch.equal(remote.indices, local.indices) and torch.equal(remote.values, local.values)
    rows = train_student(cache=url, students=["cnn_tiny"], out=str(tmp_path), targets_in="stream", **FAST)
    assert math.isfinite(rows[0]["top1"])


def test_a_torchrun_dump_of_packed_uint8_targets_is_the_one_process_dump(teacher_ckpt, tmp_path):
    from helpers.torchrun import kdcache
    from test_distributed_dump import DATA, assert_same_store

    # 4-byte rows of codes: 256-row blocks, train's 6 split 3/3 between 2 ranks, on whole batches of 64
    options = dict(dtype="uint8", topk=4, topk_indices="packed", chunk_bytes=1024, batch_size=64)
    single = dump_teacher(teacher=teacher_ckpt, dataset=DATA, out=str(tmp_path / "one.zarr"), **options)
    config = tmp_path / "c.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in options.items()))
    out = tmp_path / "two.zarr"
    done = kdcache(["dump-teacher", "--teacher", teacher_ckpt, "--dataset", DATA, "--out", str(out), "--config",
                    str(config)], nproc=2)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_store(str(out), single)
