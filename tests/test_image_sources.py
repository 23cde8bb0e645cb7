"""Finding images in folders and manifests, and converting any pixel format to RGB."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmdx.embed import image_sources
from mmdx.embed.image_sources import (
    ImageRef,
    collect_image_items,
    expand_image_file,
    load_pixels,
    register_image_format,
    to_rgb_uint8,
)
from mmdx.embed.runner import Item
from mmdx.errors import InputError


def write_png(path: Path, seed: int = 0, size=(40, 48), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").convert(mode).save(path)
    return path


def pixels_of(path: Path) -> np.ndarray:
    item = expand_image_file(path, path.name, "p")[0]
    return to_rgb_uint8(load_pixels(item))


# Folders ------------------------------------------------------------------


def test_folder_with_class_subfolders(tmp_path):
    write_png(tmp_path / "glioma" / "g1.png", 1)
    write_png(tmp_path / "notumor" / "n1.jpg", 2)
    write_png(tmp_path / "notumor" / "deeper" / "n2.png", 3)
    (tmp_path / "notumor" / "readme.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")

    found = collect_image_items(tmp_path)

    assert found.kind == "folder"
    assert [item.name for item in found.items] == ["glioma/g1.png", "notumor/deeper/n2.png", "notumor/n1.jpg"]
    assert [item.patient_id for item in found.items] == ["g1", "n2", "n1"]
    assert found.n_skipped_files == 2
    assert all(item.view == 0 for item in found.items)


def test_folder_skips_hidden_folders(tmp_path):
    write_png(tmp_path / "glioma" / "a.png")
    write_png(tmp_path / "glioma" / ".ipynb_checkpoints" / "a-checkpoint.png")
    write_png(tmp_path / ".hidden.png")
    found = collect_image_items(tmp_path)
    assert [item.name for item in found.items] == ["glioma/a.png"]
    assert found.n_skipped_files == 2


def test_folder_flat_hashes_file_bytes(tmp_path):
    path = write_png(tmp_path / "007.png", 1)

    found = collect_image_items(tmp_path)

    assert len(found.items) == 1
    item = found.items[0]
    assert item.patient_id == "007"
    assert item.name == "007.png"
    assert item.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert item.payload == ImageRef(path)


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="no image files found"):
        collect_image_items(tmp_path)


def test_source_missing(tmp_path):
    with pytest.raises(InputError, match="source not found"):
        collect_image_items(tmp_path / "absent")


def test_source_file_not_csv(tmp_path):
    path = write_png(tmp_path / "a.png")
    with pytest.raises(InputError, match="folder of images or a .csv manifest"):
        collect_image_items(path)


# Patient IDs from file names ---------------------------------------------------------


def test_id_pattern_takes_first_group(tmp_path):
    write_png(tmp_path / "MPX1043_synpic1.png", 1)
    write_png(tmp_path / "MPX1043_synpic2.png", 2)
    write_png(tmp_path / "MPX7_synpic3.png", 3)

    found = collect_image_items(tmp_path, id_pattern=r"^(MPX\d+)_")

    assert [item.patient_id for item in found.items] == ["MPX1043", "MPX1043", "MPX7"]


def test_id_pattern_mismatch_names_file(tmp_path):
    write_png(tmp_path / "MPX1_a.png", 1)
    write_png(tmp_path / "scan_b.png", 2)
    with pytest.raises(InputError, match=r"scan_b\.png.*does not match --id-pattern"):
        collect_image_items(tmp_path, id_pattern=r"^(MPX\d+)_")


def test_id_pattern_without_group(tmp_path):
    write_png(tmp_path / "a.png")
    with pytest.raises(InputError, match="has no group"):
        collect_image_items(tmp_path, id_pattern=r"^MPX\d+")


def test_id_pattern_invalid_regex(tmp_path):
    write_png(tmp_path / "a.png")
    with pytest.raises(InputError, match="not a valid regular expression"):
        collect_image_items(tmp_path, id_pattern="(")


# Manifests ------------------------------------------------------------------


def write_manifest(path: Path, rows: list[tuple[str, str]], header=("patient_id", "image")) -> Path:
    lines = [",".join(header)] + [",".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_manifest_ids_and_paths_as_given(tmp_path):
    write_png(tmp_path / "images" / "a.png", 1)
    write_png(tmp_path / "images" / "b.png", 2)
    manifest = write_manifest(tmp_path / "images.csv", [("007", "images/a.png"), ("007", "images/b.png"), ("12", "./images/a.png")])

    found = collect_image_items(manifest)

    assert found.kind == "manifest"
    assert [(item.patient_id, item.name) for item in found.items] == [
        ("007", "images/a.png"),
        ("007", "images/b.png"),
        ("12", "./images/a.png"),
    ]
    assert found.items[0].payload.path == (tmp_path / "images" / "a.png")


def test_manifest_custom_columns(tmp_path):
    write_png(tmp_path / "a.png", 1)
    manifest = write_manifest(tmp_path / "m.csv", [("P1", "a.png")], header=("case", "file"))

    found = collect_image_items(manifest, id_column="case", path_column="file")

    assert [(item.patient_id, item.name) for item in found.items] == [("P1", "a.png")]


def test_manifest_missing_column(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", [("P1", "a.png")], header=("case", "image"))
    with pytest.raises(InputError, match=r"missing column\(s\) 'patient_id' \(set --id-column\)"):
        collect_image_items(manifest)


def test_manifest_with_id_pattern_ignores_id_column(tmp_path):
    write_png(tmp_path / "MPX9_s1.png")
    manifest = write_manifest(tmp_path / "m.csv", [("MPX9_s1.png",)], header=("image",))

    found = collect_image_items(manifest, id_pattern=r"^(MPX\d+)_")

    assert found.items[0].patient_id == "MPX9"


def test_manifest_path_outside_folder(tmp_path):
    write_png(tmp_path / "outside.png")
    (tmp_path / "sub").mkdir()
    manifest = write_manifest(tmp_path / "sub" / "m.csv", [("P1", "../outside.png")])
    with pytest.raises(InputError, match=r"line 2: image path '\.\./outside\.png' resolves to .*outside the manifest's folder"):
        collect_image_items(manifest)


def test_manifest_absolute_path(tmp_path):
    path = write_png(tmp_path / "a.png")
    manifest = write_manifest(tmp_path / "m.csv", [("P1", str(path))])
    with pytest.raises(InputError, match="line 2: image path .* is absolute"):
        collect_image_items(manifest)


def test_manifest_missing_file_names_row(tmp_path):
    write_png(tmp_path / "a.png")
    manifest = write_manifest(tmp_path / "m.csv", [("P1", "a.png"), ("P2", "b.png")])
    with pytest.raises(InputError, match=r"line 3: image 'b\.png' not found.*--on-error skip"):
        collect_image_items(manifest)


def test_manifest_missing_file_skipped_on_request(tmp_path):
    write_png(tmp_path / "a.png")
    manifest = write_manifest(tmp_path / "m.csv", [("P1", "a.png"), ("P2", "gone.png")])

    found = collect_image_items(manifest, on_missing="skip")

    assert [item.name for item in found.items] == ["a.png"]
    assert [(failure.item.patient_id, failure.item.name) for failure in found.missing] == [("P2", "gone.png")]
    assert "image not found (manifest line 3" in found.missing[0].reason


def test_manifest_outside_path_fails_even_when_skipping(tmp_path):
    write_png(tmp_path / "outside.png")
    (tmp_path / "sub").mkdir()
    manifest = write_manifest(tmp_path / "sub" / "m.csv", [("P1", "../outside.png")])
    with pytest.raises(InputError, match="outside the manifest's folder"):
        collect_image_items(manifest, on_missing="skip")


def test_manifest_lines_count_blank_lines(tmp_path):
    write_png(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("patient_id,image\n\nP1,a.png\nP2,b.png\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"m\.csv, line 4: image 'b\.png' not found"):
        collect_image_items(manifest)


def test_manifest_empty_patient_id(tmp_path):
    write_png(tmp_path / "a.png")
    manifest = write_manifest(tmp_path / "m.csv", [("", "a.png")])
    with pytest.raises(InputError, match="line 2: empty 'patient_id'"):
        collect_image_items(manifest)


def test_manifest_duplicate_row(tmp_path):
    write_png(tmp_path / "a.png")
    manifest = write_manifest(tmp_path / "m.csv", [("P1", "a.png"), ("P1", "a.png")])
    with pytest.raises(InputError, match="line 3: image 'a.png' of patient 'P1' is already listed on line 2"):
        collect_image_items(manifest)


def test_manifest_through_symbolic_link(tmp_path):
    write_png(tmp_path / "store" / "a.png")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "images").symlink_to(tmp_path / "store")
    manifest = write_manifest(tmp_path / "project" / "m.csv", [("P1", "images/a.png")])

    found = collect_image_items(manifest)

    assert found.items[0].name == "images/a.png"


# Colour conversion ---------------------------------------------------------------


def test_rgb_kept(tmp_path):
    path = write_png(tmp_path / "a.png", 5)
    expected = np.asarray(Image.open(path))
    assert np.array_equal(pixels_of(path), expected)


def test_grayscale_repeated_to_three_channels(tmp_path):
    path = write_png(tmp_path / "g.png", 5, mode="L")
    gray = np.asarray(Image.open(path))
    rgb = pixels_of(path)
    assert rgb.shape == gray.shape + (3,)
    for channel in range(3):
        assert np.array_equal(rgb[:, :, channel], gray)


def test_rgba_composited_on_black(tmp_path):
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[..., :3] = 200
    pixels[0, 0, 3] = 0
    pixels[0, 1, 3] = 255
    pixels[0, 2, 3] = 128
    path = tmp_path / "a.png"
    Image.fromarray(pixels, "RGBA").save(path)

    rgb = pixels_of(path)

    assert rgb.shape == (4, 4, 3)
    assert rgb[0, 0].tolist() == [0, 0, 0]
    assert rgb[0, 1].tolist() == [200, 200, 200]
    assert rgb[0, 2].tolist() == [100, 100, 100]


def test_la_composited_on_black(tmp_path):
    pixels = np.full((2, 2, 2), 100, dtype=np.uint8)
    pixels[0, 0, 1] = 0
    pixels[1, 1, 1] = 255
    path = tmp_path / "la.png"
    Image.fromarray(pixels, "LA").save(path)

    rgb = pixels_of(path)

    assert rgb[0, 0].tolist() == [0, 0, 0]
    assert rgb[1, 1].tolist() == [100, 100, 100]


def test_palette_to_rgb(tmp_path):
    source = write_png(tmp_path / "src.png", 3)
    path = tmp_path / "p.png"
    Image.open(source).convert("P").save(path)
    assert Image.open(path).mode == "P"

    rgb = pixels_of(path)

    assert rgb.shape == (48, 40, 3)
    assert np.array_equal(rgb, np.asarray(Image.open(path).convert("RGB")))


def test_palette_transparency_composited(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 250, 250, 250] + [0] * 762)
    image.putpixel((0, 0), 1)
    image.putpixel((1, 0), 1)
    path = tmp_path / "t.png"
    image.save(path, transparency=1)

    rgb = pixels_of(path)

    assert rgb.tolist() == [[[0, 0, 0], [0, 0, 0]]]


def test_cmyk_to_rgb(tmp_path):
    path = tmp_path / "c.jpg"
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(path)

    rgb = pixels_of(path)

    assert rgb.shape == (6, 8, 3)
    red, green, blue = rgb[3, 4].tolist()
    assert red > 200 and green < 60 and blue < 60


def test_16bit_scaled_by_own_min_max(tmp_path):
    values = np.array([[1000, 2000], [3000, 5000]], dtype=np.uint16)
    path = tmp_path / "d.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")

    rgb = pixels_of(path)

    assert rgb[..., 0].tolist() == [[0, 64], [128, 255]]
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_32bit_integer_scaled_by_min_max(tmp_path):
    values = np.array([[-70000, 0], [70000, 140000]], dtype=np.int32)
    path = tmp_path / "i.tif"
    Image.fromarray(values, "I").save(path)

    rgb = pixels_of(path)

    assert rgb[..., 1].tolist() == [[0, 85], [170, 255]]


def test_float_constant_image_is_black():
    assert to_rgb_uint8(np.full((3, 3), 7.5, dtype=np.float32)).max() == 0


def test_exif_orientation_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # left half white, right half black
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=100)

    rgb = pixels_of(path)

    assert rgb.shape == (20, 10, 3)
    assert rgb[2, 5].mean() > 200  # the white left half is now on top
    assert rgb[17, 5].mean() < 50


def test_bilevel_to_rgb(tmp_path):
    path = tmp_path / "b.png"
    Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1").save(path)
    assert pixels_of(path).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_unsupported_array_shape():
    with pytest.raises(ValueError, match="unsupported pixel array shape"):
        to_rgb_uint8(np.zeros((4, 4, 5)))


# Unreadable files ------------------------------------------------------------------


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty file \(0 bytes\)"):
        pixels_of(path)


def test_truncated_file(tmp_path):
    path = write_png(tmp_path / "t.png", 1, size=(200, 200))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt image data"):
        pixels_of(path)


def test_non_image_file_with_image_suffix(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("patient history, not pixels")
    with pytest.raises(ValueError, match="not an image file Pillow can read"):
        pixels_of(path)


@pytest.mark.parametrize("side", [40, 64])  # warning range (> limit) and error range (> 2 x limit)
def test_decompression_bomb_rejected(tmp_path, monkeypatch, side):
    path = write_png(tmp_path / "big.png", 1, size=(side, side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ValueError, match="decompression bomb"):
            pixels_of(path)


# Extension point for other formats ---------------------------------------------------


def test_registered_format_expands_and_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(image_sources, "_FORMATS", [])
    volume = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    path = tmp_path / "case9.fake.gz"
    np.save(open(path, "wb"), volume)

    def expand(file_path, name, patient_id, content_hash):
        return [
            Item(patient_id, f"{name}#slice {k}", content_hash, 0, ImageRef(file_path, k))
            for k in range(volume.shape[0])
        ]

    def load(item):
        return np.load(item.payload.path)[item.payload.index]

    register_image_format((".fake.gz",), expand, load)
    (tmp_path / "ignored.fake").write_text("x")

    found = collect_image_items(tmp_path, id_pattern=r"^(case\d+)")

    assert [item.name for item in found.items] == ["case9.fake.gz#slice 0", "case9.fake.gz#slice 1"]
    assert found.n_skipped_files == 1
    slice_one = to_rgb_uint8(load_pixels(found.items[1]))
    assert slice_one.shape == (3, 4, 3)
    assert slice_one[0, 0, 0] == 0 and slice_one[-1, -1, 0] == 255


def test_registered_format_hooks(tmp_path, monkeypatch):
    monkeypatch.setattr(image_sources, "_FORMATS", [])

    def sniff(path):
        return path.read_bytes().startswith(b"FAKE")

    def expand(path, name, patient_id, content_hash):
        stored_id, order = path.read_text().split()[1:3]
        return [Item(patient_id or stored_id, name, content_hash, 0, ImageRef(path, int(order)))]

    def arrange(items):
        return sorted(items, key=lambda item: item.payload.index)

    def config(items):
        return {"fake": {"n": len(items)}}

    register_image_format((".fake",), expand, lambda item: np.zeros((2, 2)), sniff=sniff, patient_id_from_file=True, arrange=arrange, config=config)
    (tmp_path / "b_img").write_text("FAKE P7 2")
    (tmp_path / "a.fake").write_text("FAKE P7 3")
    write_png(tmp_path / "m.png")
    (tmp_path / "c_img").write_text("FAKE P8 1")
    (tmp_path / "notes").write_text("plain text")

    found = collect_image_items(tmp_path)

    # Scan order is a.fake, b_img, c_img, m.png; the fake format's three
    # places are refilled in its own order and m.png keeps its place.
    assert [item.name for item in found.items] == ["c_img", "b_img", "a.fake", "m.png"]
    assert [item.patient_id for item in found.items] == ["P8", "P7", "P7", "m"]
    assert found.config == {"fake": {"n": 3}}
    assert found.n_skipped_files == 1

    overridden = collect_image_items(tmp_path, id_pattern=r"^([bm])_?")

    ids = {item.name: item.patient_id for item in overridden.items}
    assert ids["b_img"] == "b"  # a matching pattern overrides the stored ID
    assert ids["c_img"] == "P8"  # a file that stores its ID falls back to it


# Scanner options per call ----------------------------------------------------------------


def test_scanner_options_bound_to_one_source(tmp_path):
    nib = pytest.importorskip("nibabel")
    from mmdx.embed.scanners import ScannerOptions

    volume = np.random.default_rng(4).random((8, 9, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "case1.nii.gz")
    registry = list(image_sources._FORMATS)
    narrow = ScannerOptions(slices="all", percentiles=(40, 60))

    custom = collect_image_items(tmp_path, scanner_options=narrow)
    default = collect_image_items(tmp_path)

    assert image_sources._FORMATS == registry
    assert len(custom.items) == 6
    assert custom.config["nifti"]["percentiles"] == [40.0, 60.0]
    assert len(default.items) == 1
    assert default.config["nifti"]["slices"] == "middle"
    middle = next(item for item in custom.items if item.name == default.items[0].name)
    narrow_pixels = custom.load_pixels(middle)
    default_pixels = default.load_pixels(default.items[0])
    # 40-60 percentiles map more values to 0 and 255 than 0.5-99.5 do.
    assert np.mean((narrow_pixels == 0) | (narrow_pixels == 255)) > np.mean((default_pixels == 0) | (default_pixels == 255))
    assert np.array_equal(load_pixels(default.items[0]), default_pixels)
