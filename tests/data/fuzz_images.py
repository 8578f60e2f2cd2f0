"""Mutated JPEG/PNG/WebP/GIF files through both decode paths: the data loader's (`lmm.data.media`) and the
server's (`lmm.serve.protocol`). Run as a script (in a subprocess, so that a decoder crash is an exit code, not
a dead test runner):

    python tests/data/fuzz_images.py --count 4000 --seed 0 --start 0 --progress P --out OUT.jsonl

The same (count, seed) always gives the same files. Before each file the script writes its index to
`--progress`; each file's outcomes go to `--out` as one JSON line {"i", "name", "data_fast", "data_pil",
"server"}; when all are done `--progress` says "done". A parent that sees the process die restarts it at the
index after the one in `--progress`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import struct
import zlib

PNG_SIG = b"\x89PNG\r\n\x1a\n"
MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


# --------------------------------------------------------------------------- valid seed files


def seed_files() -> dict[str, bytes]:
    """Small valid files of every flavour the decoders branch on (name -> bytes; the name starts with the format)."""
    import numpy as np
    from PIL import Image, PngImagePlugin

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (17, 23, 3), dtype=np.uint8))
    x = np.linspace(0, 255, 48)
    smooth = Image.fromarray(
        np.stack([np.add.outer(x, x) / 2, np.outer(x, x) / 255, x[None].repeat(48, 0)], -1).astype(np.uint8)
    )
    out = {}

    def save(name, im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        out[name] = buf.getvalue()

    for tag, im in (("noise", noise), ("smooth", smooth)):
        save(f"JPEG-{tag}", im, "JPEG", quality=90)
        save(f"JPEG-{tag}-gray", im.convert("L"), "JPEG")
        save(f"JPEG-{tag}-progressive", im, "JPEG", progressive=True)
        save(f"JPEG-{tag}-444", im, "JPEG", subsampling=0)
        save(f"PNG-{tag}-rgb", im, "PNG")
        save(f"PNG-{tag}-rgba", im.convert("RGBA"), "PNG")
        save(f"PNG-{tag}-palette", im.convert("P"), "PNG")
        save(f"PNG-{tag}-gray", im.convert("L"), "PNG")
        save(f"PNG-{tag}-la", im.convert("LA"), "PNG")
        save(f"WEBP-{tag}-lossy", im, "WEBP")
        save(f"WEBP-{tag}-lossless", im, "WEBP", lossless=True)
        save(f"WEBP-{tag}-alpha", im.convert("RGBA"), "WEBP")
        save(f"GIF-{tag}", im.convert("P"), "GIF")
    save("PNG-16bit", Image.fromarray(np.arange(17 * 23, dtype=np.uint16).reshape(17, 23) * 150), "PNG")
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "hello " * 20, zip=True)
    info.add_itxt("title", "t\u00eftle", zip=True)
    save("PNG-text", noise, "PNG", pnginfo=info)
    frames = [noise, noise.transpose(Image.Transpose.FLIP_LEFT_RIGHT), smooth.resize(noise.size)]
    save(
        "GIF-animated", frames[0].convert("P"), "GIF", save_all=True, append_images=[f.convert("P") for f in frames[1:]]
    )
    save("WEBP-animated", frames[0], "WEBP", save_all=True, append_images=frames[1:])
    save("PNG-animated", frames[0], "PNG", save_all=True, append_images=frames[1:])
    return out


# --------------------------------------------------------------------------- mutations


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]] | None:
    if not data.startswith(PNG_SIG):
        return None
    pos, chunks = 8, []
    while pos + 12 <= len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]))
        pos += 12 + n
    return chunks


def png_build(chunks) -> bytes:
    return PNG_SIG + b"".join(
        struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in chunks
    )


def flip_bits(b: bytearray, rng: random.Random) -> bytes:
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def set_bytes(b: bytearray, rng: random.Random) -> bytes:
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(len(b))] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    return bytes(b)


def truncate(b: bytearray, rng: random.Random) -> bytes:
    return bytes(b[: rng.randrange(1, len(b))])


def splice_span(b: bytearray, rng: random.Random) -> bytes:
    i = rng.randrange(len(b))
    j = min(len(b), i + rng.randint(0, 32))
    b[i:j] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 32)))
    return bytes(b)


def png_chunk_edit(b: bytearray, rng: random.Random) -> bytes:
    """Edit one chunk's data and fix its CRC: PIL's verify() alone cannot see this."""
    chunks = png_chunks(bytes(b))
    if not chunks:
        return flip_bits(b, rng)
    k = rng.randrange(len(chunks))
    t, d = chunks[k]
    d = bytearray(d)
    if d:
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
    else:
        d = bytearray(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    chunks[k] = (t, bytes(d))
    return png_build(chunks)


def png_idat_edit(b: bytearray, rng: random.Random) -> bytes:
    """Valid deflate of wrong scanlines (bad filter bytes, too little or too much data), CRCs fixed."""
    chunks = png_chunks(bytes(b))
    idat = [k for k, (t, _) in enumerate(chunks or []) if t == b"IDAT"]
    if not idat:
        return png_chunk_edit(b, rng)
    try:
        raw = bytearray(zlib.decompress(b"".join(chunks[k][1] for k in idat)))
    except zlib.error:
        return png_chunk_edit(b, rng)
    what = rng.randrange(3)
    if what == 0 and raw:
        for _ in range(rng.randint(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
    elif what == 1:
        raw = raw[: rng.randrange(0, len(raw) + 1)]
    else:
        raw += bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    body = zlib.compress(bytes(raw))
    chunks = [c for k, c in enumerate(chunks) if k not in idat[1:]]
    chunks[idat[0]] = (b"IDAT", body)
    return png_build(chunks)


def png_ihdr_edit(b: bytearray, rng: random.Random) -> bytes:
    """Other width/height/bit depth/colour type/interlace in IHDR, CRC fixed."""
    chunks = png_chunks(bytes(b))
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        return png_chunk_edit(b, rng)
    w, h, depth, ctype, comp, filt, inter = struct.unpack(">IIBBBBB", chunks[0][1])
    field = rng.randrange(5)
    if field == 0:
        w = rng.choice([0, 1, w + 1, w * 2, w // 2, rng.randrange(1, 4096), 2**31 - 1])
    elif field == 1:
        h = rng.choice([0, 1, h + 1, h * 2, h // 2, rng.randrange(1, 4096), 2**31 - 1])
    elif field == 2:
        depth = rng.choice([1, 2, 4, 8, 16, 3, 0])
    elif field == 3:
        ctype = rng.choice([0, 2, 3, 4, 6, 1, 7])
    else:
        inter = rng.choice([0, 1, 2])
    chunks[0] = (b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, comp, filt, inter))
    return png_build(chunks)


def jpeg_segment_edit(b: bytearray, rng: random.Random) -> bytes:
    """Mutate inside a marker segment (DQT/DHT/SOF/SOS header) or inside the entropy-coded data."""
    markers = [i for i in range(len(b) - 1) if b[i] == 0xFF and b[i + 1] not in (0x00, 0xFF) and i > 1]
    if not markers:
        return flip_bits(b, rng)
    i = rng.choice(markers)
    span = b[i + 2 : i + 64]
    if not span:
        return flip_bits(b, rng)
    for _ in range(rng.randint(1, 4)):
        k = i + 2 + rng.randrange(len(span))
        b[k] = rng.choice([0, 0xFF, rng.randrange(256), b[k] ^ (1 << rng.randrange(8))])
    return bytes(b)


def riff_edit(b: bytearray, rng: random.Random) -> bytes:
    """WebP: mutate bytes after the RIFF header and fix the RIFF size (so only the payload is wrong)."""
    if len(b) < 20 or b[:4] != b"RIFF":
        return flip_bits(b, rng)
    out = bytearray(splice_span(bytearray(b[12:]), rng) if rng.random() < 0.5 else flip_bits(bytearray(b[12:]), rng))
    return b[:4] + struct.pack("<I", len(out) + 4) + b[8:12] + bytes(out)


GENERIC = (flip_bits, set_bytes, truncate, splice_span)
BY_FORMAT = {
    "PNG": (png_chunk_edit, png_idat_edit, png_ihdr_edit, png_chunk_edit),
    "JPEG": (jpeg_segment_edit, jpeg_segment_edit),
    "WEBP": (riff_edit, riff_edit),
    "GIF": (),
}


def mutated(count: int, seed: int) -> list[tuple[str, bytes]]:
    """`count` (name, bytes) mutations of the seed files, the same for the same (count, seed)."""
    seeds = seed_files()
    names = sorted(seeds)
    out = []
    for i in range(count):
        rng = random.Random(seed * 1_000_003 + i)
        name = names[i % len(names)]
        fmt = name.split("-")[0]
        ops = GENERIC + BY_FORMAT[fmt]
        data = seeds[name]
        for _ in range(1 if rng.random() < 0.7 else 2):  # sometimes two mutations on top of each other
            op = rng.choice(ops)
            data = op(bytearray(data), rng) or data
            if not data:
                data = b"\x00"
        out.append((f"{i:05d}-{name}-{op.__name__}", data))
    return out


# --------------------------------------------------------------------------- decoding


def decode_all(data: bytes, name: str) -> dict:
    """The outcome of each decode path: "ok", the BadSample reason, or "APIError <status> <code>"."""
    from lmm.data.errors import BadSample
    from lmm.data.media import decode_image, decode_image_tensor
    from lmm.serve.protocol import APIError, Limits
    from lmm.serve.protocol import decode_image as serve_decode

    limit = 1_000_000  # mutated headers may claim any size: refused from the header, as the real limits do
    out = {}
    for path, fn in (
        ("data_fast", lambda: decode_image_tensor(data, max_pixels=limit)),
        ("data_pil", lambda: decode_image(data, max_pixels=limit)),
        (
            "server",
            lambda: serve_decode(
                f"data:{MIME[name.split('-')[1]]};base64,{base64.b64encode(data).decode()}",
                None,
                Limits(max_image_pixels=limit, max_request_pixels=limit),
            ),
        ),
    ):
        try:
            fn()
            out[path] = "ok"
        except BadSample as e:
            out[path] = e.reason
        except APIError as e:
            out[path] = f"APIError {e.status} {e.code}"
        except Exception as e:  # noqa: BLE001 - recorded: the test fails on any of these
            out[path] = f"unexpected {type(e).__name__}: {e}"[:300]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--progress", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import warnings

    from PIL import Image

    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    files = mutated(args.count, args.seed)
    with open(args.out, "a") as out:
        for i in range(args.start, len(files)):
            name, data = files[i]
            with open(args.progress, "w") as f:
                f.write(str(i))
            out.write(json.dumps({"i": i, "name": name, **decode_all(data, name)}) + "\n")
            out.flush()
    with open(args.progress, "w") as f:
        f.write("done")


if __name__ == "__main__":
    main()
