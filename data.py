"""
Datasets for nanogen. One entry point, load(name) -> {"train": split, "val": split}.

Text datasets become one long stream of token ids per split, cached on disk as a
memory-mapped array, and batches are random windows cut out of that stream:

    "pystdlib"          every .py file of the running Python's standard library
                        (~1800 files, ~31 MB here): always present, needs no download
    path/to/file.txt    one text file: first 95% of its tokens train, last 5% val
    path/to/folder/     every .txt file below it, split by file (see split_of), or
                        like a single file if that leaves a split empty

Image datasets (digits, mnist, .npy) will be more branches of load().
"""
import os
import sys
import json
import hashlib
import sysconfig

import numpy as np
import torch


class DataError(Exception):
    """A problem the user can fix; the message is one line that says how."""


VAL_PERCENT = 5  # share of files (or of the token stream) held out for validation

# -----------------------------------------------------------------------------
# tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 symbols, no vocabulary file, works offline."""
    name, vocab_size, eot = "bytes", 256, None

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        # a window can start or end in the middle of a multi-byte character
        # a model with a padded vocabulary can emit ids past 255: they carry no byte
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode_doc(self, text):
        # documents are concatenated exactly as they are, with no separator: the
        # stream then equals the files' bytes and bytes_per_token is exactly 1.0
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


class TiktokenTokenizer:
    """A BPE vocabulary from tiktoken; an end-of-text token closes every document."""

    def __init__(self, enc):
        self.enc, self.name = enc, enc.name
        self.vocab_size, self.eot = enc.n_vocab, enc.eot_token

    def encode(self, text):
        # encode_ordinary: text that happens to read "<|endoftext|>" is just text
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([i for i in ids if i < self.vocab_size])  # padded vocabularies

    def encode_doc(self, text):
        return np.array(self.enc.encode_ordinary(text) + [self.eot], dtype=np.uint32)


def get_tokenizer(name):
    if name == "bytes":
        return ByteTokenizer()
    import tiktoken  # imported here so the default, offline path never loads it
    choices = tiktoken.list_encoding_names()
    if name not in choices:
        raise DataError(f"unknown tokenizer {name!r}; choose one of: bytes, {', '.join(choices)}")
    try:
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # the first use downloads the vocabulary; any network failure lands here
        raise DataError(f"tokenizer {name!r} could not be downloaded ({type(e).__name__}); offline, "
                        f"set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached files, "
                        f"or use --tokenizer bytes") from None
    return TiktokenTokenizer(enc)

# -----------------------------------------------------------------------------
# sources: which documents a dataset has, in what order, and which split each is in


def split_of(relpath):
    """'train' or 'val' for a file, from a hash of its relative path: stable across
    runs, machines and Python versions (unlike hash()), and adding a file never
    moves another file to the other split."""
    h = int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:4], "big")
    return "val" if h % 100 < VAL_PERCENT else "train"


