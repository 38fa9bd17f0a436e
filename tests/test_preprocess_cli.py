"""End to end: `vgen preprocess` on a raw folder holding every kind of bad and odd input."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from vgen.data.dataset import ImageCaptionDataset

R = 16


def png_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def bomb_png() -> bytes:
    """A tiny PNG whose header claims 40000 x 40000 pixels."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    ihdr = 8  # signature; then length(4) type(4) data(13) crc(4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", 40000, 40000)
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21])))
    return bytes(data)


def solid(color, size=(40, 40), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


@pytest.fixture
def messy_raw(tmp_path) -> Path:
    """A raw folder with good, convertible, bad and odd files. Returns its path."""
    raw = tmp_path / "raw"
    (raw / "sub" / "deeper").mkdir(parents=True)
    (raw / "meta").mkdir()
    (raw / "csvmeta").mkdir()
    (raw / ".hidden").mkdir()

    def write(rel, data: bytes | str):
        path = raw / rel
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    # Good and convertible images.
    write("good.png", png_bytes(solid((255, 0, 0))))
    write("good.txt", "a red square\n\n  a  RED\tsquare \nanother caption\n")
    write("capext.png", png_bytes(solid((0, 255, 0))))
    write("capext.caption", "a green square")
    rgba = Image.new("RGBA", (40, 40), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 40))
    write("rgba.png", png_bytes(rgba))
    write("rgba.txt", "half blue on transparency")
    cmyk = io.BytesIO()
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(cmyk, format="JPEG", quality=95)
    write("cmyk.jpg", cmyk.getvalue())
    write("cmyk.txt", "a cmyk red")
    wide = np.full((40, 40), 65535, dtype=np.uint16)
    write("sub/deep16.png", png_bytes(Image.fromarray(wide)))
    write("sub/deep16.txt", "sixteen bit white")
    write("sub/gray.png", png_bytes(solid(100, mode="L")))
    write("sub/gray.txt", "cafe\u0301   au lait")  # NFD: must become NFC 'café'
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rot = Image.new("RGB", (60, 30), (255, 255, 255))
    rot.paste((0, 0, 0), (0, 0, 30, 30))
    buf = io.BytesIO()
    rot.save(buf, format="JPEG", exif=exif, quality=95)
    write("sub/deeper/rotated.jpg", buf.getvalue())
    write("sub/deeper/rotated.txt", "a rotated photo")
    write("latin1.png", png_bytes(solid((10, 20, 30))))
    write("latin1.txt", "un caf\xe9 cr\xe8me".encode("cp1252"))
    write("long.png", png_bytes(solid((30, 20, 10))))
    write("long.txt", " ".join(["word"] * 120))
    # imagefolder metadata, jsonl and csv.
    write("meta/m1.png", png_bytes(solid((1, 2, 3))))
    write("meta/m2.png", png_bytes(solid((4, 5, 6))))
    write("meta/metadata.jsonl",
          '{"file_name": "m1.png", "text": "metadata caption one"}\n'
          '{"file_name": "m2.png", "text": ["caption a", "caption b"]}\n'
          "{not json\n"
          '{"file_name": "gone.png", "text": "no such image"}\n')
    write("csvmeta/c1.png", png_bytes(solid((7, 8, 9))))
    write("csvmeta/metadata.csv", 'file_name,text\nc1.png,"a csv caption, with comma"\nc1.png,second csv caption\n')

    # Bad and odd files.
    write("zero.png", b"")
    write("zero.txt", "zero bytes")
    write("notimage.png", b"this is not a png at all")
    write("notimage.txt", "text pretending")
    good_jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good_jpeg, "JPEG")
    write("truncated.jpg", good_jpeg.getvalue()[: len(good_jpeg.getvalue()) // 2])
    write("truncated.txt", "half a jpeg")
    write("bomb.png", bomb_png())
    write("bomb.txt", "a decompression bomb")
    write("good_copy.png", (raw / "good.png").read_bytes())
    write("good_copy.txt", "same pixels as good")
    write("tiny.png", png_bytes(solid((0, 0, 0), size=(5, 5))))
    write("tiny.txt", "too small")
    write("nocaption.png", png_bytes(solid((9, 9, 9))))
    write("emptycaption.png", png_bytes(solid((8, 8, 8))))
    write("emptycaption.txt", "  \n\t\n")
    write("notes.pdf", b"%PDF-1.4 not an image type")
    write("orphan.txt", "a caption without an image")
    write(".hidden/secret.png", png_bytes(solid((5, 5, 5))))
    write(".DS_Store", b"\x00\x01")
    os.symlink("..", raw / "sub" / "loop")  # a symlink loop must not be followed forever
    os.symlink("does-not-exist.png", raw / "broken.png")
    return raw


EXPECTED_KEPT = {
    "good.png", "capext.png", "rgba.png", "cmyk.jpg", "sub/deep16.png", "sub/gray.png",
    "sub/deeper/rotated.jpg", "latin1.png", "long.png", "meta/m1.png", "meta/m2.png", "csvmeta/c1.png",
}
EXPECTED_SKIPPED = {
    "zero.png": "empty_file",
    "notimage.png": "not_an_image",
    "bomb.png": "decompression_bomb",
    "good_copy.png": "duplicate",
    "tiny.png": "too_small",
    "nocaption.png": "no_caption",
    "emptycaption.png": "no_caption",
    "notes.pdf": "unsupported_file",
    "orphan.txt": "orphan_caption",
    "broken.png": "broken_symlink",
    "meta/metadata.jsonl:3": "metadata_error",
    "meta/gone.png": "missing_file",
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("workers", [1, 2])
def test_messy_folder_keeps_good_files_and_names_bad_ones(messy_raw, tmp_path, vgen_cli, workers):
    out = tmp_path / f"ds{workers}"
    result = vgen_cli("preprocess", messy_raw, "-o", out, "--resolution", R, "--workers", workers,
                      "--val-fraction", "0.3")
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr

    index = read_jsonl(out / "index.jsonl")
    skipped = read_jsonl(out / "skipped.jsonl")
    assert {row["source"] for row in index} == EXPECTED_KEPT
    by_source = {row["source"]: row for row in skipped}
    for source, reason in EXPECTED_SKIPPED.items():
        assert by_source[source]["reason"] == reason, (source, by_source.get(source))
    assert by_source["truncated.jpg"]["reason"] in ("truncated", "decode_error")
    assert by_source["good_copy.png"]["detail"] == "same content as good.png"
    assert not any("secret" in s or "DS_Store" in s for s in by_source)  # hidden entries ignored
    assert sum(1 for s in by_source if s.startswith("sub/loop")) == 0

    manifest = yaml.safe_load((out / "dataset.yaml").read_text())
    counts = manifest["counts"]
    assert counts["kept"] == len(index) == len(EXPECTED_KEPT)
    assert counts["skipped"] == len(skipped) == sum(counts["skipped_by_reason"].values())
    assert counts["seen"] == counts["kept"] + counts["skipped"]
    assert manifest["splits"]["train"] + manifest["splits"]["val"] == counts["kept"]
    assert sum(s["rows"] for s in manifest["shards"]) == counts["kept"]
    assert manifest["captions"]["truncated"] == 1
    assert manifest["captions"]["non_utf8_decoded"] == 1

    rows = {row["source"]: row for row in index}
    assert rows["good.png"]["captions"] == ["a red square", "a RED square", "another caption"]
    assert rows["sub/gray.png"]["captions"] == ["caf\u00e9 au lait"]
    assert rows["latin1.png"]["captions"] == ["un caf\u00e9 cr\u00e8me"]
    assert "cp1252" in rows["latin1.png"]["notes"][0]
    assert rows["meta/m2.png"]["captions"] == ["caption a", "caption b"]
    assert rows["csvmeta/c1.png"]["captions"] == ["a csv caption, with comma", "second csv caption"]
    assert rows["long.png"]["tokens"][0] > 77

    # Pixels: check conversions through the Dataset over the shards.
    pixels = {}
    for split in ("train", "val"):
        ds = ImageCaptionDataset(out, split, verify=True)
        for i in range(len(ds)):
            pixels[index[ds.ids[i]]["source"]] = ds.image(i).numpy()
    assert pixels.keys() == EXPECTED_KEPT
    assert pixels["good.png"].shape == (3, R, R)
    assert (pixels["good.png"][:, 4, 4] == [255, 0, 0]).all()
    rgba = pixels["rgba.png"]
    assert (rgba[:, 8, 2] == [0, 0, 255]).all() and (rgba[:, 8, 13] == [255, 255, 255]).all()
    assert pixels["cmyk.jpg"][0].mean() > 200 and pixels["cmyk.jpg"][1:].mean() < 60
    assert pixels["sub/deep16.png"].min() == 255  # scaled from 16 bits, not clipped to 255 by accident
    assert (pixels["sub/gray.png"] == 100).all()
    rotated = pixels["sub/deeper/rotated.jpg"]  # 60x30 landscape shown as 30x60 portrait; black on top
    assert rotated[:, 1, 8].max() < 40 and rotated[:, 14, 8].min() > 215


def test_output_is_identical_for_any_worker_count(messy_raw, tmp_path, vgen_cli):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert vgen_cli("preprocess", messy_raw, "-o", out, "-r", R, "--workers", workers).exit_code == 0
        outs.append(out)
    for name in ("index.jsonl", "skipped.jsonl"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    m = [yaml.safe_load((o / "dataset.yaml").read_text()) for o in outs]
    assert m[0]["shards"] == m[1]["shards"]  # same sha256 of every shard


def test_refuses_to_overwrite_without_flag(messy_raw, tmp_path, vgen_cli):
    out = tmp_path / "ds"
    assert vgen_cli("preprocess", messy_raw, "-o", out, "-r", R, "--workers", 1).exit_code == 0
    before = (out / "dataset.yaml").read_bytes()
    again = vgen_cli("preprocess", messy_raw, "-o", out, "-r", R, "--workers", 1)
    assert again.exit_code == 2
    assert "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert (out / "dataset.yaml").read_bytes() == before
    shutil.rmtree(messy_raw / "meta")
    assert vgen_cli("preprocess", messy_raw, "-o", out, "-r", R, "--workers", 1, "--overwrite").exit_code == 0
    assert yaml.safe_load((out / "dataset.yaml").read_text())["counts"]["kept"] == len(EXPECTED_KEPT) - 2


def test_nothing_kept_exits_1_and_writes_nothing(tmp_path, vgen_cli):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.png").write_bytes(b"")
    (raw / "a.txt").write_text("empty image")
    (raw / "b.png").write_bytes(png_bytes(solid((1, 1, 1))))  # no caption
    result = vgen_cli("preprocess", raw, "-o", tmp_path / "ds", "-r", R)
    assert result.exit_code == 1
    assert "nothing kept" in result.stderr and "empty_file" in result.stderr
    assert not (tmp_path / "ds").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]  # no partial directory left


def test_usage_errors_exit_2_with_clear_message(tmp_path, vgen_cli):
    missing = vgen_cli("preprocess", tmp_path / "nope", "-o", tmp_path / "ds", "-r", R)
    assert missing.exit_code == 2 and "not a directory" in missing.stderr

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.png").write_bytes(png_bytes(solid((1, 1, 1))))
    (raw / "metadata.jsonl").write_text('{"file_name": "a.png", "caption": "x"}\n')
    column = vgen_cli("preprocess", raw, "-o", tmp_path / "ds", "-r", R)
    assert column.exit_code == 2
    assert "no caption column 'text'" in column.stderr and "--caption-column" in column.stderr
    assert vgen_cli("preprocess", raw, "-o", tmp_path / "ds", "-r", R, "--caption-column", "caption").exit_code == 0

    bad_fraction = vgen_cli("preprocess", raw, "-o", tmp_path / "ds2", "-r", R, "--val-fraction", "1.5")
    assert bad_fraction.exit_code == 2 and "--val-fraction" in bad_fraction.stderr
    inside = vgen_cli("preprocess", raw, "-o", raw / "ds", "-r", R)
    assert inside.exit_code == 2 and "inside the raw folder" in inside.stderr


def test_allow_empty_captions_and_caption_ext(tmp_path, vgen_cli):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.png").write_bytes(png_bytes(solid((1, 1, 1))))
    (raw / "b.png").write_bytes(png_bytes(solid((2, 2, 2))))
    (raw / "b.caption").write_text("only a .caption file")
    out = tmp_path / "ds"
    result = vgen_cli("preprocess", raw, "-o", out, "-r", R, "--caption-ext", ".txt", "--allow-empty-captions")
    assert result.exit_code == 0, result.stderr
    rows = {r["source"]: r for r in read_jsonl(out / "index.jsonl")}
    assert rows["a.png"]["captions"] == [] and rows["b.png"]["captions"] == []
    skipped = {r["source"]: r["reason"] for r in read_jsonl(out / "skipped.jsonl")}
    assert skipped == {"b.caption": "unsupported_file"}


def test_debug_shows_traceback(tmp_path, vgen_cli):
    with pytest.raises(Exception) as info:
        vgen_cli("--debug", "preprocess", tmp_path / "nope", "-o", tmp_path / "ds")
    assert "not a directory" in str(info.value)
