"""Images from a user's files: a folder of images (one subfolder per class, or none),
a .npz of labelled arrays, and the PNG decoder they need (zlib alone; other formats
through Pillow where it is installed).

    read_png(path)      -> uint8 [H, W, C], every colour type, bit depth and interlacing
"""
import collections
import contextlib
import hashlib
import json
import os
import re
import struct
import sys
import zlib

import numpy as np

from checkpoint import atomic_write
from cli import UsageError

PNG_MAX_PIXELS = 1 << 26  # 8192 x 8192; a header asking for more is refused before decompressing
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# Adam7: each pass's first column and row, and its steps across and down.
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


class PNGError(ValueError):
    """What is wrong with a PNG, for read_png's one line."""


def read_png(path):
    """A PNG file -> uint8 array [H, W, C]: C = 1 (gray), 2 (gray, alpha), 3 (RGB) or 4
    (RGBA). Every bit depth and colour type of the standard, interlaced (Adam7) or not:
    16-bit samples are rounded to 8, gray of 1, 2 or 4 bits scaled to 0..255, a palette
    expanded (to RGBA where it has transparency). Decompressed only up to the size the
    header declares, so a decompression bomb costs nothing; anything else is one line."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror})")
    try:
        return decode_png(blob)
    except PNGError as e:
        raise UsageError(f"{path}: not a readable PNG ({e})") from None


def png_chunks(blob):
    """{type: [data, ...]} of a PNG's chunks, each length and CRC checked, up to IEND."""
    if blob[:8] != b"\x89PNG\r\n\x1a\n":
        raise PNGError("no PNG signature")
    chunks, at = {}, 8
    while True:
        if at + 12 > len(blob):
            raise PNGError("truncated (no IEND chunk)")
        length, kind = struct.unpack(">I4s", blob[at:at + 8])
        body = blob[at + 8:at + 8 + length]
        if len(body) < length or at + 12 + length > len(blob):
            raise PNGError(f"truncated in a {kind!r} chunk")
        if struct.unpack(">I", blob[at + 8 + length:at + 12 + length])[0] != zlib.crc32(kind + body):
            raise PNGError(f"bad CRC in a {kind!r} chunk")
        if kind == b"IEND":
            return chunks
        chunks.setdefault(kind, []).append(body)
        at += 12 + length