def _list_files(root, suffix, skip_dirs=()):
    """Sorted posix relative paths of files ending in suffix below root."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip_dirs]
        out += [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for f in files if f.endswith(suffix)]
    return sorted(out)


def pystdlib_files():
    """The standard library's root and its .py files; installed packages are not
    the standard library, and __pycache__ holds only bytecode."""
    root = sysconfig.get_paths()["stdlib"]
    return root, _list_files(root, ".py", skip_dirs=("site-packages", "dist-packages", "__pycache__"))


def _fingerprint(root, relpaths, *extra):
    """Changes whenever a file is added, removed, resized or touched: cheap (stat
    only) and enough to tell a stale cache from a good one."""
    h = hashlib.sha1(json.dumps([os.path.abspath(root), *extra]).encode())
    for rel in relpaths:
        st = os.stat(os.path.join(root, rel))
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_text(path):
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw:  # text files practically never hold NUL bytes; binaries nearly always do
        raise DataError(f"{path} looks like a binary file (it contains NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None


def _build_streams(root, relpaths, tok, by_file, skip_bad):
    """Tokenize every document into a train and a val stream. by_file=True splits
    by split_of(relpath); otherwise, and whenever that leaves a split empty (a
    folder of one or two files), the last VAL_PERCENT% of the tokens become val."""
    parts, nbytes = {"train": [], "val": []}, 0
    for rel in relpaths:
        try:
            text = _read_text(os.path.join(root, rel))
        except DataError:
            if skip_bad:  # pystdlib has a few deliberately non-UTF-8 test files
                continue
            raise
        if not text:  # an empty file would add nothing, or a lone end-of-text token
            continue
        parts[split_of(rel) if by_file else "train"].append(tok.encode_doc(text))
        nbytes += len(text.encode("utf-8"))
    dtype = token_dtype(tok.vocab_size)
    streams = {k: np.concatenate(v).astype(dtype) if v else np.zeros(0, dtype) for k, v in parts.items()}
    if not len(streams["train"]) or not len(streams["val"]):
        whole = np.concatenate([streams["train"], streams["val"]])
        cut = len(whole) - max(1, len(whole) * VAL_PERCENT // 100)
        streams = {"train": whole[:cut], "val": whole[cut:]}
    # val text need not have the same bytes/token as train, but the overall ratio
    # is close, and exact for the bytes tokenizer
    return streams, nbytes / max(1, sum(len(s) for s in streams.values()))

# -----------------------------------------------------------------------------
# the token cache: MAGIC, uint32 header length, JSON header, zero padding, tokens


MAGIC, FORMAT_VERSION, ALIGN = b"NANOGEN\n", 1, 64


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def atomic_write(path, write):
    """Call write(file) on a temp file next to path, fsync it, rename it over path.
    A reader sees the old file or the new one, never half of one, even if this
    process is killed midway; when several processes write at once the last rename
    wins. train.py writes its checkpoints through here too."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.{os.urandom(4).hex()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dirfd)  # make the rename itself durable
    finally:
        os.close(dirfd)


def write_tokens(path, tokens, meta):
    """Header and tokens, written atomically (see atomic_write)."""
    tokens = np.ascontiguousarray(tokens, dtype=token_dtype(meta["vocab_size"]))
    head = json.dumps({**meta, "version": FORMAT_VERSION, "dtype": tokens.dtype.name,
                       "num_tokens": len(tokens)}).encode()
    start = len(MAGIC) + 4 + len(head)
    pad = -start % ALIGN  # aligned so the memmap'd array starts on a clean boundary

    def write(f):
        f.write(MAGIC + len(head).to_bytes(4, "little") + head + b"\0" * pad)
        f.write(tokens.tobytes())
    atomic_write(path, write)


def read_tokens(path, expect):
    """(tokens as a read-only memmap, header dict), or None if the file is missing,
    damaged, or was built from other data or another tokenizer (expect's keys)."""
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                return None
            n = int.from_bytes(f.read(4), "little")
            meta = json.loads(f.read(n))
        start = len(MAGIC) + 4 + n
        start += -start % ALIGN
        dtype = np.dtype(meta["dtype"])
        ok = meta["version"] == FORMAT_VERSION and all(meta.get(k) == v for k, v in expect.items())
        if not ok or os.path.getsize(path) != start + meta["num_tokens"] * dtype.itemsize:
            return None  # e.g. truncated by a full disk, or left by an older nanogen
        if meta["num_tokens"] == 0:
            return np.zeros(0, dtype), meta  # mmap cannot map zero bytes
        return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=(meta["num_tokens"],)), meta
    except (OSError, ValueError, KeyError, TypeError):  # missing file, bad JSON, bad fields
        return None

# -----------------------------------------------------------------------------
# splits and batches


