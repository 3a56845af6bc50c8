"""
Datasets for nanogen. One entry point, load(name) -> {"train": split, "val": split};
a split has .batch(batch_size, generator) -> (x, y or None) and .info (a DataInfo).

Text becomes one long stream of token ids per split, cached on disk as a memory-mapped
array, and batches are random windows cut out of that stream:

    "pystdlib"          every .py file of the running Python's standard library
                        (~1800 files, ~31 MB here): always present, needs no download
    path/to/file.txt    one text file: first 95% of its tokens train, last 5% val
    path/to/folder/     every .txt file below it, split by file (see split_of), or
                        like a single file if that leaves a split empty

Images are uint8 in memory and float in [-1, 1], NCHW, in batches:

    "digits"            28x28 handwritten-looking digits with labels, rendered here from
                        stroke shapes (no download): 60,000 train, 10,000 val
    "mnist", "fashion-mnist", "cifar10"
                        downloaded into --data-dir on first use, sha256-checked; val is
                        the official test set
    path/to/x.npy       uint8 images (N,H,W), (N,H,W,C) or (N,C,H,W); 5% held out for val
    path/to/x.npz       arrays x (images, as a .npy's), y (integer labels) and optionally
                        classes (their names); 5% held out for val
    path/to/folder/     images (PNG read here, other formats by Pillow): one subfolder
                        per class, or none (unlabelled); converted to the channels and
                        the size most of them have (or --channels, --image-size), cached
                        in --data-dir (see images.load_folder); 5% held out for val

Points are fresh samples of a 2D Gaussian mixture at every batch:

    "ring8", "grid25"   the mode-collapse benchmarks (see POINTS)

This file also writes PNGs (save_grid, save_scatter, save_samples) with zlib alone.
"""
import dataclasses
import os
import sys
import json
import math
import zlib
import struct
import hashlib
import sysconfig
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import images
from checkpoint import atomic_write
from cli import UsageError


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

    def decode_bytes(self, ids):
        """The raw bytes of a stream of ids (numpy, fast for a whole split)."""
        ids = np.asarray(ids)
        return ids[ids < 256].astype(np.uint8).tobytes()

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

    def decode_bytes(self, ids):
        """The raw bytes of a stream of ids, each end-of-text as one NUL byte (a byte
        source text does not hold), so that documents stay apart."""
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[ids < self.vocab_size]
        ends = np.flatnonzero(ids == self.eot)
        docs = np.split(ids, ends)  # every piece after the first starts with its eot
        return b"\0".join(self.enc.decode_bytes((d[1:] if i else d).tolist()) for i, d in enumerate(docs))

    def encode_doc(self, text):
        return np.array(self.enc.encode_ordinary(text) + [self.eot], dtype=np.uint32)


