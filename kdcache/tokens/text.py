"""Text for token-level caches: corpora as documents, tokenizers, and fixed-length token sequences
whose masks say which positions carry a next-token target.

The alignment contract (dump.py writes it, train.py reads it): a sequence is `tokens [L]`, and row t
of its targets is the teacher's distribution over token t+1 given tokens 0..t. Row t counts only
where `mask[t]`: tokens[t+1] is a real token of the same document as tokens[t], and not a prompt
token. Position L-1 never does: window j starts at token j*(L-1), so the next window's first position
repeats it and predicts its successor there. Every target of a document is predicted exactly once.

Datasets: `pydoc` (CPython's reference manual, always there), `text:FILE_OR_GLOB`,
`jsonl:FILE[:FIELD | :PROMPT,RESPONSE]` and `hfds:PATH[:FIELD | :PROMPT,RESPONSE]` (local Hugging
Face datasets). Document i, in corpus order, is a test document iff i % 10 == 9.
"""
from __future__ import annotations

import glob
import hashlib
import json
import operator
import os
import re
from dataclasses import dataclass

import numpy as np

from kdcache.errors import KDCacheError
from kdcache.imports import require

TEXT_PREFIXES = ("text:", "jsonl:", "hfds:")
BUILTIN_CORPORA = ("pydoc",)
SPEC_FORMS = "pydoc, text:FILE_OR_GLOB, jsonl:FILE[:FIELD|:PROMPT,RESPONSE], hfds:PATH[:FIELD|:PROMPT,RESPONSE]"
SPLITS = ("train", "test")
TEST_EVERY = 10  # document i is held out iff i % 10 == 9: 10% for test, the same for any corpus order
PACKINGS = ("document", "packed")
EOS = "<|endoftext|>"  # the end-of-text token of tokenizers trained here (GPT-2's name, so HF tools know it)
EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<eos>")  # how other tokenizers name it when no config says
MIN_BPE_VOCAB = 260  # 256 byte tokens + eos + a few merges; a smaller vocabulary cannot be trained
ENCODE_BATCH = 1024  # documents per encode_batch call: parallel in Rust, and max_sequences can stop early
HF_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".csv": "csv", ".parquet": "parquet"}


def is_text_dataset(spec: str) -> bool:
    """Whether `spec` names a text corpus (this module) rather than an image dataset (kdcache.data)."""
    return spec in BUILTIN_CORPORA or spec.startswith(TEXT_PREFIXES)


@dataclass
class Document:
    """One document; for prompt/response data the prompt is context only (no loss on its tokens)."""

    text: str  # the whole document, or the response
    prompt: str = ""


# --- corpora -------------------------------------------------------------------------------


def documents(spec: str, split: str, root: str | None = None) -> list[Document]:
    """The documents of one split, in corpus order; relative paths in `spec` resolve against `root`."""
    if split not in SPLITS:
        raise KDCacheError(f"text dataset '{spec}' has no split '{split}'; its splits are {', '.join(SPLITS)}")
    corpus = _corpus(spec, root)
    test = split == "test"
    chosen = [d for i, d in enumerate(corpus) if (i % TEST_EVERY == TEST_EVERY - 1) == test]
    if not chosen:
        raise KDCacheError(f"the {split} split of '{spec}' has no documents: the corpus has {len(corpus)}, and "
                           f"document i is a test document iff i % {TEST_EVERY} == {TEST_EVERY - 1}; "
                           f"give at least {TEST_EVERY} documents")
    return chosen


