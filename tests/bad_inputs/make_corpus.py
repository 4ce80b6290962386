"""Write the malformed-input corpus (deterministic: same bytes on every run). Run from anywhere:

    python tests/bad_inputs/make_corpus.py

Every file lands in tests/bad_inputs/files/; cases.json says which command each goes to and what must happen.
The pickles are "exploits" made harmless: unpickled, they would run `touch conceptkit-bad-input-PWNED` in the
current folder; the tests run in a temporary folder and assert that file never appears.
"""
from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
OUT = HERE / "files"
BUNDLED = HERE.parents[1] / "src" / "conceptkit" / "bundled"
MARKER = "conceptkit-bad-input-PWNED"
TOY_WIDTH, SD_WIDTH = 128, 768  # text-encoder widths: the bundled toy model, the SD-1.x fixture (and SD 1.x)


class Exploit:
    """Unpickling this runs a shell command (harmless here: it creates an empty marker file)."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def base_image() -> Image.Image:
    """A 64x64 RGB shapes-world scene: the first image of a bundled concept set."""
    with Image.open(BUNDLED / "concepts" / "red-striped-star" / "0.png") as im:
        return im.convert("RGB")


def png_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def write(rel: str, data: bytes | str) -> None:
    path = OUT / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def save_image(rel: str, image: Image.Image, fmt: str = "PNG", **kw) -> None:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    write(rel, buf.getvalue())


def big_bilevel_png(side: int) -> bytes:
    """A side x side single-colour 1-bit PNG written by hand (PIL would need side² bytes of memory to build it)."""
    row = b"\x00" + b"\xff" * ((side + 7) // 8)  # filter byte + a row of white pixels
    raw = zlib.compressobj(9)
    body = b"".join(raw.compress(row) for _ in range(side)) + raw.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def images() -> None:
    rgb = base_image()
    good = png_bytes(rgb)
    write("images/truncated-png/scene.png", good[: len(good) // 2])
    jpeg = io.BytesIO()
    rgb.save(jpeg, format="JPEG", quality=90)
    write("images/truncated-jpeg/scene.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    write("images/zero-byte/scene.png", b"")
    save_image("images/cmyk/scene.jpg", rgb.convert("CMYK"), "JPEG", quality=95)
    save_image("images/cmyk-tiff/scene.tif", rgb.convert("CMYK"), "TIFF")
    gray16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)  # 16-bit grayscale, full range
    save_image("images/gray-16bit/scene.png", Image.frombytes("I;16", (64, 64), gray16.astype("<u2").tobytes()))
    rgba = rgb.convert("RGBA")
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :16] = 0  # a transparent strip whose hidden colour is black
    arr = np.asarray(rgba).copy()
    arr[:, :16, :3] = 0
    arr[:, :, 3] = alpha
    save_image("images/alpha/scene.png", Image.fromarray(arr))
    save_image("images/gray-alpha/scene.png", Image.fromarray(arr).convert("LA"))
    save_image("images/palette/scene.png", rgb.quantize(16, dither=Image.Dither.NONE))
    pal = rgb.quantize(16, dither=Image.Dither.NONE)
    save_image("images/palette-transparency/scene.png", pal, transparency=0)
    save_image("images/bilevel/scene.png", rgb.convert("1"))
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT), rgb.rotate(90)]
    save_image("images/animated-gif/scene.gif", frames[0], "GIF", save_all=True, append_images=frames[1:],
               duration=100, loop=0)
    save_image("images/animated-png/scene.png", frames[0], "PNG", save_all=True, append_images=frames[1:],
               duration=100)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    save_image("images/exif-rotated/scene.jpg", rgb.rotate(90, expand=True), "JPEG", quality=95, exif=exif)
    save_image("images/one-pixel/scene.png", Image.new("RGB", (1, 1), (200, 30, 30)))
    save_image("images/tall-strip/scene.png", Image.new("RGB", (2, 4096), (200, 30, 30)))
    write("images/huge-10000px/scene.png", big_bilevel_png(10000))  # 100 Mpx: above PIL's warning limit
    write("images/bomb-15000px/scene.png", big_bilevel_png(15000))  # 225 Mpx: above PIL's hard limit
    write("images/text-as-png/scene.png", "this is not an image, just text with a .png name\n")
    write("images/html-as-jpg/scene.jpg", "<!doctype html><html><body>404 Not Found</body></html>\n")
    (OUT / "images/directory-as-png/scene.png").mkdir(parents=True, exist_ok=True)
    write("images/directory-as-png/scene.png/.keep", "")
    write("images/empty-folder/.keep", "")  # dot files are skipped: the folder holds no image
    write("images/one-corrupt-among-good/a.png", good)
    write("images/one-corrupt-among-good/b.png", good)
    write("images/one-corrupt-among-good/c.png", good[:100])
    write("images/single.png", good)  # a file given where the folder is expected
    write("reference/truncated.png", good[: len(good) // 3])
    save_image("reference/cmyk.jpg", rgb.convert("CMYK"), "JPEG", quality=95)
    write("reference/zero-byte.png", b"")
    (OUT / "reference/folder.png").mkdir(parents=True, exist_ok=True)
    write("reference/folder.png/.keep", "")


def prompts() -> None:
    write("prompts/empty.txt", b"")
    write("prompts/only-comments.txt", "# a comment\n\n   \n# another\n")
    write("prompts/latin1.txt", "a red circle on a café background\n".encode("latin-1"))
    write("prompts/utf16.txt", "a red circle\n".encode("utf-16"))
    write("prompts/binary.txt", bytes(range(256)) * 4)
    write("prompts/utf8-bom.txt", "\ufeffa large red striped circle in the center, on a navy background\n")
    write("prompts/too-long.txt", " ".join(["a red circle and a blue square"] * 20) + "\n")  # ~140 tokens
    write("prompts/one-huge-line.txt", "red " * 25000 + "\n")
    write("prompts/unknown-placeholder.txt", "a photo of <not-loaded> on a gray background\n")
    (OUT / "prompts/folder.txt").mkdir(parents=True, exist_ok=True)
    write("prompts/folder.txt/.keep", "")


def embeddings() -> None:
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(1, TOY_WIDTH, generator=g) * 0.3
    e = lambda name, state: write(f"embeddings/{name}", _safetensors(state))
    e("int64.safetensors", {"<bad>": torch.arange(TOY_WIDTH, dtype=torch.int64)[None]})
    e("bool.safetensors", {"<bad>": torch.ones(1, TOY_WIDTH, dtype=torch.bool)})
    e("nan.safetensors", {"<bad>": torch.where(torch.arange(TOY_WIDTH) % 7 == 0, float("nan"), vec[0])[None]})
    e("inf.safetensors", {"<bad>": torch.full((1, TOY_WIDTH), float("inf"))})
    e("shape-3d.safetensors", {"<bad>": vec[None]})
    e("zero-vectors.safetensors", {"<bad>": torch.zeros(0, TOY_WIDTH)})
    e("sd-fixture-width.safetensors", {"<bad>": torch.randn(1, SD_WIDTH, generator=g) * 0.3})
    e("empty.safetensors", {})
    e("two-tokens.safetensors", {"<a>": vec.clone(), "<b>": vec.clone()})
    good = _safetensors({"<bad>": vec})
    write("embeddings/truncated.safetensors", good[: len(good) // 2])
    write("embeddings/zero-byte.safetensors", b"")
    write("embeddings/text.safetensors", "not a safetensors file\n")
    write("embeddings/garbage-header.safetensors", struct.pack("<Q", 40) + b"{this is not json at all, no}" + b"0" * 11)
    write("embeddings/exploit.pt", _torch_bytes({"string_to_param": {"*": Exploit()}, "name": "<bad>"}))
    write("embeddings/exploit.bin", _torch_bytes({"<bad>": Exploit()}))
    write("embeddings/legacy-pickle.bin", _legacy_pickle({"<bad>": Exploit()}))
    write("embeddings/a1111-no-tensor.pt", _torch_bytes({"string_to_param": {"*": [1.0, 2.0]}, "name": "<bad>"}))
    write("embeddings/sdxl.safetensors", _safetensors({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}))
    write("embeddings/empty-folder/.keep", "")


def _safetensors(state: dict) -> bytes:
    tmp = OUT / ".tmp.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    data = tmp.read_bytes()
    tmp.unlink()
    return data


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _legacy_pickle(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


LORA_LAYER = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


def _lora(width: int, fill=None, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(1)
    down = torch.randn(4, width, generator=g) * 0.01
    up = torch.randn(64, 4, generator=g) * 0.01
    if fill is not None:
        down[0, 0] = fill
    return {f"{LORA_LAYER}.lora.down.weight": down.to(dtype), f"{LORA_LAYER}.lora.up.weight": up.to(dtype)}


def loras() -> None:
    l = lambda name, state: write(f"loras/{name}", _safetensors(state))
    l("sd-fixture-width.safetensors", _lora(SD_WIDTH))  # made for a 768-wide text encoder (SD 1.x, the fixture)
    l("nan.safetensors", _lora(TOY_WIDTH, fill=float("nan")))
    l("int32.safetensors", _lora(TOY_WIDTH, dtype=torch.int32))
    l("no-lora-layers.safetensors", {"<tok>": torch.zeros(1, TOY_WIDTH)})
    l("unknown-module.safetensors", {"unet.no_such_block.attn.to_k.lora.down.weight": torch.zeros(4, TOY_WIDTH),
                                     "unet.no_such_block.attn.to_k.lora.up.weight": torch.zeros(64, 4)})
    good = _safetensors(_lora(TOY_WIDTH))
    write("loras/truncated.safetensors", good[: len(good) // 2])
    write("loras/zero-byte.safetensors", b"")
    write("loras/text.safetensors", "not a LoRA\n")
    write("loras/exploit.bin", _torch_bytes({f"{LORA_LAYER}.lora.down.weight": Exploit()}))
    write("loras/empty-folder/.keep", "")


def models() -> None:
    write("models/text.safetensors", "not a checkpoint\n")
    write("models/exploit.ckpt", _torch_bytes({"state_dict": Exploit()}))
    write("models/legacy-exploit.ckpt", _legacy_pickle({"state_dict": Exploit()}))
    write("models/weights.bin", _torch_bytes({"w": torch.zeros(2)}))
    write("models/no-model-index/unet/config.json", "{}\n")
    write("models/broken-model-index/model_index.json", "{\"_class_name\": \"StableDiffusionPipeline\", \n")
    write("models/empty-model-index/model_index.json", "{}\n")


def main(out: Path | None = None) -> None:
    """Write the corpus into `out` (default: tests/bad_inputs/files)."""
    global OUT
    OUT = Path(out) if out is not None else HERE / "files"
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    images()
    prompts()
    embeddings()
    loras()
    models()
    files = sorted(p for p in OUT.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files, {total / 1e6:.2f} MB, under {OUT}")


if __name__ == "__main__":
    main()