def get_tokenizer(name):
    if name == "bytes":
        return ByteTokenizer()
    import tiktoken  # imported here so the default, offline path never loads it
    choices = tiktoken.list_encoding_names()
    if name not in choices:
        raise UsageError(f"unknown tokenizer {name!r}; choose one of: bytes, {', '.join(choices)}")
    try:
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # the first use downloads the vocabulary; any network failure lands here
        raise UsageError(f"tokenizer {name!r} could not be downloaded ({type(e).__name__}); offline, "
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
        raise UsageError(f"{path} looks like a binary file (it contains NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None


def _build_streams(root, relpaths, tok, by_file, skip_bad):
    """Tokenize every document into a train and a val stream. by_file=True splits
    by split_of(relpath); otherwise, and whenever that leaves a split empty (a
    folder of one or two files), the last VAL_PERCENT% of the tokens become val."""
    parts, nbytes = {"train": [], "val": []}, 0
    for rel in relpaths:
        try:
            text = _read_text(os.path.join(root, rel))
        except UsageError:
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
# images: the embedded digits, downloaded datasets, user .npy files

DIGITS_VERSION = 1  # bump when the renderer changes, so caches are rebuilt

# Stroke shapes of each digit, in a box x in [-0.35, 0.35] (right), y in [0, 1] (down).
# A stroke is a list of control points that a Catmull-Rom spline passes through; a
# closed stroke starts with "o". Several variants per digit, as people write them.
DIGIT_STROKES = {
    0: [[["o", (0, 0), (-0.24, 0.12), (-0.31, 0.5), (-0.22, 0.88), (0, 1), (0.22, 0.88), (0.31, 0.5), (0.24, 0.12)]]],
    1: [[[(0.04, 0), (0, 0.5), (-0.04, 1)]],
        [[(-0.18, 0.2), (0.05, 0)], [(0.05, 0), (0.02, 0.5), (-0.01, 1)]],
        [[(-0.16, 0.18), (0.04, 0)], [(0.04, 0), (0.02, 0.5), (0, 0.97)], [(-0.17, 0.99), (0.17, 0.98)]]],
    2: [[[(-0.27, 0.22), (-0.12, 0.03), (0.1, 0.0), (0.26, 0.17), (0.2, 0.42), (-0.04, 0.7), (-0.3, 0.97)],
         [(-0.3, 0.97), (0.05, 0.96), (0.32, 0.98)]],
        [[(-0.27, 0.2), (-0.08, 0.01), (0.18, 0.04), (0.24, 0.3), (0.0, 0.62), (-0.28, 0.92),
          (-0.2, 1.0), (0.05, 0.92), (0.32, 0.97)]]],
    3: [[[(-0.25, 0.1), (0.0, 0.0), (0.23, 0.1), (0.2, 0.32), (-0.03, 0.47)],
         [(-0.03, 0.47), (0.24, 0.58), (0.27, 0.82), (0.05, 1.0), (-0.28, 0.9)]]],
    4: [[[(-0.04, 0), (-0.2, 0.4), (-0.3, 0.66)], [(-0.3, 0.66), (0.0, 0.65), (0.32, 0.64)],
         [(0.17, 0.22), (0.16, 0.6), (0.15, 1.0)]],
        [[(0.16, 0.0), (-0.05, 0.35), (-0.3, 0.66)], [(-0.3, 0.66), (0.32, 0.64)],
         [(0.16, 0.0), (0.15, 0.5), (0.14, 1.0)]]],
    5: [[[(0.28, 0.0), (0.0, 0.0), (-0.19, 0.01)], [(-0.19, 0.01), (-0.22, 0.22), (-0.25, 0.44)],
         [(-0.25, 0.44), (0.04, 0.36), (0.27, 0.5), (0.28, 0.78), (0.06, 0.99), (-0.28, 0.9)]]],
    6: [[[(0.22, 0.02), (-0.06, 0.12), (-0.25, 0.45), (-0.25, 0.8), (0, 1.0), (0.24, 0.84),
          (0.23, 0.6), (-0.02, 0.5), (-0.24, 0.64)]]],
    7: [[[(-0.3, 0.03), (0.0, 0.01), (0.3, 0.0)], [(0.3, 0.0), (0.1, 0.45), (-0.06, 1.0)]],
        [[(-0.3, 0.03), (0.0, 0.01), (0.3, 0.0)], [(0.3, 0.0), (0.1, 0.45), (-0.06, 1.0)],
         [(-0.08, 0.5), (0.24, 0.48)]]],
    8: [[["o", (0.0, 0.0), (-0.22, 0.12), (-0.14, 0.36), (0.16, 0.6), (0.26, 0.83), (0.0, 1.0),
          (-0.26, 0.83), (-0.16, 0.6), (0.14, 0.36), (0.22, 0.12)]]],
    9: [[[(0.24, 0.3), (0.04, 0.47), (-0.22, 0.4), (-0.26, 0.17), (0.0, 0.01), (0.22, 0.1), (0.24, 0.3),
          (0.2, 0.65), (0.12, 1.0)]],
        [[(0.24, 0.28), (0.02, 0.46), (-0.23, 0.38), (-0.24, 0.15), (0.02, 0.0), (0.23, 0.12), (0.24, 0.3),
          (0.22, 0.7), (0.04, 0.98), (-0.2, 0.92)]]],
}


def _spline_weights(strokes, per_unit=45):
    """(W [K, C], control points [C, 2]) so that W @ control points samples every stroke
    of one digit variant densely along a Catmull-Rom spline. Linear in the control
    points, so jittering them per image is one batched matmul."""
    ctrl, rows = [], []
    for stroke in strokes:
        closed = stroke[0] == "o"
        pts = list(stroke[1:] if closed else stroke)
        base, m = len(ctrl), len(pts)
        ctrl += pts
        P = np.asarray(pts, dtype=np.float64)

        def idx(i):  # a row vector picking point i, with mirrored ends for open strokes
            v = np.zeros(base + m)
            if closed:
                v[base + i % m] = 1
            elif i < 0:
                v[base], v[base + 1] = 2, -1
            elif i >= m:
                v[base + m - 1], v[base + m - 2] = 2, -1
            else:
                v[base + i] = 1
            return v

        for i in range(m if closed else m - 1):
            n = max(2, int(math.ceil(np.linalg.norm(P[(i + 1) % m] - P[i]) * per_unit)))
            last = (i == m - 2) and not closed
            for t in np.linspace(0, 1, n + 1 if last else n, endpoint=last):
                w = 0.5 * np.array([-t + 2 * t * t - t ** 3, 2 - 5 * t * t + 3 * t ** 3,
                                    t + 4 * t * t - 3 * t ** 3, -t * t + t ** 3])
                rows.append(sum(wj * idx(i - 1 + j) for j, wj in enumerate(w)))
    C = len(ctrl)
    W = np.stack([np.pad(r, (0, C - len(r))) for r in rows])
    return torch.tensor(W, dtype=torch.float32), torch.tensor(ctrl, dtype=torch.float32)


def render_digits(labels, seed, size=28):
    """uint8 [N, size, size] images of the given digit labels, deterministic in seed."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    N = len(labels)
    out = torch.zeros(N, size * size)
    variant = torch.randint(0, 1 << 30, (N,), generator=g)
    for d, variants in DIGIT_STROKES.items():
        for v, strokes in enumerate(variants):
            sel = ((labels == d) & (variant % len(variants) == v)).nonzero().squeeze(1)
            if len(sel) == 0:
                continue
            W, ctrl = _spline_weights(strokes)
            n = len(sel)
            # wobble of each control point, then a smooth quadratic warp of the whole digit
            c = ctrl + 0.025 * torch.randn(n, *ctrl.shape, generator=g)
            p = W @ c  # [n, K, 2]
            x, y = p[..., 0], p[..., 1] - 0.5
            quad = torch.stack([x * x, x * y, y * y], -1)  # [n, K, 3]
            p = p + quad @ (0.12 * torch.randn(n, 3, 2, generator=g))
            # slant, rotation, aspect
            shear = 0.18 * torch.randn(n, generator=g) + 0.05
            rot = 0.08 * torch.randn(n, generator=g)
            sx = 0.8 + 0.4 * torch.rand(n, generator=g)
            A = torch.zeros(n, 2, 2)
            cr, sr = torch.cos(rot), torch.sin(rot)
            A[:, 0, 0], A[:, 0, 1], A[:, 1, 0], A[:, 1, 1] = cr * sx, -sr - shear, sr * sx, cr
            p = torch.stack([p[..., 0], p[..., 1] - 0.5], -1) @ A.transpose(1, 2)
            # As MNIST: the digit's height fills a 20-pixel box, its centre of mass at the centre.
            h = p[..., 1].amax(1) - p[..., 1].amin(1)
            w = p[..., 0].amax(1) - p[..., 0].amin(1)
            scale = (20 - 2.5 * torch.rand(n, generator=g)) / torch.maximum(h, w)
            p = p * scale[:, None, None]
            p = p - p.mean(1, keepdim=True) + (size - 1) / 2 + 0.7 * torch.randn(n, 1, 2, generator=g)
            # bilinear splat of the dense stroke points into an ink density
            x0, y0 = p[..., 0].floor(), p[..., 1].floor()
            fx, fy = p[..., 0] - x0, p[..., 1] - y0
            img = torch.zeros(n * size * size)
            base = (torch.arange(n) * size * size)[:, None]
            for dx, dy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                                (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
                xi, yi = x0.long() + dx, y0.long() + dy
                ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
                img.index_add_(0, (base + yi * size + xi)[ok], (wgt * scale[:, None] / 20)[ok])
            out[sel] = img.view(n, -1)
            out[sel] *= (2.4 + 3.0 * torch.rand(n, 1, generator=g))  # pen pressure: stroke width
    # a Gaussian pen tip, then ink saturates
    k = torch.exp(-torch.arange(-2, 3.0) ** 2 / (2 * 0.85 ** 2))
    k = k / k.sum()
    img = out.view(N, 1, size, size)
    img = F.conv2d(F.pad(img, (2, 2, 0, 0)), k.view(1, 1, 1, 5))
    img = F.conv2d(F.pad(img, (0, 0, 2, 2)), k.view(1, 1, 5, 1))
    img = 1 - torch.exp(-img)
    return (img.squeeze(1) * 255).round().to(torch.uint8)


def digits_arrays(split, data_dir):
    """(uint8 images [N, 1, 28, 28], int64 labels [N]) of the embedded digits: 60,000
    train and 10,000 val, each split from its own seed, exactly 10% of each digit.
    Rendered once (a few seconds) and cached; the cache name carries a hash of the
    stroke table, so editing a shape re-renders."""
    n, seed = {"train": (60000, 1), "val": (10000, 2)}[split]
    tag = hashlib.sha1(json.dumps([DIGITS_VERSION, DIGIT_STROKES]).encode()).hexdigest()[:10]
    path = os.path.join(data_dir, "cache", f"digits-{tag}-{split}.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["images"], z["labels"]
    except (OSError, ValueError, KeyError, EOFError):
        pass  # missing or damaged: render again
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    images = render_digits(labels, seed).unsqueeze(1).numpy()
    labels = labels.numpy()
    try:
        atomic_write(path, lambda f: np.savez(f, images=images, labels=labels))
    except OSError as e:
        print(f"data: could not cache digits in {path} ({e.strerror}); rendering each time", file=sys.stderr)
    return images, labels


# Downloads: (file, sha256) per dataset, and the places that serve them, tried in order.
DOWNLOADS = {
    "mnist": dict(urls=["https://ossci-datasets.s3.amazonaws.com/mnist/",
                        "https://storage.googleapis.com/cvdf-datasets/mnist/"], files={
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"}),
    "fashion-mnist": dict(urls=["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                                "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"],
                          files={
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"}),
    "cifar10": dict(urls=["https://www.cs.toronto.edu/~kriz/"], files={
        "cifar-10-binary.tar.gz": "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"}),
}


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name, data_dir):
    """Paths of the dataset's files in data_dir/name, downloading the missing ones.
    Every file, downloaded or already there, must match its sha256."""
    spec, folder = DOWNLOADS[name], os.path.join(data_dir, name)
    missing, errors = [f for f in spec["files"] if not os.path.exists(os.path.join(folder, f))], []
    for fname in missing:
        for base in spec["urls"]:
            print(f"data: downloading {base}{fname}", file=sys.stderr)
            try:
                with urllib.request.urlopen(base + fname, timeout=30) as r:
                    atomic_write(os.path.join(folder, fname), lambda f: _copy(r, f, spec["files"][fname], fname))
                break
            except UsageError:
                raise
            except Exception as e:  # offline, DNS, HTTP errors, timeouts: try the next place
                errors.append(f"{type(e).__name__}: {e}")
    still = [f for f in missing if not os.path.exists(os.path.join(folder, f))]
    if still:
        raise UsageError(f"{name}: cannot download {', '.join(still)} ({errors[-1][:80]}); "
                        f"get them from {spec['urls'][0]} and put them in {folder}/")
    for fname, want in spec["files"].items():
        got = sha256_of(os.path.join(folder, fname))
        if got != want:
            raise UsageError(f"{os.path.join(folder, fname)} has sha256 {got[:12]}..., not {want[:12]}... "
                            f"(damaged or a different file); delete it and run again to download it")
    return {f: os.path.join(folder, f) for f in spec["files"]}


def _copy(response, f, want, fname):
    h = hashlib.sha256()
    for block in iter(lambda: response.read(1 << 20), b""):
        h.update(block)
        f.write(block)
    if h.hexdigest() != want:
        raise UsageError(f"downloaded {fname} has sha256 {h.hexdigest()[:12]}..., not {want[:12]}...; "
                        f"the server sent something else, try again later")


def read_idx(data):
    """The IDX format of MNIST: a big-endian magic (two zero bytes, a type code, the
    number of dimensions), one big-endian uint32 per dimension, then the values."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise UsageError("not an IDX file (bad magic number)")
    types = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in types or not 1 <= data[3] <= 4:
        raise UsageError(f"not an IDX file (type {data[2]:#x}, {data[3]} dimensions)")
    ndim, dtype = data[3], np.dtype(types[data[2]])
    if len(data) < 4 + 4 * ndim:
        raise UsageError("IDX file truncated in its header")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim:]
    if len(body) != math.prod(dims) * dtype.itemsize:
        raise UsageError(f"IDX file holds {len(body)} bytes of data, its header says {dims}")
    return np.frombuffer(body, dtype).reshape(dims)


def read_cifar_bin(data):
    """CIFAR-10 binary batches: records of one label byte then 3072 bytes, the 32x32
    red, green and blue planes row by row. -> (uint8 [N, 3, 32, 32], int64 [N])."""
    if len(data) % 3073:
        raise UsageError(f"a CIFAR-10 binary batch is a whole number of 3073-byte records, not {len(data)} bytes")
    rec = np.frombuffer(data, np.uint8).reshape(-1, 3073)
    if len(rec) and rec[:, 0].max() > 9:
        raise UsageError("CIFAR-10 labels must be 0..9")
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


def downloaded_arrays(name, data_dir):
    """{"train": (images, labels), "val": (images, labels)} of mnist, fashion-mnist or
    cifar10; val is the official test set."""
    paths = fetch(name, data_dir)
    if name == "cifar10":
        import tarfile
        parts = {}
        with tarfile.open(paths["cifar-10-binary.tar.gz"], "r:gz") as tar:
            for m in tar.getmembers():
                if m.isfile() and m.name.endswith(".bin"):
                    parts[os.path.basename(m.name)] = read_cifar_bin(tar.extractfile(m).read())
        want = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
        if any(w not in parts for w in want):
            raise UsageError(f"{paths['cifar-10-binary.tar.gz']} lacks some of {want}")
        train = [parts[w] for w in want[:5]]
        return {"train": (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])),
                "val": parts["test_batch.bin"]}
    import gzip
    out = {}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images = read_idx(gzip.decompress(open(paths[f"{prefix}-images-idx3-ubyte.gz"], "rb").read()))
        labels = read_idx(gzip.decompress(open(paths[f"{prefix}-labels-idx1-ubyte.gz"], "rb").read()))
        out[split] = (images[:, None], labels.astype(np.int64))
    return out