class TokenSplit:
    """One split's token stream; a batch is batch_size random windows of it."""

    def __init__(self, tokens, block_size, info):
        self.tokens, self.block_size, self.info = tokens, block_size, info
        self.window = np.arange(block_size + 1)

    def __len__(self):
        return len(self.tokens)

    def batch(self, batch_size, generator):
        """x, y int64 [batch_size, block_size], y[:, t] the token after x[:, t].
        The last start is len - block_size - 1, so y ends on the final token.
        Offsets come from the generator alone: same seed, same batches."""
        starts = torch.randint(0, len(self) - self.block_size, (batch_size,), generator=generator)
        rows = torch.from_numpy(np.asarray(self.tokens[starts.numpy()[:, None] + self.window], dtype=np.int64))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def load(name, *, tokenizer="bytes", data_dir="data", block_size=256):
    """-> {"train": split, "val": split} for a dataset name or path."""
    if name == "pystdlib":
        root, relpaths = pystdlib_files()
        key, by_file, skip_bad, extra = "pystdlib", True, True, [sys.version]
    # image datasets (digits, mnist, .npy) go here, before the catch-all text branches
    elif os.path.isdir(name):
        root, relpaths = name, _list_files(name, ".txt")
        if not relpaths:
            raise DataError(f"folder {name} has no .txt files; give a .txt file or a folder that holds some")
        key, by_file, skip_bad, extra = os.path.basename(os.path.abspath(name)), True, False, []
    elif os.path.isfile(name):
        root, relpaths = os.path.dirname(name) or ".", [os.path.basename(name)]
        if os.path.getsize(name) == 0:
            raise DataError(f"{name} is empty; give a text file with some text in it")
        key, by_file, skip_bad, extra = os.path.basename(name), False, False, []
    elif "/" in name or os.sep in name or name.endswith(".txt"):
        raise DataError(f"no such file or folder: {name}")
    else:
        raise DataError(f"unknown dataset {name!r}; use pystdlib, a path to a .txt file, or a folder of .txt files")

    tok = get_tokenizer(tokenizer)
    if key != "pystdlib":  # user paths: readable name plus a hash so two data.txt never collide
        key = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
        key += "-" + hashlib.sha1(os.path.abspath(name).encode()).hexdigest()[:8]
    expect = {"tokenizer": tok.name, "vocab_size": tok.vocab_size,
              "source": _fingerprint(root, relpaths, *extra)}
    paths = {s: os.path.join(data_dir, "cache", f"{key}-{tok.name}-{s}.bin") for s in ("train", "val")}
    cached = {s: read_tokens(p, expect) for s, p in paths.items()}
    if any(c is None for c in cached.values()):
        print(f"data: tokenizing {name} with {tok.name} into {os.path.join(data_dir, 'cache')}", file=sys.stderr)
        streams, bytes_per_token = _build_streams(root, relpaths, tok, by_file, skip_bad)
        if not any(len(t) for t in streams.values()):
            raise DataError(f"{name} holds no text, only empty files; give files with some text in them")
        for s, p in paths.items():
            try:
                write_tokens(p, streams[s], {**expect, "bytes_per_token": bytes_per_token})
            except OSError as e:  # full disk, read-only folder
                raise DataError(f"cannot write token cache {p} ({e.strerror}); "
                                f"free some space or pass another --data-dir") from None
        cached = {s: read_tokens(p, expect) for s, p in paths.items()}

    out = {}
    for s, (tokens, meta) in cached.items():
        if len(tokens) < block_size + 1:
            raise DataError(f"the {s} split of {name} has {len(tokens)} tokens, fewer than block_size+1 = "
                            f"{block_size + 1}; lower --block-size or use more text")
        info = {"kind": "tokens", "shape": (block_size,), "vocab_size": tok.vocab_size,
                "bytes_per_token": meta["bytes_per_token"], "num_tokens": len(tokens),
                "tokenizer": tok.name, "num_classes": None}
        out[s] = TokenSplit(tokens, block_size, info)
    return out
