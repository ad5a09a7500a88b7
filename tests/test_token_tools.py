"""verify, convert and inspect on token caches: the stored sequences are the text's, conversions keep them."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import zarr

from kdcache import dump_teacher, train_student
from kdcache import store as stores
from kdcache.convert import convert_store
from kdcache.report import describe_store, format_report
from kdcache.store.records import chunk_checksum
from kdcache.verify import verify_store
from helpers.cli import one_line, run

SEQ = dict(seq_len=16, max_sequences=32)  # 32 sequences of 16 tokens a split: one block each


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A tiny causal LM with its bpe:300 tokenizer saved beside it, trained for one epoch on pydoc."""
    out = tmp_path_factory.mktemp("lm")
    train_student(dataset="pydoc", tokenizer="bpe:300", students=["lm_tiny"], epochs=1, optimizer="adamw", lr=0.003,
                  batch_size=16, out=str(out), **SEQ)
    return f"hf:{out / 'lm_tiny'}"


@pytest.fixture(scope="module")
def token_cache(teacher, tmp_path_factory) -> str:
    """The teacher's top-32 float32 next-token logits on pydoc."""
    out = tmp_path_factory.mktemp("c") / "c.zarr"
    return dump_teacher(teacher=teacher, dataset="pydoc", topk=32, dtype="float32", out=str(out), **SEQ)


@pytest.fixture
def text_cache(teacher, tmp_path):
    """(store, its text file): a cache of a 20-document text: file, dumped from a path relative to the data root."""
    corpus = tmp_path / "data" / "notes.txt"
    corpus.parent.mkdir()
    corpus.write_text("\n\n".join(f"Note {i}: the cache keeps what the teacher said about note {i}." for i in range(20)))
    out = dump_teacher(teacher=teacher, dataset="text:notes.txt", data_root=str(corpus.parent), topk=8,
                       out=str(tmp_path / "t.zarr"), **SEQ)
    return out, corpus


def copy_of(path, tmp_path) -> str:
    shutil.copytree(path, tmp_path / "copy.zarr")
    return str(tmp_path / "copy.zarr")


def read(path, array):
    with stores.open_store(path) as s:
        return np.asarray(s.read(array))


# --- verify ----------------------------------------------------------------------------------------


def test_a_fresh_token_store_verifies_clean_with_its_text_tokenized_again(token_cache, capsys):
    code, out, _ = run(capsys, "verify", token_cache)
    assert code == 0 and out == f"{token_cache}: OK\n"  # no note: the dataset check ran


def test_a_flipped_token_is_found_by_its_block_checksum_and_the_fingerprint(token_cache, tmp_path):
    path = copy_of(token_cache, tmp_path)
    tokens = zarr.open_array(os.path.join(path, "train", "tokens"), mode="r+")
    tokens[3, 5] = (int(tokens[3, 5]) + 1) % 300  # rewritten through zarr: its own chunk checksum is made anew
    problems = verify_store(path)
    assert any(p.startswith("train/tokens: block 0") and "checksum" in p for p in problems), problems
    assert any("sequence 3 position 4" in p for p in problems), problems  # the label before it no longer follows
    assert any("split 'train'" in p and "recorded fingerprint" in p for p in problems), problems


def test_tokens_written_wrong_with_matching_checksums_are_found_by_the_fingerprint(token_cache, tmp_path):
    path = copy_of(token_cache, tmp_path)
    tokens = zarr.open_array(os.path.join(path, "test", "tokens"), mode="r+")
    tokens[0, :] = tokens[1, :]  # a writer that put the wrong row there, and checksummed what it wrote
    with stores.backend_for(path)(path, read_only=False) as s:
        sums = dict(s.get_attrs("test")["checksums"], tokens=[chunk_checksum(np.asarray(tokens[:]))])
        s.update_attrs({"checksums": sums}, group="test")
    problems = verify_store(path)
    assert not any("block" in p for p in problems), problems
    assert any("test/labels" in p and "not the next stored token" in p for p in problems), problems
    assert any("split 'test'" in p and "recorded fingerprint" in p for p in problems), problems


def test_a_text_file_edited_after_the_dump_is_found(text_cache):
    path, corpus = text_cache
    assert verify_store(path) == []
    corpus.write_text(corpus.read_text().replace("Note 0:", "Note zero:"))  # document 0: the train split
    problems = verify_store(path)
    assert len(problems) == 1 and "split 'train': dataset text:notes.txt no longer gives" in problems[0], problems


def test_a_moved_text_file_skips_the_dataset_check_with_a_note(text_cache, tmp_path, capsys):
    path, corpus = text_cache
    corpus.rename(tmp_path / "moved.txt")
    capsys.readouterr()
    assert verify_store(path) == []
    assert "dataset check skipped" in capsys.readouterr().out
    assert verify_store(path, dataset=f"text:{tmp_path / 'moved.txt'}") == []  # named where it is now


def test_a_tokenizer_other_than_the_stores_is_a_problem(token_cache):
    problems = verify_store(token_cache, tokenizer="bpe:400")
    assert len(problems) == 1 and "tokenizer bpe:400" in problems[0] and "not the one" in problems[0], problems