def npy_images(path):
    """A user's .npy of uint8 images, (N,H,W), (N,H,W,C) or (N,C,H,W) with C 1 or 3,
    as uint8 [N, C, H, W]."""
    if not os.path.isfile(path):
        raise UsageError(f"no such file: {path}")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # a damaged header fails in numpy's parser in many ways (fuzzing found tokenize.TokenError)
        raise UsageError(f"{path} is not a readable .npy file ({str(e)[:80]}); save images with np.save") from None
    return image_array(a, path)


def image_array(a, path):
    """An array of uint8 images, (N,H,W), (N,H,W,C) or (N,C,H,W) with C 1 or 3, as uint8
    [N, C, H, W] in memory; anything else is one line naming `path`."""
    if a.dtype != np.uint8:
        raise UsageError(f"{path} holds {a.dtype}, not uint8; save images as uint8 0..255 "
                         f"(e.g. (x * 255).round().astype(np.uint8))")
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[1] in (1, 3):
        pass  # already N, C, H, W
    elif a.ndim == 4 and a.shape[3] in (1, 3):
        a = a.transpose(0, 3, 1, 2)
    else:
        raise UsageError(f"{path} has shape {a.shape}; give (N,H,W), (N,H,W,C) or (N,C,H,W) with C = 1 or 3")
    if a.shape[2] != a.shape[3] or a.shape[2] < 4:
        raise UsageError(f"{path}: images are {a.shape[2]}x{a.shape[3]}; nanogen's image models take square images")
    return np.array(a, order="C")  # read into memory, writable (the map is read-only), N, C, H, W contiguous


