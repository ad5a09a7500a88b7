"""Specification of tokens/text.py: corpora split into documents, tokenizers, and token windows whose
masks mark exactly the next-token targets (within a document, never on prompt tokens)."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kdcache.errors import KDCacheError
from kdcache.tokens import text
from kdcache.tokens.text import Document, Tokenizer, documents, load_token_split, load_tokenizer

EOS, PAD = 0, 1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def number_tokenizer() -> Tokenizer:
    """A word-level tokenizer whose ids are the numbers written: "10 11" -> [10, 11]; eos 0, pad 1."""
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    vocab = {"<|endoftext|>": EOS, "<pad>": PAD, **{str(i): i for i in range(2, 100)}}
    backend = Backend(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(backend, eos_id=EOS, pad_id=PAD, source="test numbers")


def write(path, content: str) -> str:
    path.write_text(content, encoding="utf-8")
    return str(path)


def write_jsonl(path, rows) -> str:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def two_docs(tmp_path) -> str:
    """text:... with documents [10 11 12 13 14] and [20 21], separated by two blank lines."""
    return "text:" + write(tmp_path / "a.txt", "10 11 12\n13 14\n\n  \n20 21\n")


@pytest.fixture
def hf_datasets(tmp_path, monkeypatch):
    """`datasets`, caching what load_dataset converts under tmp_path instead of the user's home."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets


@pytest.fixture(scope="module")
def pydoc_bpe() -> Tokenizer:
    return load_tokenizer("bpe:400", corpus="pydoc")


# --- alignment and masks -----------------------------------------------------------------------


def test_text_files_split_into_documents_at_blank_lines(two_docs):
    assert documents(two_docs, "train") == [Document("10 11 12\n13 14"), Document("20 21")]