def decode_png(blob):
    """read_png on bytes; PNGError for what is wrong."""
    chunks = png_chunks(blob)
    if len(chunks.get(b"IHDR", [b""])[0]) != 13:
        raise PNGError("no valid IHDR chunk")
    w, h, depth, color, method, filtering, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"][0])
    if color not in PNG_CHANNELS or depth not in PNG_DEPTHS[color] or method or filtering or interlace > 1:
        raise PNGError(f"unsupported header (bit depth {depth}, colour type {color}, interlace {interlace})")
    if not 0 < w * h <= PNG_MAX_PIXELS:
        raise PNGError(f"{w}x{h} pixels; at most {PNG_MAX_PIXELS} are read")
    ch = PNG_CHANNELS[color]
    passes = [(x0, y0, dx, dy, -(-(w - x0) // dx), -(-(h - y0) // dy))
              for x0, y0, dx, dy in (ADAM7 if interlace else ((0, 0, 1, 1),))]
    passes = [p for p in passes if p[4] > 0 and p[5] > 0]  # an empty pass has no bytes at all
    sizes = [ph * (1 + -(-pw * ch * depth // 8)) for *_, pw, ph in passes]
    z = zlib.decompressobj()
    try:  # never more than the header declares (+1, to tell a surplus)
        raw = z.decompress(b"".join(chunks.get(b"IDAT", [])), sum(sizes) + 1)
    except zlib.error as e:
        raise PNGError(f"bad compressed data ({e})")
    if len(raw) != sum(sizes):
        raise PNGError(f"image data holds {'more' if len(raw) > sum(sizes) else len(raw)} bytes, "
                       f"the header declares {sum(sizes)}")
    img, at = np.zeros((h, w, ch), np.uint8), 0
    for (x0, y0, dx, dy, pw, ph), size in zip(passes, sizes):
        rows = png_unfilter(raw[at:at + size], ph, max(1, ch * depth // 8))
        img[y0::dy, x0::dx] = png_samples(rows, pw, ch, depth)
        at += size
    if color == 3:
        return png_palette(img[..., 0], chunks)
    if depth < 8:  # gray of 1, 2 or 4 bits: the largest value is white
        img *= 255 // ((1 << depth) - 1)
    return img


def png_unfilter(raw, rows, bpp):
    """A pass's filtered scanlines -> uint8 [rows, bytes per row]: each row's filter type
    (None, Sub, Up, Average, Paeth) undone against the row above (zeros above the first)."""
    lines = np.frombuffer(raw, np.uint8).reshape(rows, -1)
    out = np.zeros((rows + 1, lines.shape[1] - 1), np.uint8)
    for r in range(rows):
        kind, line, up = lines[r, 0], lines[r, 1:], out[r]
        if kind == 0:
            out[r + 1] = line
        elif kind == 1:  # Sub: a running sum over each byte of a pixel (a row holds whole pixels)
            out[r + 1] = np.cumsum(line.reshape(-1, bpp), 0, dtype=np.uint8).reshape(-1)
        elif kind == 2:
            out[r + 1] = line + up
        elif kind in (3, 4):  # each byte depends on the one just decoded: a loop
            cur, above = bytearray(line.tobytes()), up.tobytes()
            for i in range(len(cur)):
                a = cur[i - bpp] if i >= bpp else 0
                b, c = above[i], above[i - bpp] if i >= bpp else 0
                if kind == 3:
                    pred = (a + b) >> 1
                else:  # Paeth: the neighbour nearest to a + b - c
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                cur[i] = (cur[i] + pred) & 255
            out[r + 1] = np.frombuffer(bytes(cur), np.uint8)
        else:
            raise PNGError(f"unknown filter type {kind} in row {r}")
    return out[1:]


def png_samples(rows, width, ch, depth):
    """Unfiltered rows -> uint8 [rows, width, ch]: 16-bit samples rounded to 8 (v / 257),
    1, 2 and 4 bits unpacked, the first in a byte's high bits (as they are: the caller
    scales gray, a palette's indices stay indices)."""
    if depth == 16:
        v = rows.view(">u2").astype(np.uint32)
        return ((v * 255 + 32767) // 65535).astype(np.uint8).reshape(len(rows), width, ch)
    if depth == 8:
        return rows.reshape(len(rows), width, ch)
    shifts = np.arange(8 - depth, -1, -depth, dtype=np.uint8)
    v = (rows[:, :, None] >> shifts) & ((1 << depth) - 1)
    return v.reshape(len(rows), -1)[:, :width, None]


def png_palette(index, chunks):
    """Palette indices [H, W] -> RGB (or RGBA where tRNS gives alphas) uint8."""
    plte = chunks.get(b"PLTE", [b""])[0]
    if not plte or len(plte) % 3 or len(plte) > 768:
        raise PNGError("a palette image without a valid PLTE chunk")
    table = np.frombuffer(plte, np.uint8).reshape(-1, 3)
    if b"tRNS" in chunks:
        alpha = np.full(len(table), 255, np.uint8)
        trns = np.frombuffer(chunks[b"tRNS"][0][:len(table)], np.uint8)
        alpha[:len(trns)] = trns
        table = np.concatenate([table, alpha[:, None]], 1)
    if int(index.max()) >= len(table):
        raise PNGError(f"palette index {int(index.max())} past the palette's {len(table)} colours")
    return table[index]


# ---- any format ---------------------------------------------------------------------------

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # Pillow's modes of gray images


def pillow(path, use):
    """use(image) on Pillow's image of a file that is not a PNG; one line where Pillow is
    not installed or cannot read the file."""
    try:
        from PIL import Image
    except ImportError:
        raise UsageError(f"{path}: reading {os.path.splitext(path)[1]} files needs Pillow "
                         f"(pip install pillow); PNGs are read without it") from None
    try:
        with Image.open(path) as im:
            return use(im)
    except Exception as e:  # Pillow raises many kinds for a bad file; the user needs one line
        raise UsageError(f"{path}: not a readable image ({type(e).__name__}: {str(e)[:100]})") from None


def read_image(path):
    """An image file -> uint8 [H, W, C] as read_png gives: PNG by read_png, the other
    formats by Pillow where it is installed."""
    if path.lower().endswith(".png"):
        return read_png(path)

    def pixels(im):
        alpha = im.mode in ("LA", "RGBA", "PA") or "transparency" in im.info
        mode = ("LA" if alpha else "L") if im.mode in GRAY_MODES else ("RGBA" if alpha else "RGB")
        return np.array(im.convert(mode), np.uint8).reshape(im.height, im.width, -1)
    return pillow(path, pixels)


def to_channels(img, c):
    """uint8 [H, W, k] (k = 1 gray, 2 gray and alpha, 3 RGB, 4 RGBA) -> [H, W, c], c = 1
    or 3, as Pillow's convert("L") and convert("RGB") do: alpha dropped, gray repeated,
    RGB to ITU-R 601-2 luma in Pillow's fixed point."""
    if img.shape[2] in (2, 4):
        img = img[..., :-1]
    if img.shape[2] == c:
        return img
    if c == 3:
        return np.repeat(img, 3, 2)
    rgb = img.astype(np.uint32)
    return ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16)[..., None].astype(np.uint8)


def box_weights(n_in, n_out):
    """[n_out, n_in]: output pixel i is the mean of the input span [i, i + 1) x n_in / n_out,
    each input pixel weighted by how much of it the span covers (the area filter)."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    j = np.arange(n_in)[None]
    overlap = np.clip(np.minimum(edges[1:, None], j + 1) - np.maximum(edges[:-1, None], j), 0, None)
    return overlap / overlap.sum(1, keepdims=True)


def resize_crop(img, size):
    """uint8 [H, W, C] -> [size, size, C]: the shorter side resized to size with the area
    filter, then the centre cropped."""
    h, w = img.shape[:2]
    if h == w == size:
        return img
    nh, nw = max(size, round(h * size / min(h, w))), max(size, round(w * size / min(h, w)))
    top, left = (nh - size) // 2, (nw - size) // 2
    rows, cols = box_weights(h, nh)[top:top + size], box_weights(w, nw)[left:left + size]
    out = np.einsum("ij,jkc,lk->ilc", rows, img.astype(np.float64), cols, optimize=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---- folders -------------------------------------------------------------------------------

def list_folder(root):
    """(classes, [(path, label)]) of a folder of images: its subfolders, sorted, are the
    classes (each image labelled by the one it lies in, at any depth); a folder of files
    alone is unlabelled (classes [], labels -1). Hidden files are passed over; anything
    else that is not an image is one line naming it."""
    def images_in(folder):
        found = []
        for top, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(f for f in files if not f.startswith(".")):
                path = os.path.join(top, name)
                if not name.lower().endswith(SUFFIXES):
                    raise UsageError(f"{path} is not an image ({', '.join(SUFFIXES)}); move it out of {root}")
                found.append(path)
        return found
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    loose = [e for e in entries if not os.path.isdir(os.path.join(root, e))]
    if classes and loose:
        raise UsageError(f"{root} holds both files ({loose[0]}, ...) and class subfolders ({classes[0]}, ...); "
                         f"put every image in its class's subfolder, or use a folder of images alone")
    if not classes:
        found = [(p, -1) for p in images_in(root)]
        if not found:
            raise UsageError(f"{root} holds no images; give a folder of images or of class subfolders of images")
        return [], found
    found = []
    for label, name in enumerate(classes):
        mine = images_in(os.path.join(root, name))
        if not mine:
            raise UsageError(f"class folder {os.path.join(root, name)} holds no images; add some or remove it")
        found += [(p, label) for p in mine]
    return classes, found


def peek(path):
    """(height, width, gray) of an image file without decoding its pixels."""
    if path.lower().endswith(".png"):
        with open(path, "rb") as f:
            head = f.read(33)
        if len(head) < 33 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
            raise UsageError(f"{path}: not a readable PNG (no PNG signature and header)")
        w, h, _, color = struct.unpack(">IIBB", head[16:26])
        return h, w, color in (0, 4)
    return pillow(path, lambda im: (im.height, im.width, im.mode in GRAY_MODES))


CACHE_VERSION = 1  # raise when the conversion changes, so old caches are not taken for new ones


def load_folder(root, data_dir, channels=None, image_size=None):
    """(images uint8 [N, C, S, S], labels int64 [N] or None, class names) of a folder
    (list_folder): each image converted to `channels` (default: 1 where most images are
    gray, else 3) and resized and centre-cropped to `image_size` (default: the shorter side
    most images have). Cached as one array in data_dir/cache, keyed by the folder's listing
    (names, sizes, mtimes) and the two settings: a second run reads one file, a changed
    folder is read again."""
    classes, found = list_folder(root)
    key = hashlib.sha1(json.dumps([CACHE_VERSION, os.path.abspath(root), channels, image_size]).encode())
    for path, label in found:
        st = os.stat(path)
        key.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    stem = re.sub(r"[^0-9A-Za-z._-]", "_", os.path.basename(os.path.abspath(root)))
    cache = os.path.join(data_dir, "cache", f"folder-{stem}-{key.hexdigest()[:12]}.npz")
    with contextlib.suppress(Exception):  # none yet, or damaged: read the folder again
        with np.load(cache, allow_pickle=False) as z:
            return z["x"], z["y"] if classes else None, classes
    shapes = [peek(path) for path, _ in found]
    c = channels or (1 if 2 * sum(gray for *_, gray in shapes) > len(shapes) else 3)
    size = image_size or collections.Counter(min(h, w) for h, w, _ in shapes).most_common(1)[0][0]
    print(f"data: reading {len(found)} images of {root} as {c}x{size}x{size} into {cache}", file=sys.stderr)
    x = np.stack([resize_crop(to_channels(read_image(path), c), size).transpose(2, 0, 1) for path, _ in found])
    y = np.array([label for _, label in found], np.int64)
    try:
        atomic_write(cache, lambda f: np.savez(f, x=x, y=y))
    except OSError as e:
        raise UsageError(f"cannot write the image cache {cache} ({e.strerror}); free some space or pass "
                         f"another --data-dir") from None
    return x, y if classes else None, classes


def npz_arrays(path):
    """(images uint8 [N, C, H, W], labels int64 [N], class names or None) of a .npz with
    arrays x (images, as a .npy of them), y (integer labels from 0) and optionally
    classes (their names)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise UsageError(f"{path} is not a readable .npz file ({str(e)[:80]}); save it with "
                         f"np.savez(path, x=images, y=labels)") from None
    if "x" not in arrays or "y" not in arrays:
        raise UsageError(f"{path} holds {sorted(arrays)}; give arrays x (images) and y (labels), "
                         f"e.g. np.savez(path, x=images, y=labels, classes=names)")
    y = arrays["y"]
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(arrays["x"]) or len(y) and y.min() < 0:
        raise UsageError(f"{path}: y must hold one integer label from 0 per image ({len(arrays['x'])} of them), "
                         f"not {y.dtype} of shape {y.shape}")
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    if classes is not None and len(y) and y.max() >= len(classes):
        raise UsageError(f"{path}: label {int(y.max())} but only {len(classes)} class names")
    return arrays["x"], y.astype(np.int64), classes
