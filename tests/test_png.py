"""images.read_png against PNGs written here by an encoder of the test's own (every colour
type and bit depth, every filter type, Adam7 interlacing, palettes with transparency,
image data split over several IDAT chunks) and by data.write_png; and fuzzed: a
truncated, bit-flipped, spliced or random file is an image or one clean line, quickly."""
import random
import struct
import time
import zlib

import numpy as np
import pytest

import cli
import data
import images

ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
VALID = [(0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16), (3, 1), (3, 2), (3, 4), (3, 8),
         (4, 8), (4, 16), (6, 8), (6, 16)]


def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def scanline(samples, depth):
    """One row of samples (ints) -> its bytes: 16 bits big-endian, 8 as is, fewer packed
    into bytes from the high bits down, the last byte padded with zeros."""
    if depth == 16:
        return b"".join(struct.pack(">H", v) for v in samples)
    if depth == 8:
        return bytes(samples)
    out, acc, bits = bytearray(), 0, 0
    for v in samples:
        acc, bits = (acc << depth) | v, bits + depth
        if bits == 8:
            out.append(acc)
            acc, bits = 0, 0
    if bits:
        out.append(acc << (8 - bits))
    return bytes(out)


def filtered(rows, bpp, kinds):
    """Filter each row with the next of `kinds`, written out byte by byte (PNG spec 9.2)."""
    out, prev = bytearray(), bytes(len(rows[0]))
    for r, row in enumerate(rows):
        kind = kinds[r % len(kinds)]
        out.append(kind)
        for i, x in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            paeth = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else b if abs(p - b) <= abs(p - c) else c
            pred = (0, a, b, (a + b) // 2, paeth)[kind]
            out.append((x - pred) % 256)
        prev = row
    return bytes(out)


def encode(pixels, depth, color, interlace=False, kinds=(0, 1, 2, 3, 4), palette=None, trns=None, idats=1):
    """pixels: int array [H, W, channels] of samples in 0..2^depth - 1 (a palette's indices
    for colour type 3) -> the bytes of a PNG."""
    h, w, ch = pixels.shape
    bpp = max(1, ch * depth // 8)
    raw = b""
    for x0, y0, dx, dy in (ADAM7 if interlace else ((0, 0, 1, 1),)):
        part = pixels[y0::dy, x0::dx]
        if part.size == 0:
            continue  # an empty pass is left out altogether
        rows = [scanline(part[r].reshape(-1).tolist(), depth) for r in range(part.shape[0])]
        raw += filtered(rows, bpp, kinds)
    z = zlib.compress(raw, 9)
    cut = [len(z) * i // idats for i in range(idats + 1)]
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, int(interlace)))
    if palette is not None:
        out += chunk(b"PLTE", bytes(np.asarray(palette, np.uint8).reshape(-1)))
    if trns is not None:
        out += chunk(b"tRNS", bytes(trns))
    out += b"".join(chunk(b"IDAT", z[cut[i]:cut[i + 1]]) for i in range(idats))
    return out + chunk(b"IEND", b"")


def expected(pixels, depth, color, palette=None, trns=None):
    """What read_png must give: 8-bit samples (16-bit ones v / 257 rounded, which never
    ties: 257 is odd), gray of fewer bits scaled so the largest value is 255, a palette
    looked up (with an alpha channel where tRNS is given)."""
    if color == 3:
        table = np.asarray(palette, np.int64)
        if trns is not None:
            alpha = np.full(len(table), 255)
            alpha[:len(trns)] = trns
            table = np.concatenate([table, alpha[:, None]], 1)
        return table[pixels[..., 0]].astype(np.uint8)
    if depth == 16:
        return np.rint(pixels / 257).astype(np.uint8)
    return (pixels * (255 // (2 ** depth - 1))).astype(np.uint8)


def random_image(rng, h, w, color, depth):
    top = 2 ** depth if color != 3 else min(2 ** depth, 7)  # a palette of 7 colours
    return rng.integers(0, top, (h, w, CHANNELS[color]))


@pytest.mark.parametrize("interlace", [False, True], ids=["plain", "adam7"])
@pytest.mark.parametrize("color,depth", VALID, ids=[f"type{c}-{d}bit" for c, d in VALID])
def test_every_colour_type_depth_and_filter_decodes_exactly(tmp_path, color, depth, interlace):
    rng = np.random.default_rng(color * 100 + depth)
    palette = rng.integers(0, 256, (7, 3)) if color == 3 else None
    trns = [0, 128, 255] if color == 3 else None  # the first three colours' alphas, the rest opaque
    for h, w in ((13, 9), (1, 1), (3, 2), (8, 17)):  # odd sizes leave Adam7 passes partial or empty
        pixels = random_image(rng, h, w, color, depth)
        path = tmp_path / f"{h}x{w}.png"
        path.write_bytes(encode(pixels, depth, color, interlace, palette=palette, trns=trns, idats=3))
        got = images.read_png(str(path))
        assert got.dtype == np.uint8 and np.array_equal(got, expected(pixels, depth, color, palette, trns)), (h, w)


def test_a_palette_without_transparency_is_rgb(tmp_path):
    rng = np.random.default_rng(0)
    palette, pixels = rng.integers(0, 256, (5, 3)), rng.integers(0, 5, (6, 6, 1))
    (tmp_path / "p.png").write_bytes(encode(pixels, 8, 3, palette=palette))
    got = images.read_png(str(tmp_path / "p.png"))
    assert got.shape == (6, 6, 3) and np.array_equal(got, palette[pixels[..., 0]])


def test_what_write_png_writes_reads_back(tmp_path):
    rng = np.random.default_rng(1)
    for shape in ((7, 5), (7, 5, 3)):
        a = rng.integers(0, 256, shape).astype(np.uint8)
        data.write_png(str(tmp_path / "w.png"), a)
        assert np.array_equal(images.read_png(str(tmp_path / "w.png")), a.reshape(7, 5, -1))


def test_a_decompression_bomb_is_one_line_and_quick(tmp_path):
    # a header of 16x16 gray, and 64 MB of zeros behind it: decompressed only as far as declared
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(64 << 20), 9)) + chunk(b"IEND", b""))
    (tmp_path / "bomb.png").write_bytes(bomb)
    t = time.perf_counter()
    with pytest.raises(cli.UsageError, match="more bytes"):
        images.read_png(str(tmp_path / "bomb.png"))
    assert time.perf_counter() - t < 5  # a full inflate of 64 MB would be the bomb going off
    huge = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    (tmp_path / "huge.png").write_bytes(huge)
    with pytest.raises(cli.UsageError, match="100000x100000"):
        images.read_png(str(tmp_path / "huge.png"))


