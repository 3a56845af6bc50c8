import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from cli import UsageError  # noqa: E402
from data import load  # noqa: E402


def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def as_bytes(tokens):
    """A bytes-tokenizer stream back to raw bytes."""
    return np.asarray(tokens).astype(np.uint8).tobytes()


def offsets(split, batch_size, seed):
    """The window starts batch() draws, replayed from an identically seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(split) - split.block_size, (batch_size,), generator=g).tolist()


# -----------------------------------------------------------------------------
# pystdlib

@pytest.fixture(scope="module")
def stdlib(tmp_path_factory):
    return load("pystdlib", data_dir=str(tmp_path_factory.mktemp("data")), block_size=256)


def test_split_of_is_deterministic_and_about_five_percent():
    _, rels = data.pystdlib_files()
    assert len(rels) > 500
    assert not any("site-packages" in r or "__pycache__" in r or "\\" in r for r in rels)
    assert rels == sorted(rels)
    first = [data.split_of(r) for r in rels]
    assert first == [data.split_of(r) for r in rels]
    frac = first.count("val") / len(first)
    assert 0.03 < frac < 0.07, frac
    # pinned values: sha1 of the path, so this holds on any machine and Python
    assert [f"f{i}.txt" for i in range(60) if data.split_of(f"f{i}.txt") == "val"] == ["f10.txt", "f51.txt", "f52.txt"]
    assert {data.split_of(f"f{i}.txt") for i in range(200)} == {"train", "val"}


def test_pystdlib_splits_are_disjoint_by_file(stdlib):
    root, rels = data.pystdlib_files()
    sizes = {"train": 0, "val": 0}
    for r in rels:
        raw = open(os.path.join(root, r), "rb").read()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if b"\0" not in raw:
            sizes[data.split_of(r)] += len(raw)
    # every byte of a val file is in val and none in train, and vice versa
    assert len(stdlib["train"]) == sizes["train"]
    assert len(stdlib["val"]) == sizes["val"]
    val_text = as_bytes(stdlib["val"].tokens).decode("utf-8")
    val_file = next(r for r in rels if data.split_of(r) == "val" and os.path.getsize(os.path.join(root, r)) > 100)
    assert open(os.path.join(root, val_file), encoding="utf-8").read() in val_text


def test_pystdlib_info_and_batches(stdlib):
    tr = stdlib["train"]
    assert tr.info == data.DataInfo(kind="tokens", shape=(256,), count=len(tr), vocab_size=256, bytes_per_token=1.0,
                                    tokenizer="bytes")
    assert tr.tokens.dtype == np.uint16
    x, y = tr.batch(12, torch.Generator().manual_seed(7))
    assert x.shape == y.shape == (12, 256) and x.dtype == y.dtype == torch.int64
    for row, s in enumerate(offsets(tr, 12, 7)):
        assert np.array_equal(x[row].numpy(), tr.tokens[s:s + 256])
        assert np.array_equal(y[row].numpy(), tr.tokens[s + 1:s + 257])
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_same_seed_same_batch_different_seed_different(stdlib):
    tr = stdlib["train"]
    a = tr.batch(4, torch.Generator().manual_seed(1))
    b = tr.batch(4, torch.Generator().manual_seed(1))
    c = tr.batch(4, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_last_window_is_reachable_and_y_stays_in_bounds(tmp_path):
    split = data.TokenSplit(np.arange(10, dtype=np.uint16), 8, {})
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(50):
        x, y = split.batch(4, g)
        starts |= set(x[:, 0].tolist())
        assert int(y.max()) <= 9
    assert starts == {0, 1}  # 10 tokens, window 9: starts 0 and 1, and y of start 1 ends on token 9
    exact = data.TokenSplit(np.arange(9, dtype=np.uint16), 8, {})
    x, y = exact.batch(3, g)
    assert x[:, 0].tolist() == [0, 0, 0] and y[:, -1].tolist() == [8, 8, 8]


# -----------------------------------------------------------------------------
# the cache

def make_text(path, n=3000):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(n))
    path.write_text(text)
    return text


def cache_files(data_dir):
    return sorted((Path(data_dir) / "cache").glob("*.bin"))


def test_second_load_reuses_cache(tmp_path, monkeypatch):
    make_text(tmp_path / "a.txt")
    dd = str(tmp_path / "d")
    first = load(str(tmp_path / "a.txt"), data_dir=dd, block_size=32)
    files = cache_files(dd)
    assert len(files) == 2
    stamps = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]

    def no_build(*a, **k):
        raise AssertionError("cache was rebuilt")
    monkeypatch.setattr(data, "_build_streams", no_build)
    second = load(str(tmp_path / "a.txt"), data_dir=dd, block_size=32)
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in cache_files(dd)] == stamps
    assert np.array_equal(first["train"].tokens, second["train"].tokens)
    assert not list((Path(dd) / "cache").glob("*.tmp*"))


@pytest.mark.parametrize("field", ["tokenizer", "source"])
def test_cache_from_other_tokenizer_or_source_is_rebuilt(tmp_path, field):
    text = make_text(tmp_path / "a.txt")
    dd = str(tmp_path / "d")
    load(str(tmp_path / "a.txt"), data_dir=dd, block_size=32)
    train_file = next(f for f in cache_files(dd) if f.name.endswith("-train.bin"))
    _, meta = data.read_tokens(str(train_file), {})
    meta = {k: meta[k] for k in ("tokenizer", "vocab_size", "source", "bytes_per_token")}
    meta[field] = "something-else"
    data.write_tokens(str(train_file), np.zeros(5000, np.uint16), meta)  # plausible but wrong

    d = load(str(tmp_path / "a.txt"), data_dir=dd, block_size=32)
    assert as_bytes(d["train"].tokens) + as_bytes(d["val"].tokens) == text.encode()
    _, meta = data.read_tokens(str(train_file), {})
    assert meta["tokenizer"] == "bytes" and meta["source"] != "something-else"


def test_changed_source_file_is_rebuilt(tmp_path):
    make_text(tmp_path / "a.txt")
    dd = str(tmp_path / "d")
    load(str(tmp_path / "a.txt"), data_dir=dd, block_size=32)
    new = make_text(tmp_path / "a.txt", n=4000)
    d = load(str(tmp_path / "a.txt"), data_dir=dd, block_size=32)
    assert len(d["train"]) + len(d["val"]) == len(new.encode())


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_cache_is_rebuilt_not_trusted(tmp_path, damage):
    text = make_text(tmp_path / "a.txt")
    dd = str(tmp_path / "d")
    load(str(tmp_path / "a.txt"), data_dir=dd, block_size=32)
    for f in cache_files(dd):
        raw = f.read_bytes()
        f.write_bytes(raw[:-100] if damage == "truncate" else os.urandom(len(raw)))
        assert data.read_tokens(str(f), {}) is None
    d = load(str(tmp_path / "a.txt"), data_dir=dd, block_size=32)
    assert len(d["train"]) + len(d["val"]) == len(text.encode())


def test_token_cache_uses_uint32_above_65536(tmp_path):
    path = str(tmp_path / "t.bin")
    for vocab, dtype in [(256, np.uint16), (65536, np.uint16), (65537, np.uint32), (100_000, np.uint32)]:
        tokens = np.array([0, 1, vocab - 1, vocab - 2], dtype=np.int64)
        data.write_tokens(path, tokens, {"tokenizer": "t", "vocab_size": vocab, "source": "s",
                                         "bytes_per_token": 1.0})
        got, meta = data.read_tokens(path, {"tokenizer": "t", "vocab_size": vocab, "source": "s"})
        assert got.dtype == dtype and meta["dtype"] == np.dtype(dtype).name
        assert got.tolist() == tokens.tolist()
        assert data.read_tokens(path, {"tokenizer": "other"}) is None


class BigTokenizer:
    """A stand-in for a vocabulary over 65536 symbols: byte b becomes 70000 + b."""
    name, vocab_size, eot = "big", 70_256, 69_999

    def encode_doc(self, text):
        return np.array([70_000 + b for b in text.encode()] + [self.eot], dtype=np.uint32)


def test_load_with_large_vocab_writes_uint32(tmp_path, monkeypatch):
    text = make_text(tmp_path / "a.txt", n=200)
    monkeypatch.setattr(data, "get_tokenizer", lambda name: BigTokenizer())
    d = load(str(tmp_path / "a.txt"), tokenizer="big", data_dir=str(tmp_path / "d"), block_size=16)
    assert d["train"].tokens.dtype == np.uint32
    stream = np.concatenate([d["train"].tokens, d["val"].tokens])
    assert stream.tolist() == [70_000 + b for b in text.encode()] + [69_999]
    x, y = d["train"].batch(8, torch.Generator().manual_seed(0))
    assert x.min() >= 70_000 and torch.equal(x[:, 1:], y[:, :-1])
    # the same two integers divided once (correctly rounded): equal, not just close
    assert d["train"].info.bytes_per_token == len(text.encode()) / len(stream)


# -----------------------------------------------------------------------------
# user text files and folders

def test_single_txt_file(tmp_path):
    text = make_text(tmp_path / "a.txt")
    d = load(str(tmp_path / "a.txt"), data_dir=str(tmp_path / "d"), block_size=64)
    tr, va = d["train"], d["val"]
    n = len(text.encode())
    assert len(tr) + len(va) == n and len(va) == n * 5 // 100  # last 5% of the stream
    tok = data.get_tokenizer("bytes")
    assert tok.decode(list(va.tokens)) == text[len(tr):]
    x, y = tr.batch(6, torch.Generator().manual_seed(3))
    for row, s in enumerate(offsets(tr, 6, 3)):
        assert tok.decode(x[row].tolist()) == text[s:s + 64]
        assert tok.decode(y[row].tolist()) == text[s + 1:s + 65]


def test_folder_of_txt_files_splits_by_file(tmp_path):
    folder = tmp_path / "corpus"
    texts = {}
    for i in range(60):
        rel = f"sub{i % 3}/doc{i:02d}.txt"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        texts[rel] = f"document {i} ünïcödé\n" * 20
        (folder / rel).write_text(texts[rel], encoding="utf-8")
    (folder / "notes.md").write_text("not a txt file\n")
    (folder / "empty.txt").write_text("")  # empty files are skipped in folders
    d = load(str(folder), data_dir=str(tmp_path / "d"), block_size=32)
    want = {s: "".join(t for r, t in sorted(texts.items()) if data.split_of(r) == s) for s in ("train", "val")}
    assert want["val"] and want["train"]  # this set of names does put files on both sides
    for s in ("train", "val"):
        assert as_bytes(d[s].tokens).decode() == want[s]
        assert d[s].info.bytes_per_token == 1.0


def test_folder_with_one_file_falls_back_to_tail_split(tmp_path):
    (tmp_path / "c").mkdir()
    text = make_text(tmp_path / "c" / "only.txt")
    d = load(str(tmp_path / "c"), data_dir=str(tmp_path / "d"), block_size=32)
    assert len(d["val"]) == len(text) * 5 // 100
    assert as_bytes(d["val"].tokens).decode() == text[-len(d["val"]):]


class FakeEnc:
    """Just enough of a tiktoken Encoding: bytes as tokens, 256 is end-of-text."""
    name, n_vocab, eot_token = "fake", 257, 256

    def encode_ordinary(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode()


def test_bpe_tokenizer_appends_eot_after_each_document(tmp_path, monkeypatch):
    folder = tmp_path / "c"
    folder.mkdir()
    for i in range(30):
        (folder / f"{i}.txt").write_text("hello world " * 10)
    monkeypatch.setattr(data, "get_tokenizer", lambda name: data.TiktokenTokenizer(FakeEnc()))
    d = load(str(folder), tokenizer="fake", data_dir=str(tmp_path / "d"), block_size=16)
    stream = np.concatenate([d["train"].tokens, d["val"].tokens])
    assert (stream == 256).sum() == 30 and stream[-1] == 256
    assert d["train"].info.bytes_per_token == 30 * 120 / (30 * 121)  # one division of the same integers
    assert d["train"].info.tokenizer == "fake" and d["train"].info.vocab_size == 257


def test_bad_inputs_raise_one_line_data_errors(tmp_path):
    dd = str(tmp_path / "d")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.txt").write_bytes(b"ELF\0\0\x01\x02" * 100)
    (tmp_path / "latin1.txt").write_bytes("café crème\n".encode("latin-1") * 100)
    (tmp_path / "nofiles").mkdir()
    (tmp_path / "allempty").mkdir()
    (tmp_path / "allempty" / "e.txt").write_text("")
    cases = {
        str(tmp_path / "empty.txt"): "empty",
        str(tmp_path / "bin.txt"): "binary",
        str(tmp_path / "latin1.txt"): "UTF-8",
        str(tmp_path / "missing.txt"): "missing.txt",
        str(tmp_path / "nofiles"): ".txt",
        str(tmp_path / "allempty"): "empty",
        "shakespear": "pystdlib",
    }
    for name, needle in cases.items():
        with pytest.raises(UsageError) as e:
            load(name, data_dir=dd)
        msg = one_line(e)
        assert needle in msg, msg
        if name.startswith(str(tmp_path)) and "nofiles" not in name and "allempty" not in name:
            assert name in msg


def test_bad_file_inside_folder_is_named(tmp_path):
    (tmp_path / "c").mkdir()
    make_text(tmp_path / "c" / "ok.txt")
    (tmp_path / "c" / "bad.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(UsageError) as e:
        load(str(tmp_path / "c"), data_dir=str(tmp_path / "d"))
    assert "bad.txt" in one_line(e)


def test_block_size_longer_than_split(tmp_path):
    (tmp_path / "a.txt").write_text("short text\n" * 50)  # 550 bytes, val 27
    with pytest.raises(UsageError) as e:
        load(str(tmp_path / "a.txt"), data_dir=str(tmp_path / "d"), block_size=64)
    assert "--block-size" in one_line(e) and "val" in str(e.value)


# -----------------------------------------------------------------------------
# tokenizers

def test_bytes_tokenizer():
    tok = data.get_tokenizer("bytes")
    assert (tok.name, tok.vocab_size, tok.eot) == ("bytes", 256, None)
    ids = tok.encode("héllo")
    assert ids == list("héllo".encode()) and tok.decode(ids) == "héllo"
    assert tok.decode(ids[:2]) == "h\ufffd"  # half a character decodes, it does not raise


def test_tiktoken_offline_message(monkeypatch):
    try:
        tok = data.get_tokenizer("gpt2")  # works if the vocabulary is cached here
        assert tok.vocab_size == 50257 and tok.eot == 50256
        assert tok.decode(tok.encode("hello world")) == "hello world"
    except UsageError as e:
        assert "TIKTOKEN_CACHE_DIR" in str(e) and "--tokenizer bytes" in str(e)

    import tiktoken

    class ConnectionError(OSError):  # what requests raises with no network
        pass

    def offline(name):
        raise ConnectionError("Max retries exceeded with url: /gpt-2/encodings/main/vocab.bpe\nlong detail")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UsageError) as e:
        data.get_tokenizer("gpt2")
    msg = one_line(e)
    assert "TIKTOKEN_CACHE_DIR" in msg and "--tokenizer bytes" in msg and "gpt2" in msg


def test_unknown_tokenizer_lists_choices():
    with pytest.raises(UsageError) as e:
        data.get_tokenizer("gpt7")
    msg = one_line(e)
    assert "gpt7" in msg and "bytes" in msg and "gpt2" in msg and "cl100k_base" in msg


def test_bytes_path_does_not_import_tiktoken(tmp_path):
    (tmp_path / "a.txt").write_text("hello there\n" * 100)
    code = ("import sys, data; data.load(sys.argv[1], data_dir=sys.argv[2], block_size=8); "
            "assert 'tiktoken' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.txt"), str(tmp_path / "d")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