def holdout(x, y, path):
    """{"train": (x, y), "val": (x, y)}: 5% of the images (a fixed random choice, at least
    one) held out for val; y may be None."""
    n = len(x)
    if n < 2:
        raise UsageError(f"{path} holds {n} image(s); give at least 2 (one for train, one for val)")
    perm = np.random.default_rng(0).permutation(n)
    n_val = max(1, n * VAL_PERCENT // 100)
    parts = {"val": np.sort(perm[:n_val]), "train": np.sort(perm[n_val:])}
    return {s: (x[i], None if y is None else y[i]) for s, i in parts.items()}


def user_images(name, data_dir, channels=None, image_size=None):
    """({split: (images, labels or None)}, class names or None) of a user's .npy, .npz or
    folder of images (see images.py)."""
    if name.endswith(".npy"):
        return npy_arrays(name), None
    if name.endswith(".npz"):
        if not os.path.isfile(name):
            raise UsageError(f"no such file: {name}")
        x, y, classes = images.npz_arrays(name)
        return holdout(image_array(x, name), y, name), classes
    x, y, classes = images.load_folder(name, data_dir, channels, image_size)
    return holdout(x, y, name), classes or None


def is_image_folder(name):
    """Whether `name` is a folder holding images (and no .txt files, which make it text)."""
    if not os.path.isdir(name):
        return False
    found = {os.path.splitext(f)[1].lower() for _, _, files in os.walk(name) for f in files
             if not f.startswith(".")}
    if ".txt" in found and found & set(images.SUFFIXES):
        raise UsageError(f"{name} holds both .txt files and images; give a folder of text or a folder of images")
    return bool(found & set(images.SUFFIXES))

def npy_arrays(path):
    """npy_images, of which 5% (a fixed random choice) are held out for val."""
    return holdout(npy_images(path), None, path)

# -----------------------------------------------------------------------------
# 2D points: the mode-collapse benchmarks

POINTS = {
    # 8 Gaussians on the unit circle at angles 2 pi k / 8, so 0 and 2 pi are not both modes.
    "ring8": (torch.stack([torch.cos(torch.arange(8) * 2 * math.pi / 8),
                           torch.sin(torch.arange(8) * 2 * math.pi / 8)], 1), 0.01),
    # 25 Gaussians on the grid {-4, -2, 0, 2, 4}^2.
    "grid25": (torch.cartesian_prod(torch.arange(-4.0, 5, 2), torch.arange(-4.0, 5, 2)), 0.05),
}

# -----------------------------------------------------------------------------
# PNG output with the standard library (zlib), so no Pillow is needed


def write_png(path, pixels):
    """pixels: uint8 array [H, W] (gray) or [H, W, 3] (RGB) -> an 8-bit PNG file."""
    a = np.ascontiguousarray(pixels, dtype=np.uint8)
    h, w = a.shape[:2]
    color = 0 if a.ndim == 2 else 2
    raw = np.concatenate([np.zeros((h, 1), np.uint8), a.reshape(h, -1)], 1).tobytes()  # filter 0 per row

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    atomic_write(path, lambda f: f.write(png))


def to_uint8(images):
    """Float images in [-1, 1] -> uint8 0..255, the inverse of how batches are made."""
    return ((torch.as_tensor(images).detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images, path, nrow=8, pad=2, scale=1):
    """Images [N, C, H, W] in [-1, 1] (C = 1 or 3) -> one PNG, nrow images per row,
    pad pixels of gray between them, each pixel drawn scale x scale."""
    x = to_uint8(images)
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    grid = torch.full((c, rows * (h + pad) + pad, ncol * (w + pad) + pad), 128, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = x[i]
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    write_png(path, grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy())


def save_scatter(points, path, centers=None, radius=None, size=480, extent=None):
    """2D points as blue dots on white; the true modes (centers) as red rings of the
    given radius in data units (default 3% of the view). extent: half-width of the
    square in data units (default: fits the centers, or the points if none)."""
    pts = torch.as_tensor(points).detach().float().cpu()
    pts = pts[torch.isfinite(pts).all(1)]
    if extent is None:
        ref = pts if centers is None else torch.as_tensor(centers).float()
        extent = 1.25 * float(ref.abs().max()) if len(ref) else 1.0
    img = np.full((size, size, 3), 255, np.uint8)

    def plot(p, color, dot=2):
        px = ((p / extent + 1) * 0.5 * (size - dot)).round().long()
        px = px[((px >= 0) & (px < size - dot + 1)).all(1)].numpy()
        for dx in range(dot):
            for dy in range(dot):
                img[size - 1 - px[:, 1] - dy, px[:, 0] + dx] = color  # y grows upwards
    plot(pts, (30, 60, 160))
    if centers is not None:
        t = torch.linspace(0, 2 * math.pi, 90)
        r = radius if radius is not None else 0.03 * extent
        for c in torch.as_tensor(centers).float():
            plot(c + r * torch.stack([t.cos(), t.sin()], 1), (220, 30, 30), dot=1)
    write_png(path, img)


def save_samples(x, path, classes=0, label=None, points=None):
    """The picture of a model's samples, for train.py's evaluations and sample.py: images
    as a grid, one column per class where the labels cycle through the classes (see
    contract.sample_labels); 2D points as a scatter over the true modes of `points` (a
    POINTS name), each ringed at 3 standard deviations."""
    if points is not None:
        centers, std = POINTS[points] if points in POINTS else (None, None)
        save_scatter(x, path, centers=centers, radius=None if std is None else 3 * std)
    else:
        save_grid(x, path, nrow=classes if classes and label is None else int(math.ceil(math.sqrt(len(x)))))


# -----------------------------------------------------------------------------
# splits and batches


@dataclass(frozen=True)
class DataInfo:
    """What a split holds: what train.py sizes a model by, counts its speed in, and
    records in the checkpoint."""
    kind: str                       # "tokens", "image" or "points"
    shape: tuple                    # one example's: (block_size,), (channels, height, width) or (2,)
    count: int = 0                  # tokens of text, images; 0 for points (drawn afresh)
    classes: tuple = None           # the class names of labelled images (None: no labels)
    vocab_size: int = None          # text: the tokenizer's symbols
    bytes_per_token: float = None   # text: raw bytes per token, for bits per byte
    tokenizer: str = None           # text: the tokenizer's name
    modes: int = None               # points: the mixture's modes
    mode_std: float = None          # points: each mode's standard deviation

    @property
    def unit(self):
        """What the speed counts: tokens, images or points."""
        return {"tokens": "tok", "image": "img", "points": "pt"}[self.kind]

    def model_fields(self):
        """The values of the data-dependent fields a model's Config may have."""
        image, points = self.kind == "image", self.kind == "points"
        return dict(channels=self.shape[0] if image else None, image_size=self.shape[1] if image else None,
                    num_classes=len(self.classes) if self.classes else None,
                    point_dim=self.shape[0] if points else 0 if image else None, vocab_size=self.vocab_size)

    def record(self):
        """As plain values, for a checkpoint's config."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return {**d, "shape": list(self.shape), "classes": list(self.classes) if self.classes else None}


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


class ImageSplit:
    """One split's images (uint8, kept in memory) and labels (or None); a batch is
    batch_size random images, as floats in [-1, 1]."""

    def __init__(self, images, labels, info):
        self.images = torch.from_numpy(np.require(images, requirements=["C", "W"]))  # copies read-only arrays
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.info = info

    def __len__(self):
        return len(self.images)

    def batch(self, batch_size, generator):
        """x float [B, C, H, W] in [-1, 1], y int64 [B] or None."""
        i = torch.randint(0, len(self), (batch_size,), generator=generator)
        x = self.images[i].float().div_(127.5).sub_(1)
        return x, None if self.labels is None else self.labels[i]


class PointSplit:
    """A mixture of equal Gaussians in 2D; every batch is fresh samples of it."""

    def __init__(self, centers, std, info):
        self.centers, self.std, self.info = centers, std, info

    def batch(self, batch_size, generator):
        """x float [B, 2], y None (the mode a point came from is not a label to learn)."""
        k = torch.randint(0, len(self.centers), (batch_size,), generator=generator)
        return self.centers[k] + self.std * torch.randn(batch_size, 2, generator=generator), None


IMAGE_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")


def load(name, *, tokenizer="bytes", data_dir="data", block_size=256, channels=None, image_size=None):
    """-> {"train": split, "val": split} for a dataset name or path. tokenizer and
    block_size apply to text only; channels and image_size (None: the folder's own) to a
    folder of images only."""
    if name in IMAGE_DATASETS or name.endswith((".npy", ".npz")) or is_image_folder(name):
        return load_images(name, data_dir, channels, image_size)
    if name in POINTS:
        centers, std = POINTS[name]
        info = DataInfo("points", (2,), modes=len(centers), mode_std=std)
        return {s: PointSplit(centers, std, info) for s in ("train", "val")}
    return load_text(name, tokenizer, data_dir, block_size)


def load_images(name, data_dir, channels, image_size):
    """The splits of an image dataset: embedded, downloaded, or the user's files."""
    classes = [str(k) for k in range(10)] if name in IMAGE_DATASETS else None
    if name == "digits":
        arrays = {s: digits_arrays(s, data_dir) for s in ("train", "val")}
    elif name in IMAGE_DATASETS:
        arrays = downloaded_arrays(name, data_dir)
    else:
        arrays, classes = user_images(name, data_dir, channels, image_size)
    labelled = arrays["train"][1] is not None
    if labelled and classes is None:  # a .npz without names: its labels are the classes
        classes = [str(k) for k in range(1 + max(int(y.max()) for _, y in arrays.values() if len(y)))]
    out = {}
    for s, (x, y) in arrays.items():
        c, h, w = x.shape[1:]
        info = DataInfo("image", (c, h, w), len(x), tuple(classes) if labelled else None)
        out[s] = ImageSplit(x, y, info)
    return out


def load_text(name, tokenizer, data_dir, block_size):
    """The splits of a text dataset, tokenized once into a cache under data_dir."""
    if name == "pystdlib":
        root, relpaths = pystdlib_files()
        key, by_file, skip_bad, extra = "pystdlib", True, True, [sys.version]
    elif os.path.isdir(name):
        root, relpaths = name, _list_files(name, ".txt")
        if not relpaths:
            raise UsageError(f"folder {name} has no .txt files; give a .txt file or a folder that holds some")
        key, by_file, skip_bad, extra = os.path.basename(os.path.abspath(name)), True, False, []
    elif os.path.isfile(name):
        root, relpaths = os.path.dirname(name) or ".", [os.path.basename(name)]
        if os.path.getsize(name) == 0:
            raise UsageError(f"{name} is empty; give a text file with some text in it")
        key, by_file, skip_bad, extra = os.path.basename(name), False, False, []
    elif "/" in name or os.sep in name or name.endswith(".txt"):
        raise UsageError(f"no such file or folder: {name}")
    else:
        raise UsageError(f"unknown dataset {name!r}; use pystdlib, digits, mnist, fashion-mnist, cifar10, ring8, "
                         f"grid25, a .txt file, a folder of .txt files, a folder of images (one subfolder per "
                         f"class, or none), a .npy of uint8 images or a .npz of images x and labels y")

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
            raise UsageError(f"{name} holds no text, only empty files; give files with some text in them")
        for s, p in paths.items():
            try:
                write_tokens(p, streams[s], {**expect, "bytes_per_token": bytes_per_token})
            except OSError as e:  # full disk, read-only folder
                raise UsageError(f"cannot write token cache {p} ({e.strerror}); "
                                f"free some space or pass another --data-dir") from None
        cached = {s: read_tokens(p, expect) for s, p in paths.items()}

    out = {}
    for s, (tokens, meta) in cached.items():
        if len(tokens) < block_size + 1:
            raise UsageError(f"the {s} split of {name} has {len(tokens)} tokens, fewer than block_size+1 = "
                            f"{block_size + 1}; lower --block-size or use more text")
        info = DataInfo("tokens", (block_size,), len(tokens), vocab_size=tok.vocab_size,
                        bytes_per_token=meta["bytes_per_token"], tokenizer=tok.name)
        out[s] = TokenSplit(tokens, block_size, info)
        out[s].cache_path, out[s].fingerprint = paths[s], meta["source"]  # keys of caches of its text
    return out


def load_for_model(name, mcfg, given, tokenizer, data_dir, model="the model", pretrained=False):
    """-> (splits, info) of dataset `name` for a model whose Config is mcfg; fills mcfg's
    data-dependent fields (channels, image_size, num_classes, point_dim, vocab_size) not
    set on the command line (`given`). A Config declares the data it takes by having
    image_size, point_dim or vocab_size."""
    # A folder of images is converted to these where given (else to what most of its images are).
    asked = {k: getattr(mcfg, k) for k in ("channels", "image_size") if k in given and hasattr(mcfg, k)}
    splits = load(name, tokenizer=tokenizer, data_dir=data_dir, block_size=getattr(mcfg, "block_size", 256),
                  **asked)
    info = splits["train"].info
    need = {"image": "image_size", "points": "point_dim", "tokens": "vocab_size"}[info.kind]
    if not hasattr(mcfg, need):  # e.g. diffusion on 2D points: its Config has no point_dim
        raise UsageError(f"--data {name} is {info.kind} data, which --model {model} does not take "
                         f"(its Config has no {need})")
    if info.vocab_size and hasattr(mcfg, "vocab_size"):
        if mcfg.vocab_size <= 0:
            mcfg.vocab_size = info.vocab_size
        elif mcfg.vocab_size < info.vocab_size:
            fix = "use --tokenizer gpt2" if pretrained else "raise --vocab-size or pick another tokenizer"
            raise UsageError(f"tokenizer {tokenizer} has {info.vocab_size} symbols but the model's "
                             f"vocab_size is {mcfg.vocab_size}; {fix}")
    for k, v in info.model_fields().items():
        if k == "vocab_size" or not hasattr(mcfg, k):
            continue
        mine = getattr(mcfg, k)
        if k not in given:
            setattr(mcfg, k, mine if v is None else v)
        elif mine != v and not (k == "num_classes" and mine == 0):  # 0 classes: labels ignored, on purpose
            has = f"{k.replace('_', ' ')} {v}" if v is not None else "no labels" if k == "num_classes" else f"no {k}"
            raise UsageError(f"--{k.replace('_', '-')} {mine}: {name} has {has}; drop the flag, the data sets it")
    return splits, info