def _corpus(spec: str, root: str | None) -> list[Document]:
    """Every document of `spec` in corpus order; documents with no text are dropped (nothing to predict)."""
    if spec == "pydoc":
        docs = _pydoc()
    elif spec.startswith("text:"):
        docs = [Document(p) for path in _paths(spec[len("text:"):], root) for p in _paragraphs(_read_text(path))]
    elif spec.startswith("jsonl:"):
        pattern, fields = _path_and_fields(spec[len("jsonl:"):], root)
        docs = [d for path in _paths(pattern) for d in _jsonl(path, fields)]
    elif spec.startswith("hfds:"):
        docs = _hf_dataset(*_path_and_fields(spec[len("hfds:"):], root))
    else:
        raise KDCacheError(f"unknown text dataset '{spec}'; text datasets are {SPEC_FORMS}")
    return [d for d in docs if (d.prompt + d.text).strip()]


# a section title: a line at the margin underlined with one of reST's heading characters
_HEADING = re.compile(r"^(?=\S[^\n]*\n(?:\*{3,}|={3,}|-{3,}|~{3,}|\^{3,})[ \t]*$)", re.M)


def _pydoc() -> list[Document]:
    """CPython's reference manual, one document per section, topics in sorted order (its 79 topics
    alone would leave fewer than 100 documents to train on)."""
    from pydoc_data.topics import topics

    return [Document(s.strip()) for key in sorted(topics) for s in _HEADING.split(topics[key]) if s.strip()]


def _resolve(path: str, root: str | None) -> str:
    path = os.path.expanduser(path)
    return os.path.join(root, path) if root and not os.path.isabs(path) else path


def _paths(pattern: str, root: str | None = None) -> list[str]:
    """The files `pattern` names: itself, or a glob's matches in sorted order."""
    pattern = _resolve(pattern, root)
    if glob.has_magic(pattern):
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not paths:
            raise KDCacheError(f"no file matches {pattern}; check the glob (relative paths resolve against the "
                               "data root, else the current folder)")
        return paths
    if not os.path.isfile(pattern):
        raise KDCacheError(f"file not found: {pattern} (relative paths resolve against the data root, else the "
                           "current folder)")
    return [pattern]


def _path_and_fields(rest: str, root: str | None) -> tuple[str, tuple[str, ...]]:
    """PATH[:FIELD | :PROMPT,RESPONSE] -> (resolved path, field names); a path that exists keeps its colons."""
    path, fields = rest, "text"
    if ":" in rest and not os.path.exists(_resolve(rest, root)):
        path, _, fields = rest.rpartition(":")
    names = tuple(f.strip() for f in fields.split(","))
    if len(names) > 2 or not all(names):
        raise KDCacheError(f"'{fields}' in '{rest}' is neither FIELD nor PROMPT,RESPONSE")
    return _resolve(path, root), names


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise KDCacheError(f"{path} is not UTF-8 text: byte {e.start} is 0x{data[e.start]:02x} ({e.reason}); "
                           "convert it first, e.g. iconv -f latin1 -t utf-8") from None
    if not text.strip():
        raise KDCacheError(f"{path} is empty (nothing but whitespace); give a file with text in it")
    return text


def _paragraphs(text: str) -> list[str]:
    """Runs of non-blank lines: the documents of a text file, split at one or more blank lines."""
    paragraphs, lines = [], []
    for line in text.splitlines() + [""]:
        if line.strip():
            lines.append(line)
        elif lines:
            paragraphs.append("\n".join(lines))
            lines = []
    return paragraphs


def _jsonl(path: str, fields: tuple[str, ...]) -> list[Document]:
    docs = []
    # split on "\n" only: str.splitlines would also break at U+2028, which JSON strings may hold raw
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise KDCacheError(f"{path} line {number} is not JSON ({e.msg} at column {e.colno}); "
                               "each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise KDCacheError(f"{path} line {number} is a JSON {type(row).__name__}, not an object with "
                               f"field{'s' if len(fields) > 1 else ''} {', '.join(fields)}")
        docs.append(_document(row, fields, f"{path} line {number}"))
    return docs