def rechunk(blob):
    """A PNG's bytes with every chunk's CRC made right again, so fuzzing reaches past it."""
    out, at = bytearray(blob[:8]), 8
    while at + 12 <= len(blob):
        length = struct.unpack(">I", blob[at:at + 4])[0]
        kind, body = blob[at + 4:at + 8], blob[at + 8:at + 8 + length]
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        at += 12 + length
    return bytes(out + blob[at:])


def read_or_one_line(path, blob):
    path.write_bytes(blob)
    t = time.perf_counter()
    try:
        img = images.read_png(str(path))
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] in (1, 2, 3, 4)
    except cli.UsageError as e:
        assert "\n" not in str(e) and str(path) in str(e)
    assert time.perf_counter() - t < 2, "a damaged file must not take long"


def test_fuzzed_pngs_are_an_image_or_one_line(tmp_path):
    rng = np.random.default_rng(2)
    seeds = [encode(random_image(rng, 9, 11, c, d), d, c, i, palette=rng.integers(0, 256, (7, 3)))
             for c, d, i in ((2, 8, True), (3, 4, False), (0, 16, True), (6, 8, False))]
    r = random.Random(3)
    path = tmp_path / "f.png"
    for seed in seeds:
        for cut in range(0, len(seed), 7):  # truncated everywhere
            read_or_one_line(path, seed[:cut])
        for _ in range(150):  # bits flipped, CRCs then right or left wrong
            b = bytearray(seed)
            for _ in range(r.randint(1, 4)):
                b[r.randrange(8, len(b))] ^= 1 << r.randrange(8)
            read_or_one_line(path, rechunk(bytes(b)) if r.random() < 0.8 else bytes(b))
        for other in seeds:  # spliced: the head of one file, the tail of another
            read_or_one_line(path, seed[:r.randrange(8, len(seed))] + other[r.randrange(8, len(other)):])
    for _ in range(100):  # random bytes, with and without the signature
        junk = bytes(r.randrange(256) for _ in range(r.randrange(0, 400)))
        read_or_one_line(path, junk)
        read_or_one_line(path, b"\x89PNG\r\n\x1a\n" + junk)


@pytest.mark.parametrize("color,depth", [(0, 1), (0, 4), (0, 8), (2, 8), (3, 2), (3, 8), (4, 8), (6, 8)])
def test_pillow_reads_the_same_pixels_where_installed(tmp_path, color, depth):
    """A second decoder as the oracle, where Pillow is installed, on the same files. (Not
    for 16 bits: Pillow keeps a sample's high byte, v >> 8, where read_png rounds v / 257
    to the nearest 8-bit value; the test above holds that.)"""
    Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (pip install pillow)")
    rng = np.random.default_rng(7)
    palette = rng.integers(0, 256, (7, 3)) if color == 3 else None
    pixels = random_image(rng, 9, 13, color, depth)
    for interlace in (False, True):
        path = tmp_path / f"{interlace}.png"
        path.write_bytes(encode(pixels, depth, color, interlace, palette=palette))
        ours = images.read_png(str(path))
        with Image.open(path) as im:
            theirs = np.asarray(im.convert({1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[ours.shape[2]]))
        assert np.array_equal(ours, theirs.reshape(ours.shape)), interlace