def test_a_moved_tokenizer_skips_the_text_checks_but_not_the_stored_ones(token_cache, tmp_path, capsys):
    path = copy_of(token_cache, tmp_path)
    with stores.backend_for(path)(path, read_only=False) as s:
        meta = s.get_attrs()["tokens"]
        s.update_attrs({"tokens": dict(meta, tokenizer=dict(meta["tokenizer"], source=str(tmp_path / "gone.json")))})
    zarr.open_array(os.path.join(path, "train", "tokens"), mode="r+")[0, 0] = 7
    capsys.readouterr()
    problems = verify_store(path)
    assert "dataset checks skipped" in capsys.readouterr().out
    assert any("split 'train'" in p and "recorded fingerprint" in p for p in problems), problems


def test_a_token_store_is_checked_against_text_datasets_only(token_cache, capsys):
    code, out, err = run(capsys, "verify", token_cache, "--dataset", "helpers.odd_data:anything")
    assert code == 2 and "name a text dataset" in one_line(err)


# --- convert ---------------------------------------------------------------------------------------


def test_top32_float32_to_top8_float16_keeps_the_sequences_and_the_exact_tail(token_cache, tmp_path, capsys):
    dst = str(tmp_path / "top8.zarr")
    code, out, err = run(capsys, "convert", token_cache, dst, "--topk", "8", "--dtype", "float16")
    assert code == 0 and out == f"wrote {dst}\n", err
    with stores.open_store(token_cache) as s, stores.open_store(dst) as d:
        src_attrs, dst_attrs = s.get_attrs(), d.get_attrs()
        assert (dst_attrs["kind"], dst_attrs["tokens"]) == ("tokens", src_attrs["tokens"])
        assert (dst_attrs["topk"], dst_attrs["dtype"]) == (8, "float16")
        for split in ("train", "test"):
            assert d.get_attrs(split)["dataset"] == s.get_attrs(split)["dataset"]
            for name in ("tokens", "labels"):
                got, want = np.asarray(d.read(f"{split}/{name}")), np.asarray(s.read(f"{split}/{name}"))
                assert got.dtype == want.dtype and np.array_equal(got, want), name
            logits, lse = np.asarray(s.read(f"{split}/logits")), np.asarray(s.read(f"{split}/logsumexp"))
            tail = np.exp(np.asarray(s.read(f"{split}/log_tail"), dtype=np.float64))
            tail8 = tail + np.exp(logits[..., 8:] - lse[..., None]).sum(-1)  # [N, L]: the 24 classes dropped join the tail
            np.testing.assert_allclose(np.exp(np.asarray(d.read(f"{split}/log_tail"))), tail8, rtol=1e-3, atol=1e-6)
            assert dst_attrs["topk_values"] == "log_prob"  # rounded values are log-probabilities
            np.testing.assert_allclose(np.asarray(d.read(f"{split}/logits"), dtype=np.float32),
                                       logits[..., :8] - lse[..., None], rtol=1e-3, atol=1e-3)
            assert np.array_equal(np.asarray(d.read(f"{split}/topk_indices")),
                                  np.asarray(s.read(f"{split}/topk_indices"))[..., :8])
    code, out, _ = run(capsys, "verify", dst)
    assert code == 0 and out == f"{dst}: OK\n"
    rows = train_student(cache=dst, students=["lm_tiny"], epochs=1, optimizer="adamw", lr=0.003, batch_size=16,
                         out=str(tmp_path / "s"))
    assert rows and all(math.isfinite(r["perplexity"]) for r in rows)


def test_a_token_store_converts_to_hdf5_value_for_value(token_cache, tmp_path):
    h5 = convert_store(token_cache, tmp_path / "c.h5")
    assert verify_store(h5) == []
    for array in ("train/tokens", "train/labels", "train/logits", "test/log_tail"):
        assert np.array_equal(read(h5, array), read(token_cache, array)), array


@pytest.mark.parametrize("options,says", [
    (["--sample", "4"], "--sample applies to image caches"),
    (["--budget", "300B"], "--budget measures encodings with kdcache fidelity"),
    (["--topk", "64"], "only the top 32"),
])
def test_options_a_token_store_cannot_take_are_refused_in_one_line(token_cache, tmp_path, capsys, options, says):
    code, out, err = run(capsys, "convert", token_cache, tmp_path / "x.zarr", *options)
    assert code == 2 and out == "" and says in one_line(err)
    assert not os.path.exists(tmp_path / "x.zarr")


# --- inspect ---------------------------------------------------------------------------------------


def test_inspect_reports_sequences_the_tokenizer_and_bytes_per_token(token_cache, capsys):
    code, out, _ = run(capsys, "inspect", token_cache)
    assert code == 0
    tokenizer = describe_store(token_cache)["tokens"]["tokenizer"]
    assert "sequences of 16 tokens, packing document" in out
    assert f"tokenizer vocabulary {tokenizer['vocab_size']}, sha256 {tokenizer['sha256'][:12]}" in out
    assert "split train: pydoc 32 sequences of 16 tokens, 480 target positions" in out  # 15 targets a sequence
    assert "B/token (per target position)" in out and "B/position" in out and "samples" not in out
    code, out, _ = run(capsys, "inspect", token_cache, "--json")
    report = json.loads(out)
    assert report["kind"] == "tokens" and report["tokens"]["seq_len"] == 16
    s = report["splits"]["train"]
    assert (s["sequences"], s["seq_len"], s["positions"], s["target_positions"]) == (32, 16, 512, 480)
    assert s["stored_bytes_per_token"] == pytest.approx(s["stored_bytes"] / 480)
    assert s["stored_bytes_per_position"] == pytest.approx(s["stored_bytes"] / 512)
    assert format_report(report) == format_report(describe_store(token_cache))