def _document(row: dict, fields: tuple[str, ...], where: str) -> Document:
    """The Document in `row`: fields (TEXT,) or (PROMPT, RESPONSE)."""
    values = []
    for name in fields:
        if name not in row:
            raise KDCacheError(f"{where} has no field '{name}'; its fields are {', '.join(map(str, row)) or 'none'} "
                               "(name the field: jsonl:FILE:FIELD or :PROMPT,RESPONSE)")
        if not isinstance(row[name], str):
            raise KDCacheError(f"{where}: field '{name}' is {type(row[name]).__name__}, not a string; "
                               f"its fields are {', '.join(map(str, row))}")
        values.append(row[name])
    return Document(text=values[-1], prompt=values[0] if len(values) == 2 else "")


def _hf_dataset(path: str, fields: tuple[str, ...]) -> list[Document]:
    """A `datasets` dataset from local files: a save_to_disk folder, or data files read by their builder."""
    datasets = require("datasets", "lm", "an hfds: dataset")  # deferred: ~1 s to import, and only hfds: needs it
    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise KDCacheError(f"{path} is not a folder written by Dataset.save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise KDCacheError(f"{path} holds a DatasetDict (splits {', '.join(ds)}); point hfds: at one "
                               f"split's folder, e.g. hfds:{os.path.join(path, next(iter(ds)))}")
    else:
        files = _paths(path)
        kinds = {os.path.splitext(f)[1].lower() for f in files}
        if len(kinds) > 1 or not kinds <= HF_BUILDERS.keys():
            raise KDCacheError(f"hfds: data files must share one of the extensions {', '.join(HF_BUILDERS)}; "
                               f"got {', '.join(sorted(kinds))} from {path}")
        for f in files:
            if os.path.getsize(f) == 0:
                raise KDCacheError(f"{f} is empty; give a file with data in it")
        try:
            ds = datasets.load_dataset(HF_BUILDERS[kinds.pop()], data_files=files, split="train")
        except Exception as e:  # the builders raise many kinds; each means the files could not be read
            raise KDCacheError(f"datasets could not read {path}: {type(e).__name__}: {e}") from None
    for name in fields:
        if name not in ds.column_names:
            raise KDCacheError(f"{path} has no column '{name}'; its columns are {', '.join(ds.column_names)} "
                               "(name the field: hfds:PATH:FIELD or :PROMPT,RESPONSE)")
    columns = [list(ds[name]) for name in fields]  # column reads: one Arrow conversion, not one per row
    docs = []
    for i, values in enumerate(zip(*columns)):
        docs.append(_document(dict(zip(fields, values)), fields, f"{path} row {i}"))
    return docs


# --- tokenizers ------------------------------------------------------------------------------