def test_document_windows_overlap_by_one_token_and_pad_the_last(two_docs):
    s = load_token_split(two_docs, "train", number_tokenizer(), 4)
    # doc [10 11 12 13 14 eos]: windows start at 0 and 3; doc [20 21 eos]: one window, padded
    np.testing.assert_array_equal(s.tokens, [[10, 11, 12, 13], [13, 14, EOS, PAD], [20, 21, EOS, PAD]])
    np.testing.assert_array_equal(s.mask, [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    assert s.tokens.dtype == np.int64 and s.mask.dtype == bool


def test_packed_windows_mask_targets_that_cross_into_the_next_document(two_docs):
    s = load_token_split(two_docs, "train", number_tokenizer(), 4, packing="packed")
    np.testing.assert_array_equal(s.tokens, [[10, 11, 12, 13], [13, 14, EOS, 20], [20, 21, EOS, PAD]])
    # predicting the eos is a target; predicting 20 after the eos is not (it belongs to the next document)
    np.testing.assert_array_equal(s.mask, [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]])


def test_prompt_tokens_are_context_without_targets(tmp_path):
    spec = "jsonl:" + write_jsonl(tmp_path / "qa.jsonl", [{"q": "30 31", "a": "32 33"}]) + ":q,a"
    assert documents(spec, "train") == [Document(text="32 33", prompt="30 31")]
    s = load_token_split(spec, "train", number_tokenizer(), 8)
    np.testing.assert_array_equal(s.tokens, [[30, 31, 32, 33, EOS, PAD, PAD, PAD]])
    np.testing.assert_array_equal(s.mask, [[0, 1, 1, 1, 0, 0, 0, 0]])  # 31->32 is the first response target


def test_labels_are_the_next_token_where_masked(two_docs):
    s = load_token_split(two_docs, "train", number_tokenizer(), 4, packing="packed")
    np.testing.assert_array_equal(s.labels(), [[11, 12, 13, -100], [14, EOS, -100, -100], [21, EOS, -100, -100]])


@pytest.mark.parametrize("packing", ["document", "packed"])
@pytest.mark.parametrize("seq_len", [2, 3, 17, 256])
def test_every_target_of_every_document_is_predicted_exactly_once(pydoc_bpe, packing, seq_len):
    docs = documents("pydoc", "test")
    s = load_token_split("pydoc", "test", pydoc_bpe, seq_len, packing=packing)
    expected = sorted((a, b) for d in docs for ids in [pydoc_bpe.encode(d.text) + [pydoc_bpe.eos_id]]
                      for a, b in zip(ids, ids[1:]))
    rows, cols = np.nonzero(s.mask)
    assert sorted(zip(s.tokens[rows, cols].tolist(), s.tokens[rows, cols + 1].tolist())) == expected
    assert not s.mask[:, -1].any()
    if packing == "packed":  # one stream: each window starts with the last token of the one before
        np.testing.assert_array_equal(s.tokens[:-1, -1], s.tokens[1:, 0])
    labels = s.labels()
    np.testing.assert_array_equal(labels[:, :-1][s.mask[:, :-1]], s.tokens[:, 1:][s.mask[:, :-1]])
    assert (labels[~s.mask] == -100).all()


def test_max_sequences_keeps_the_first_windows(pydoc_bpe):
    for packing in ("document", "packed"):
        full = load_token_split("pydoc", "test", pydoc_bpe, 32, packing=packing)
        first = load_token_split("pydoc", "test", pydoc_bpe, 32, packing=packing, max_sequences=5)
        np.testing.assert_array_equal(first.tokens, full.tokens[:5])
        np.testing.assert_array_equal(first.mask, full.mask[:5])


def test_describe_names_the_split_its_tokenizer_and_its_targets(two_docs):
    tok = number_tokenizer()
    s = load_token_split(two_docs, "train", tok, 4)
    d = s.describe()
    assert d == {"name": two_docs, "split": "train", "length": 3, "fingerprint": s.fingerprint(), "seq_len": 4,
                 "packing": "document", "tokenizer": tok.describe(), "targets": 7, "kind": "tokens"}
    assert len(s) == 3


def test_fingerprint_changes_with_one_token_or_the_sequence_length(two_docs):
    s = load_token_split(two_docs, "train", number_tokenizer(), 4)
    assert s.fingerprint() == load_token_split(two_docs, "train", number_tokenizer(), 4).fingerprint()
    changed = s.tokens.copy()
    changed[1, 1] = 15
    assert dataclasses.replace(s, tokens=changed).fingerprint() != s.fingerprint()
    assert dataclasses.replace(s, seq_len=5).fingerprint() != s.fingerprint()
    assert load_token_split(two_docs, "train", number_tokenizer(), 5).fingerprint() != s.fingerprint()


# --- corpora -------------------------------------------------------------------------------------


def test_pydoc_has_over_100_train_documents_and_a_stable_test_split():
    train, test = documents("pydoc", "train"), documents("pydoc", "test")
    assert len(train) > 100 and len(test) > 10
    everything = text._corpus("pydoc", None)
    assert test == everything[9::10] == documents("pydoc", "test")
    assert len(train) + len(test) == len(everything)


def test_split_is_every_tenth_document_in_corpus_order(tmp_path):
    spec = "text:" + write(tmp_path / "t.txt", "\n\n".join(str(i) for i in range(2, 25)))
    assert [d.text for d in documents(spec, "test")] == ["11", "21"]
    assert len(documents(spec, "train")) == 21


def test_text_glob_reads_files_in_sorted_order_relative_to_root(tmp_path):
    write(tmp_path / "b.txt", "20 21")
    write(tmp_path / "a.txt", "10 11\n\n12")
    assert [d.text for d in documents("text:*.txt", "train", root=str(tmp_path))] == ["10 11", "12", "20 21"]


def test_jsonl_reads_text_or_a_named_field_and_skips_blank_lines(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "body": "b"}\n\n{"text": "c", "body": "d"}\n')
    assert [d.text for d in documents("jsonl:" + path, "train")] == ["a", "c"]
    assert [d.text for d in documents(f"jsonl:{path}:body", "train")] == ["b", "d"]


def test_hfds_reads_a_local_jsonl_file_and_a_save_to_disk_folder(tmp_path, hf_datasets):
    rows = [{"q": f"question {i}", "a": f"answer {i}", "text": f"doc {i}"} for i in range(12)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    assert documents("hfds:" + path, "test") == [Document("doc 9")]
    assert documents(f"hfds:{path}:q,a", "train") == documents(f"jsonl:{path}:q,a", "train")
    hf_datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert documents("hfds:saved:q,a", "train", root=str(tmp_path)) == documents(f"jsonl:{path}:q,a", "train")


def test_is_text_dataset_knows_the_text_specs():
    assert all(map(text.is_text_dataset, ["pydoc", "text:a.txt", "jsonl:a.jsonl", "hfds:x"]))
    assert not any(map(text.is_text_dataset, ["digits", "imagefolder:x", "pydocs"]))


# --- tokenizers ------------------------------------------------------------------------------------


def test_bpe_training_gives_the_same_tokenizer_in_fresh_processes():
    code = "from kdcache.tokens.text import load_tokenizer; print(load_tokenizer('bpe:300', corpus='pydoc').sha256())"
    shas = {subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert len(shas) == 1 and len(shas.pop()) == 64


def test_bpe_tokenizer_has_the_asked_vocabulary_and_eos_as_pad(pydoc_bpe):
    d = pydoc_bpe.describe()
    assert (d["vocab_size"], d["eos_id"], d["pad_id"]) == (400, 0, 0)
    assert pydoc_bpe.backend.id_to_token(pydoc_bpe.eos_id) == "<|endoftext|>"
    sample = "def f(x):\n    return x ** 2  # é"
    assert pydoc_bpe.decode(pydoc_bpe.encode(sample)) == sample


def test_saved_tokenizer_loads_back_here_and_in_transformers(pydoc_bpe, tmp_path):
    path = pydoc_bpe.save(str(tmp_path / "tok"))
    assert path == str(tmp_path / "tok" / "tokenizer.json")
    sample = "for i in range(10):\n\tprint(i, 'ü')"
    for loaded in (load_tokenizer(str(tmp_path / "tok")), load_tokenizer(path)):
        assert loaded.sha256() == pydoc_bpe.sha256()
        assert loaded.encode(sample) == pydoc_bpe.encode(sample)
        assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (pydoc_bpe.eos_id, pydoc_bpe.pad_id, 400)
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    assert fast(sample, add_special_tokens=False)["input_ids"] == pydoc_bpe.encode(sample)


def test_a_gpt2_style_folder_without_tokenizer_json_loads_through_transformers(pydoc_bpe, tmp_path):
    pytest.importorskip("transformers")
    folder = tmp_path / "gpt2"
    folder.mkdir()
    pydoc_bpe.backend.model.save(str(folder))  # vocab.json + merges.txt, as GPT-2's hub folder has them
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    loaded = load_tokenizer(str(folder))
    sample = "x = [1, 2, 3]  # a list"
    assert loaded.encode(sample) == pydoc_bpe.encode(sample) and loaded.eos_id == pydoc_bpe.eos_id


def test_a_literal_eos_in_a_document_is_text_not_a_boundary(pydoc_bpe):
    assert pydoc_bpe.eos_id not in pydoc_bpe.encode("end <|endoftext|> start")


# --- bad input: one clear error each ------------------------------------------------------------------


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(KDCacheError) as e:
        fn(*args, **kwargs)
    return str(e.value)


def test_missing_file_and_empty_glob_are_named(tmp_path):
    assert "file not found" in error(documents, f"text:{tmp_path}/none.txt", "train")
    assert "no file matches" in error(documents, f"text:{tmp_path}/*.md", "train")
    assert "file not found" in error(documents, f"jsonl:{tmp_path}/none.jsonl", "train")
    assert "file not found" in error(documents, f"hfds:{tmp_path}/none.jsonl", "train")


def test_empty_and_whitespace_only_files_are_refused(tmp_path):
    for name, content in [("empty.txt", ""), ("blank.txt", " \n\n\t\n")]:
        path = write(tmp_path / name, content)
        assert f"{path} is empty" in error(documents, "text:" + path, "train")
    assert "is empty" in error(documents, "jsonl:" + write(tmp_path / "e.jsonl", "\n"), "train")


def test_a_file_that_is_not_utf8_is_named_with_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait".encode("latin1"))
    message = error(documents, f"text:{path}", "train")
    assert str(path) in message and "not UTF-8" in message and "byte 3" in message


def test_bad_jsonl_lines_are_named_by_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": \n')
    assert f"{path} line 2 is not JSON" in error(documents, "jsonl:" + path, "train")
    path = write_jsonl(tmp_path / "nofield.jsonl", [{"text": "ok"}, {"body": "x", "id": 3}])
    message = error(documents, "jsonl:" + path, "train")
    assert f"{path} line 2 has no field 'text'" in message and "its fields are body, id" in message
    path = write_jsonl(tmp_path / "notstr.jsonl", [{"text": ["a", "list"], "id": 1}])
    message = error(documents, "jsonl:" + path, "train")
    assert f"{path} line 1: field 'text' is list, not a string" in message and "text, id" in message
    path = write(tmp_path / "array.jsonl", '["text"]\n')
    assert "line 1 is a JSON list, not an object" in error(documents, "jsonl:" + path, "train")


def test_hfds_without_the_named_column_lists_its_columns(tmp_path, hf_datasets):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": f"b {i}"} for i in range(12)])
    assert "no column 'text'; its columns are body" in error(documents, "hfds:" + path, "train")
    assert "extensions" in error(documents, "hfds:" + write(tmp_path / "d.md", "x"), "train")


def test_unknown_spec_prefix_and_split_list_the_known_ones(two_docs):
    message = error(documents, "txt:notes.txt", "train")
    assert "unknown text dataset 'txt:notes.txt'" in message and "text:FILE_OR_GLOB" in message and "hfds:" in message
    assert "its splits are train, test" in error(documents, two_docs, "validation")


def test_a_corpus_of_fewer_than_ten_documents_has_no_test_split(two_docs):
    message = error(documents, two_docs, "test")
    assert "has no documents" in message and "the corpus has 2" in message and "at least 10 documents" in message


def test_bad_tokenizer_specs_are_refused(tmp_path):
    assert "not found" in error(load_tokenizer, str(tmp_path / "missing.json"))
    assert "holds no tokenizer.json" in error(load_tokenizer, str(tmp_path))
    assert "at least 260" in error(load_tokenizer, "bpe:259", corpus="pydoc")
    assert "must be an integer" in error(load_tokenizer, "bpe:big", corpus="pydoc")
    assert "needs a corpus" in error(load_tokenizer, "bpe:300")
    assert "not a tokenizers JSON" in error(load_tokenizer, write(tmp_path / "tokenizer.json", "{}"))


def test_bad_sequence_settings_are_refused(two_docs):
    tok = number_tokenizer()
    assert "seq_len must be an integer of at least 2" in error(load_token_split, two_docs, "train", tok, 1)
    assert "unknown packing 'dense'" in error(load_token_split, two_docs, "train", tok, 4, packing="dense")
    assert "max_sequences must be at least 1" in error(load_token_split, two_docs, "train", tok, 4, max_sequences=0)