class Tokenizer:
    """A `tokenizers.Tokenizer` with what a token cache needs: the eos that closes every document, the
    pad that fills the last window, and the sha256 that ties a cache to the tokenizer that made it."""

    def __init__(self, backend, *, eos_id: int, pad_id: int, source: str):
        self.backend = backend
        # a literal "<|endoftext|>" inside a document is text, not a document boundary
        self.backend.encode_special_tokens = True
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eos_id, self.pad_id, self.source = int(eos_id), int(pad_id), source
        self._sha256 = hashlib.sha256(backend.to_str().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added (documents get their eos from the caller)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of many texts at once (parallel in Rust)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def sha256(self) -> str:
        """sha256 of the tokenizer's canonical JSON (`to_str()`): what identifies it."""
        return self._sha256

    def describe(self) -> dict:
        """The tokenizer block of a token split's attrs."""
        return {"sha256": self.sha256(), "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "source": self.source}

    def save(self, folder: str) -> str:
        """Write folder/tokenizer.json (and special_tokens_map.json, naming eos and pad for load_tokenizer
        and transformers); returns the tokenizer.json path."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "tokenizer.json")
        name = self.backend.id_to_token
        special = {"eos_token": name(self.eos_id), "pad_token": name(self.pad_id)}
        with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
            json.dump(special, f, indent=2)
        self.backend.save(path + ".partial")
        os.replace(path + ".partial", path)  # a reader never sees half a tokenizer
        return path


def load_tokenizer(spec: str, *, corpus: str | None = None, root: str | None = None) -> Tokenizer:
    """A tokenizer from a tokenizer.json file, a folder holding one (or a transformers tokenizer), or
    "bpe:N": a byte-level BPE of vocabulary N trained here on the train split of `corpus`."""
    if spec.startswith("bpe:"):
        return _train_bpe(spec, corpus, root)
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        return _from_file(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return _from_file(os.path.join(path, "tokenizer.json"))
        if any(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "tokenizer_config.json")):
            return _from_transformers(path)
        raise KDCacheError(f"folder {path} holds no tokenizer.json (nor vocab.json or tokenizer_config.json); "
                           "give a tokenizer.json file, a save_pretrained folder, or bpe:N")
    raise KDCacheError(f"tokenizer '{spec}' not found: give a tokenizer.json file, a folder holding one "
                       "(save_pretrained), or bpe:N to train one on the corpus")


def _train_bpe(spec: str, corpus: str | None, root: str | None) -> Tokenizer:
    """GPT-2-style byte-level BPE trained on the train split (the test split stays unseen). The
    trainer breaks ties between equally frequent pairs by pair id, so the same corpus gives the same
    tokenizer in every process (tests/test_token_text.py runs it in two)."""
    try:
        size = int(spec[len("bpe:"):])
    except ValueError:
        raise KDCacheError(f"tokenizer '{spec}': N in bpe:N must be an integer vocabulary size, "
                           "e.g. bpe:8192") from None
    if size < MIN_BPE_VOCAB:
        raise KDCacheError(f"tokenizer '{spec}': a byte-level BPE needs a vocabulary of at least {MIN_BPE_VOCAB} "
                           "(256 bytes, the eos and some merges)")
    if corpus is None:
        raise KDCacheError(f"tokenizer '{spec}' is trained here and needs a corpus: pass the dataset to train it "
                           "on (its train split is used)")
    tokenizers = require("tokenizers", "lm", "a bpe: tokenizer")
    Backend, decoders, models, pre_tokenizers, trainers = (tokenizers.Tokenizer, tokenizers.decoders, tokenizers.models,
                                                           tokenizers.pre_tokenizers, tokenizers.trainers)

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # any text encodes: no unknown token
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [t for d in documents(corpus, "train", root) for t in (d.prompt, d.text) if t]
    backend.train_from_iterator(texts, trainer=trainer)
    eos = backend.token_to_id(EOS)
    return Tokenizer(backend, eos_id=eos, pad_id=eos, source=f"{spec} trained on the train split of {corpus}")


def _from_file(path: str) -> Tokenizer:
    Backend = require("tokenizers", "lm", "a tokenizer.json").Tokenizer

    try:
        backend = Backend.from_file(path)
    except Exception as e:  # tokenizers raises plain Exception for a malformed file
        raise KDCacheError(f"{path} is not a tokenizers JSON file ({e}); give the tokenizer.json of a "
                           "save_pretrained folder or of Tokenizer.save") from None
    names = _special_tokens(os.path.dirname(path))
    return _with_special_ids(backend, names.get("eos_token"), names.get("pad_token"), os.path.abspath(path))


def _special_tokens(folder: str) -> dict:
    """eos_token and pad_token as tokenizer_config.json / special_tokens_map.json in `folder` name them."""
    names = {}
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            with open(os.path.join(folder, file)) as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        for key in ("eos_token", "pad_token"):
            value = config.get(key) if isinstance(config, dict) else None
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[key] = value
    return names


def _with_special_ids(backend, eos_name: str | None, pad_name: str | None, source: str) -> Tokenizer:
    eos = next((backend.token_to_id(n) for n in (eos_name, *EOS_NAMES) if n and backend.token_to_id(n) is not None),
               None)
    if eos is None:
        raise KDCacheError(f"tokenizer {source} has no end-of-text token (looked for {', '.join(EOS_NAMES)}); "
                           "name it as eos_token in a tokenizer_config.json beside the tokenizer")
    pad = backend.token_to_id(pad_name) if pad_name else None
    return Tokenizer(backend, eos_id=eos, pad_id=eos if pad is None else pad, source=source)


def _from_transformers(folder: str) -> Tokenizer:
    """A folder without tokenizer.json (e.g. GPT-2's vocab.json + merges.txt): transformers converts it."""
    try:
        from transformers import AutoTokenizer  # deferred: transformers takes seconds to import
    except ImportError as e:
        raise KDCacheError(f"{folder} holds no tokenizer.json, and reading it needs transformers ({e}); "
                           "pip install 'kdcache[hf]'") from None
    try:
        hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many kinds for a folder it cannot read
        raise KDCacheError(f"transformers cannot load the tokenizer in {folder}: {type(e).__name__}: {e}") from None
    if not getattr(hf, "is_fast", False):
        raise KDCacheError(f"the tokenizer in {folder} is a slow (Python) one with no tokenizers backend; "
                           "save a fast one's tokenizer.json there (AutoTokenizer.from_pretrained(..., use_fast=True)"
                           ".save_pretrained)")
    return _with_special_ids(hf.backend_tokenizer, hf.eos_token, hf.pad_token, os.path.abspath(folder))


# --- token sequences ---------------------------------------------------------------------------


@dataclass
class TokenSplit:
    """One split of a text dataset as fixed-length sequences (the contract is in the module docstring)."""

    name: str  # the dataset spec
    split: str
    tokens: np.ndarray  # [N, L] int64 token ids, pad_id where padded
    mask: np.ndarray  # [N, L] bool: position t has a target (tokens[t+1]); never at L-1
    seq_len: int
    packing: str  # "document" (no window mixes documents) or "packed" (documents concatenated)
    tokenizer: dict  # Tokenizer.describe()

    def __len__(self) -> int:
        return len(self.tokens)

    def labels(self) -> np.ndarray:
        """[N, L] int64: tokens[:, t+1] where mask[:, t], else -100 (what torch's cross_entropy ignores)."""
        labels = np.full(self.tokens.shape, -100, dtype=np.int64)
        labels[:, :-1] = np.where(self.mask[:, :-1], self.tokens[:, 1:], -100)
        return labels

    def fingerprint(self) -> str:
        """sha256 of seq_len, packing, and the tokens (int64) and mask (uint8) bytes in C order."""
        h = hashlib.sha256(f"{self.seq_len}|{self.packing}|".encode())
        h.update(np.ascontiguousarray(self.tokens, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.mask, dtype=np.uint8).tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        """The dataset block of a token store's split attrs."""
        return {"name": self.name, "split": self.split, "length": len(self), "fingerprint": self.fingerprint(),
                "seq_len": self.seq_len, "packing": self.packing, "tokenizer": dict(self.tokenizer),
                "targets": int(self.mask.sum()), "kind": "tokens"}


def load_token_split(spec: str, split: str, tokenizer: Tokenizer, seq_len: int, *, packing: str = "document",
                     root: str | None = None, max_sequences: int | None = None) -> TokenSplit:
    """The split's documents tokenized (prompt + response + eos) and cut into windows of `seq_len`
    tokens; `max_sequences` keeps the first N windows and stops tokenizing once it has them."""
    try:
        seq_len = operator.index(seq_len)
    except TypeError:
        seq_len = None
    if seq_len is None or seq_len < 2:
        raise KDCacheError("seq_len must be an integer of at least 2 (a position and the token it predicts)")
    if packing not in PACKINGS:
        raise KDCacheError(f"unknown packing '{packing}'; choose one of {', '.join(PACKINGS)}")
    if max_sequences is not None and max_sequences < 1:
        raise KDCacheError(f"max_sequences must be at least 1, got {max_sequences}")
    pieces = _tokenized(documents(spec, split, root), tokenizer)
    cut = _document_windows if packing == "document" else _packed_windows
    tokens, mask = cut(pieces, seq_len, tokenizer.pad_id, max_sequences)
    return TokenSplit(name=spec, split=split, tokens=tokens, mask=mask, seq_len=seq_len, packing=packing,
                      tokenizer=tokenizer.describe())


def _tokenized(docs: list[Document], tokenizer: Tokenizer):
    """Per document: ids [n] int64 (prompt + response + eos) and is_target [n] bool (false on prompt tokens)."""
    for start in range(0, len(docs), ENCODE_BATCH):
        batch = docs[start:start + ENCODE_BATCH]
        responses = tokenizer.encode_batch([d.text for d in batch])
        has_prompts = any(d.prompt for d in batch)
        prompts = tokenizer.encode_batch([d.prompt for d in batch]) if has_prompts else [[]] * len(batch)
        for prompt, response in zip(prompts, responses):
            ids = np.array(prompt + response + [tokenizer.eos_id], dtype=np.int64)
            is_target = np.arange(len(ids)) >= len(prompt)
            yield ids, is_target


def _windows(ids: np.ndarray, pair_target: np.ndarray, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut `ids` [n] into windows of seq_len starting every seq_len - 1 tokens, the last right-padded.

    pair_target [n - 1] bool: whether ids[k + 1] is a target after ids[k]. Each pair lands in exactly
    one window, at a position < seq_len - 1. Returns tokens and mask, both [W, seq_len].
    """
    stride = seq_len - 1
    count = -(-(len(ids) - 1) // stride)  # ceil((n - 1) / stride): enough windows for every pair
    index = np.arange(count)[:, None] * stride + np.arange(seq_len)  # [W, L] into the padded stream
    padded = np.full(count * stride + 1, pad_id, dtype=np.int64)
    padded[:len(ids)] = ids
    targets = np.zeros(count * stride, dtype=bool)
    targets[:len(pair_target)] = pair_target
    mask = np.zeros((count, seq_len), dtype=bool)
    mask[:, :-1] = targets[index[:, :-1]]
    return padded[index], mask


def _document_windows(pieces, seq_len: int, pad_id: int, max_sequences: int | None):
    """Each document cut on its own: no window holds two documents."""
    tokens, masks, rows = [], [], 0
    for ids, is_target in pieces:
        t, m = _windows(ids, is_target[1:], seq_len, pad_id)
        tokens.append(t)
        masks.append(m)
        rows += len(t)
        if max_sequences is not None and rows >= max_sequences:
            break
    return np.concatenate(tokens)[:max_sequences], np.concatenate(masks)[:max_sequences]


def _packed_windows(pieces, seq_len: int, pad_id: int, max_sequences: int | None):
    """Documents concatenated, then cut; a pair that crosses from one document into the next is no target."""
    needed = None if max_sequences is None else max_sequences * (seq_len - 1) + 1  # tokens of N full windows
    ids, is_target, doc, total = [], [], [], 0
    for i, (d_ids, d_target) in enumerate(pieces):
        ids.append(d_ids)
        is_target.append(d_target)
        doc.append(np.full(len(d_ids), i, dtype=np.int64))
        total += len(d_ids)
        if needed is not None and total >= needed:
            break
    ids, is_target, doc = np.concatenate(ids), np.concatenate(is_target), np.concatenate(doc)
    if needed is not None:  # the first N windows depend only on the first `needed` tokens
        ids, is_target, doc = ids[:needed], is_target[:needed], doc[:needed]
    tokens, mask = _windows(ids, (doc[1:] == doc[:-1]) & is_target[1:], seq_len, pad_id)
    return tokens[:max_sequences], mask[:max_sequences]
