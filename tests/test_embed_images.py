"""``embed_images`` and ``mmdx embed images`` with a narrow, randomly initialised MobileNetV2."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mmdx.cli import main
from mmdx.embed.images import embed_images, prepare_image, preprocess_batch
from mmdx.embed.image_sources import expand_image_file, load_pixels
from mmdx.embed.pixels import decode_jpeg_like_keras
from mmdx.errors import InputError
from mmdx.store import FeatureStore

# A narrow model at a small input size: the real code path in about a second.
TINY = {
    "weights": "random",
    "alpha": 0.35,
    "image_size": 32,
    "random_seed": 7,
    "batch_size": 3,
    "engine": "keras",
    "quiet": True,
}


def write_image(path: Path, seed: int, size=(40, 36), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").convert(mode).save(path)
    return path


def read_rows(store: Path) -> dict[tuple[str, str, int], tuple[str, np.ndarray]]:
    reader = FeatureStore(store)
    (info,) = reader.list_sets()
    rows = reader.read(info.name).rows
    return {key: (digest, vector) for key, digest, vector in zip(rows.keys(), rows.hashes.tolist(), rows.vectors)}


def assert_same_vector(actual: np.ndarray, expected: np.ndarray) -> None:
    # Random-weight MobileNetV2 outputs are tiny (about 1e-11), so the
    # tolerance is relative to the vector's own scale.
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * scale)


@pytest.fixture
def class_folder(tmp_path) -> Path:
    folder = tmp_path / "mri"
    for index, name in enumerate(["glioma/g01.png", "glioma/g02.png", "notumor/n01.png", "notumor/n02.jpg", "n03.png"]):
        write_image(folder / name, index)
    (folder / "notumor" / "labels.txt").write_text("not an image")
    return folder


@pytest.fixture
def medpix_like(tmp_path) -> Path:
    """A manifest of 7 images for 3 patients, with several pixel modes."""
    folder = tmp_path / "medpix"
    rows = []
    modes = ["RGB", "RGBA", "L", "RGB", "P", "RGB", "RGBA"]
    for index, mode in enumerate(modes):
        patient = f"00{index % 3}"
        name = f"images/{patient}_synpic{index}.png"
        write_image(folder / name, 100 + index, mode=mode)
        rows.append((patient, name))
    manifest = folder / "images.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "image", "plane"])
        for patient, name in rows:
            writer.writerow([patient, name, "axial"])
    return manifest


# Preprocessing ------------------------------------------------------------------


def write_mode_samples(folder: Path) -> list[Path]:
    paths = [write_image(folder / f"{mode}.png", i, mode=mode) for i, mode in enumerate(["RGB", "L", "RGBA", "P", "LA"])]
    Image.new("CMYK", (30, 20), (10, 200, 30, 5)).save(folder / "cmyk.jpg")
    Image.fromarray(np.linspace(0, 60000, 30 * 20, dtype=np.uint16).reshape(20, 30)).save(folder / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(
        folder / "rotated.jpg", exif=exif.tobytes()
    )
    return paths + [folder / "cmyk.jpg", folder / "deep.png", folder / "rotated.jpg"]


@pytest.mark.parametrize("preprocessing, dtype", [("keras", np.float32), ("pillow", np.uint8)])
def test_all_modes_scale_to_unit_range(tmp_path, preprocessing, dtype):
    paths = write_mode_samples(tmp_path)

    batch = np.stack([prepare_image(expand_image_file(p, p.name, "p")[0], 32, preprocessing=preprocessing) for p in paths])
    scaled = preprocess_batch(batch)

    assert batch.shape == (len(paths), 32, 32, 3)
    assert batch.dtype == dtype
    assert scaled.dtype == np.float32
    assert scaled.min() >= -1.0
    assert scaled.max() <= 1.0
    assert scaled.min() < -0.5  # scaled to [-1, 1], not divided by 255


def test_preprocess_input_endpoints():
    batch = np.array([0, 51, 255], dtype=np.uint8).reshape(1, 1, 3, 1).repeat(3, axis=3)

    scaled = preprocess_batch(batch)

    assert scaled[0, 0, :, 0].tolist() == pytest.approx([-1.0, 51 / 127.5 - 1.0, 1.0])


def test_pillow_resize_is_pillow_bilinear(tmp_path):
    path = write_image(tmp_path / "a.png", 1, size=(64, 48))
    expected = np.asarray(Image.open(path).resize((32, 32), Image.Resampling.BILINEAR))

    resized = prepare_image(expand_image_file(path, "a.png", "p")[0], 32, preprocessing="pillow")

    assert np.array_equal(resized, expected)


@pytest.mark.parametrize("name, size", [("a.jpg", (200, 150)), ("b.png", (64, 48)), ("grey.jpg", (40, 300))])
def test_keras_preprocessing_matches_pipeline_pixels(tmp_path, name, size):
    # image_dataset_from_directory decodes with decode_image(channels=3) and
    # resizes with tf.image.resize(bilinear); the pixels must be equal.
    import tensorflow as tf

    mode = "L" if name.startswith("grey") else "RGB"
    pixels = np.random.default_rng(5).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    smooth = image.resize((size[0] // 4, size[1] // 4)).resize(size)  # JPEG-friendly content
    smooth.save(tmp_path / name, quality=90)
    expected = tf.image.resize(
        tf.io.decode_image(tf.io.read_file(str(tmp_path / name)), channels=3, expand_animations=False),
        (128, 128),
        method="bilinear",
    ).numpy()

    resized = prepare_image(expand_image_file(tmp_path / name, name, "p")[0], 128, preprocessing="keras")

    assert resized.dtype == np.float32
    assert np.array_equal(resized, expected)


def test_keras_jpeg_decoding_differs_from_pillow(tmp_path):
    # The reason the keras mode exists: TensorFlow's JPEG decoder (fast
    # integer DCT) and Pillow's (accurate DCT) give different pixels.
    pixels = np.random.default_rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    item = expand_image_file(tmp_path / "a.jpg", "a.jpg", "p")[0]

    keras_pixels = load_pixels(item, jpeg_decoder="tensorflow")
    pillow_pixels = load_pixels(item, jpeg_decoder="pillow")

    assert keras_pixels.shape == pillow_pixels.shape == (64, 64, 3)
    assert not np.array_equal(keras_pixels, pillow_pixels)
    assert np.abs(keras_pixels.astype(int) - pillow_pixels.astype(int)).max() <= 16


def test_keras_jpeg_decoding_keeps_orientation(tmp_path):
    pixels = np.random.default_rng(7).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=100)
    item = expand_image_file(tmp_path / "r.jpg", "r.jpg", "p")[0]

    upright = load_pixels(item, jpeg_decoder="tensorflow")

    # Orientation 6 is turned upright by a clockwise quarter turn, as Pillow does.
    assert np.array_equal(upright, np.rot90(decode_jpeg_like_keras((tmp_path / "r.jpg").read_bytes()), -1))
    assert upright.shape == load_pixels(item).shape == (30, 20, 3)


def test_keras_jpeg_decoding_rejects_truncated_file(tmp_path):
    pixels = np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    item = expand_image_file(tmp_path / "t.jpg", "t.jpg", "p")[0]

    with pytest.raises(ValueError, match="truncated or corrupt JPEG") as caught:
        load_pixels(item, jpeg_decoder="tensorflow")

    assert "function_node" not in str(caught.value)
    assert "[Op:" not in str(caught.value)


# Embedding ------------------------------------------------------------------------


def test_fail_message_names_every_failed_file(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        write_image(folder / f"good{index}.png", index)
    pixels = np.random.default_rng(9).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "cut.jpg")
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zero.jpg").write_bytes(b"")

    with pytest.raises(InputError) as caught:
        embed_images(folder, tmp_path / "s.h5", **{**TINY, "batch_size": 8})  # one batch for all five files

    message = str(caught.value)
    assert "cut.jpg" in message
    assert "zero.jpg" in message
    assert "empty file (0 bytes)" in message
    assert "Nothing from this batch was stored" in message


def test_folder_embeds_one_row_per_image(class_folder, tmp_path):
    store = tmp_path / "s.h5"

    report = embed_images(class_folder, store, **TINY)

    assert report.n_items == 5
    assert report.n_embedded == 5
    assert report.n_failed == 0
    assert report.width == 1280
    assert "non-image files skipped: 1" in report.summary()
    rows = read_rows(store)
    assert sorted(rows) == [
        ("g01", "glioma/g01.png", 0),
        ("g02", "glioma/g02.png", 0),
        ("n01", "notumor/n01.png", 0),
        ("n02", "notumor/n02.jpg", 0),
        ("n03", "n03.png", 0),
    ]
    digest, vector = rows[("n03", "n03.png", 0)]
    assert digest == hashlib.sha256((class_folder / "n03.png").read_bytes()).hexdigest()
    assert vector.shape == (1280,)


def test_feature_set_config_identity(class_folder, tmp_path):
    store = tmp_path / "s.h5"
    embed_images(class_folder, store, **TINY)

    (info,) = FeatureStore(store).list_sets()

    assert info.modality == "image"
    assert info.encoder == "keras.applications.MobileNetV2"
    assert info.config["weights"] == {"source": "random", "seed": 7}
    assert info.config["alpha"] == 0.35
    assert info.config["image_size"] == 32
    assert info.config["scaling"] == "mobilenet_v2.preprocess_input"
    assert info.config["pooling"] == "avg"
    assert info.config["preprocessing"] == "keras"
    assert "tf.image.resize bilinear" in info.config["resize"]
    assert set(info.config["versions"]) >= {"tensorflow", "keras"}
    assert info.config["augmentation"]["seed"] == 0
    assert info.info["n_images"] == 5
    assert info.info["engine"] == "keras"


def test_pillow_preprocessing_keeps_earlier_config(class_folder, tmp_path):
    store = tmp_path / "s.h5"
    keras_report = embed_images(class_folder, store, **TINY)
    pillow_report = embed_images(class_folder, store, preprocessing="pillow", **TINY)

    sets = {info.name: info for info in FeatureStore(store).list_sets()}

    assert keras_report.feature_set != pillow_report.feature_set
    assert pillow_report.n_embedded == 5
    # Sets written before --preprocessing existed had exactly these entries,
    # so they keep their names and are found again with --preprocessing pillow.
    pillow_config = sets[pillow_report.feature_set].config
    assert "preprocessing" not in pillow_config
    assert "jpeg_decoder" not in pillow_config
    assert pillow_config["resize"] == "Pillow BILINEAR to image_size x image_size, aspect ratio not kept"


def test_unknown_preprocessing_raises_input_error(class_folder, tmp_path):
    with pytest.raises(InputError, match="--preprocessing must be one of keras, pillow"):
        embed_images(class_folder, tmp_path / "s.h5", preprocessing="opencv", **TINY)
    assert not (tmp_path / "s.h5").exists()


def test_other_seed_makes_other_feature_set(class_folder, tmp_path):
    store = tmp_path / "s.h5"
    embed_images(class_folder, store, **TINY)
    embed_images(class_folder, store, **{**TINY, "random_seed": 8})

    names = [info.name for info in FeatureStore(store).list_sets()]

    assert len(names) == 2


def test_rerun_embeds_nothing_new(class_folder, tmp_path):
    store = tmp_path / "s.h5"
    embed_images(class_folder, store, **TINY)
    before = read_rows(store)

    report = embed_images(class_folder, store, **TINY)

    assert report.n_embedded == 0
    assert report.n_already_stored == 5
    after = read_rows(store)
    assert sorted(after) == sorted(before)
    for key in before:
        assert np.array_equal(after[key][1], before[key][1])


def test_changed_file_replaces_its_row(class_folder, tmp_path):
    store = tmp_path / "s.h5"
    embed_images(class_folder, store, **TINY)
    before = read_rows(store)
    write_image(class_folder / "glioma" / "g02.png", 999)

    report = embed_images(class_folder, store, **TINY)

    assert report.n_embedded == 1
    after = read_rows(store)
    assert len(after) == 5
    key = ("g02", "glioma/g02.png", 0)
    assert after[key][0] == hashlib.sha256((class_folder / "glioma" / "g02.png").read_bytes()).hexdigest()
    assert after[key][0] != before[key][0]
    assert not np.allclose(after[key][1], before[key][1], rtol=1e-3, atol=0)
    assert np.array_equal(after[("g01", "glioma/g01.png", 0)][1], before[("g01", "glioma/g01.png", 0)][1])


def test_manifest_order_irrelevant(medpix_like, tmp_path):
    shuffled = medpix_like.with_name("shuffled.csv")
    lines = medpix_like.read_text().splitlines()
    body = lines[1:]
    random.Random(3).shuffle(body)
    assert body != lines[1:]
    shuffled.write_text("\n".join([lines[0]] + body) + "\n")

    embed_images(medpix_like, tmp_path / "a.h5", **TINY)
    embed_images(shuffled, tmp_path / "b.h5", **{**TINY, "batch_size": 2})

    first, second = read_rows(tmp_path / "a.h5"), read_rows(tmp_path / "b.h5")
    assert sorted(first) == sorted(second)
    assert {key[0] for key in first} == {"000", "001", "002"}
    for key in first:
        assert first[key][0] == second[key][0]
        assert_same_vector(second[key][1], first[key][1])


def test_distinct_images_distinct_vectors(medpix_like, tmp_path):
    embed_images(medpix_like, tmp_path / "a.h5", **TINY)
    rows = read_rows(tmp_path / "a.h5")
    vectors = np.stack([vector for _, vector in rows.values()])
    # Each test image has its own random pixels, so no two vectors agree.
    for i in range(len(vectors)):
        for j in range(i + 1, len(vectors)):
            assert not np.allclose(vectors[i], vectors[j], rtol=1e-3, atol=0)


def test_id_pattern_groups_images_by_patient(medpix_like, tmp_path):
    folder = medpix_like.parent / "images"
    store = tmp_path / "s.h5"

    embed_images(folder, store, id_pattern=r"^(\d+)_synpic", **TINY)

    patients = sorted(key[0] for key in read_rows(store))
    assert patients == ["000", "000", "000", "001", "001", "002", "002"]


# Unreadable images ---------------------------------------------------------------


def add_bad_files(folder: Path) -> None:
    (folder / "bad").mkdir()
    (folder / "bad" / "zero.png").write_bytes(b"")
    data = write_image(folder / "bad" / "cut.png", 50, size=(200, 200)).read_bytes()
    (folder / "bad" / "cut.png").write_bytes(data[: len(data) // 3])
    (folder / "bad" / "text.png").write_text("not pixels")


def test_bad_files_fail_and_store_unharmed(class_folder, tmp_path):
    store = tmp_path / "s.h5"
    embed_images(class_folder, store, **TINY)
    before = read_rows(store)
    add_bad_files(class_folder)

    with pytest.raises(InputError, match=r"bad/cut\.png: truncated or corrupt image data.*Other failures in this batch: .*bad/text\.png.*bad/zero\.png.*--on-error skip"):
        embed_images(class_folder, store, **TINY)

    after = read_rows(store)
    assert sorted(after) == sorted(before)
    for key in before:
        assert np.array_equal(after[key][1], before[key][1])
    report = embed_images(class_folder, store, on_error="skip", **TINY)  # the writer lock was released
    assert report.n_failed == 3


def test_bad_files_skipped_and_listed(class_folder, tmp_path):
    store = tmp_path / "s.h5"
    add_bad_files(class_folder)

    report = embed_images(class_folder, store, on_error="skip", **TINY)

    assert report.n_embedded == 5
    assert report.n_failed == 3
    assert report.rejects_path == str(tmp_path / "s.h5.rejects-images.csv")
    with open(report.rejects_path, newline="") as handle:
        rejects = {row["item"]: row["reason"] for row in csv.DictReader(handle)}
    assert rejects["bad/zero.png"] == "empty file (0 bytes)"
    assert rejects["bad/cut.png"].startswith("truncated or corrupt image data")
    assert rejects["bad/text.png"] == "not an image file Pillow can read"
    assert len(read_rows(store)) == 5


def test_missing_manifest_file_skipped_and_listed(medpix_like, tmp_path):
    (medpix_like.parent / "images" / "001_synpic1.png").unlink()

    with pytest.raises(InputError, match=r"images\.csv, line 3: image 'images/001_synpic1\.png' not found"):
        embed_images(medpix_like, tmp_path / "s.h5", **TINY)
    report = embed_images(medpix_like, tmp_path / "s.h5", on_error="skip", **TINY)

    assert (report.n_items, report.n_embedded, report.n_failed) == (7, 6, 1)
    with open(report.rejects_path, newline="") as handle:
        (reject,) = list(csv.DictReader(handle))
    assert (reject["patient_id"], reject["item"]) == ("001", "images/001_synpic1.png")
    assert reject["reason"].startswith("image not found (manifest line 3")


def test_decompression_bomb_is_item_failure(class_folder, tmp_path, monkeypatch):
    write_image(class_folder / "huge.png", 5, size=(60, 60))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # the 40x36 images stay below it

    report = embed_images(class_folder, tmp_path / "s.h5", on_error="skip", **TINY)

    assert [failure.item.name for failure in report.failures] == ["huge.png"]
    assert "decompression bomb" in report.failures[0].reason


# Weights -----------------------------------------------------------------------------


def test_missing_weights_file(class_folder, tmp_path):
    with pytest.raises(InputError, match=r"--weights '.*absent\.weights\.h5': file not found"):
        embed_images(class_folder, tmp_path / "s.h5", **{**TINY, "weights": tmp_path / "absent.weights.h5"})
    assert not (tmp_path / "s.h5").exists()


def test_unloadable_weights_file(class_folder, tmp_path):
    path = tmp_path / "broken.weights.h5"
    path.write_bytes(b"not hdf5")
    with pytest.raises(InputError, match=r"not loadable as MobileNetV2 no-top weights"):
        embed_images(class_folder, tmp_path / "s.h5", **{**TINY, "weights": path})


def test_weights_file_identity_is_sha256(class_folder, tmp_path):
    from mmdx.embed.images import build_mobilenet

    model, _, _ = build_mobilenet("random", 32, 0.35, 1)
    path = tmp_path / "tiny.weights.h5"
    model.save_weights(path)

    embed_images(class_folder, tmp_path / "s.h5", **{**TINY, "weights": path})

    (info,) = FeatureStore(tmp_path / "s.h5").list_sets()
    assert info.config["weights"] == {"source": "file", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert info.info["weights_path"] == str(path)


def test_alpha_not_mobilenet_value(class_folder, tmp_path):
    for weights in ("imagenet", "random"):
        with pytest.raises(InputError, match="--alpha 0.6 is not a MobileNetV2 width multiplier"):
            embed_images(class_folder, tmp_path / "s.h5", **{**TINY, "weights": weights, "alpha": 0.6})
    assert not (tmp_path / "s.h5").exists()


def test_width_without_model_matches_keras():
    from mmdx.embed.images import build_mobilenet, mobilenet_width

    for alpha in (0.35, 1.3):
        model, _, _ = build_mobilenet("random", 32, alpha, 0)
        assert mobilenet_width(alpha) == model.output_shape[-1]
    assert mobilenet_width(1.4) == 1792


def test_versions_from_metadata_match_modules():
    import keras
    import tensorflow as tf

    from mmdx.embed.images import library_versions

    versions = library_versions()

    assert versions["tensorflow"] == tf.__version__
    assert versions["keras"] == keras.__version__


# Re-runs without TensorFlow ------------------------------------------------------------

RERUN_SCRIPT = """
import json, sys
from mmdx.embed.images import embed_images
report = embed_images(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))
print(json.dumps({"embedded": report.n_embedded, "stored": report.n_already_stored,
                  "tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules}))
"""


def rerun_in_subprocess(source: Path, store: Path, options: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", RERUN_SCRIPT, str(source), str(store), json.dumps(options, default=str)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_rerun_does_not_import_tensorflow(class_folder, tmp_path):
    store = tmp_path / "s.h5"
    embed_images(class_folder, store, **TINY)

    outcome = rerun_in_subprocess(class_folder, store, TINY)

    assert outcome["embedded"] == 0
    assert outcome["stored"] == 5
    assert outcome["tensorflow"] is False
    assert outcome["keras"] is False


def test_rerun_with_weights_file_skips_model(class_folder, tmp_path):
    from mmdx.embed.images import build_mobilenet

    model, _, _ = build_mobilenet("random", 32, 0.35, 1)
    path = tmp_path / "tiny.weights.h5"
    model.save_weights(path)
    options = {**TINY, "weights": str(path)}
    store = tmp_path / "s.h5"
    embed_images(class_folder, store, **options)

    outcome = rerun_in_subprocess(class_folder, store, options)

    assert outcome["embedded"] == 0
    assert outcome["tensorflow"] is False
    assert len(FeatureStore(store).list_sets()) == 1


def test_new_image_builds_model_once(class_folder, tmp_path, monkeypatch):
    import mmdx.embed.images as images

    store = tmp_path / "s.h5"
    embed_images(class_folder, store, **TINY)
    images._last_encoder.clear()
    calls = []
    real_build = images.build_mobilenet
    monkeypatch.setattr(images, "build_mobilenet", lambda *args: calls.append(args) or real_build(*args))

    unchanged = embed_images(class_folder, store, **TINY)
    assert unchanged.n_embedded == 0
    assert calls == []

    write_image(class_folder / "n04.png", 77)
    added = embed_images(class_folder, store, **TINY)

    assert added.n_embedded == 1
    assert len(calls) == 1
    (info,) = FeatureStore(store).list_sets()
    assert info.info["engine"] == "keras"


# Scanner options per call --------------------------------------------------------------


def write_volume(path: Path, seed: int) -> Path:
    nib = pytest.importorskip("nibabel")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).random((8, 9, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def test_scanner_options_apply_per_call(tmp_path):
    from mmdx.embed.scanners import ScannerOptions

    folder = tmp_path / "volumes"
    write_volume(folder / "case1.nii.gz", 1)
    every_two = ScannerOptions(slices="every:2", percentiles=(5, 95))

    first = embed_images(folder, tmp_path / "a.h5", scanner_options=every_two, **TINY)
    second = embed_images(folder, tmp_path / "b.h5", **TINY)
    third = embed_images(folder, tmp_path / "c.h5", scanner_options=ScannerOptions(slices="all"), **TINY)

    assert (first.n_embedded, second.n_embedded, third.n_embedded) == (3, 1, 6)
    configs = [FeatureStore(tmp_path / name).list_sets()[0].config["nifti"] for name in ("a.h5", "b.h5", "c.h5")]
    assert configs[0] == {**configs[0], "slices": "every:2", "percentiles": [5.0, 95.0]}
    assert configs[1]["slices"] == "middle"
    assert configs[1]["percentiles"] == [0.5, 99.5]
    assert configs[2]["slices"] == "all"
    assert configs[2]["percentiles"] == [0.5, 99.5]


# Command line ------------------------------------------------------------------------


def test_cli_embeds_and_prints_summary(class_folder, tmp_path):
    store = tmp_path / "s.h5"
    args = ["embed", "images", str(class_folder), "--store", str(store), "--weights", "random", "--alpha", "0.35",
            "--image-size", "32", "--batch-size", "2", "--engine", "keras", "--quiet"]

    result = CliRunner().invoke(main, args)

    assert result.exit_code == 0, result.output
    assert "5 items, 5 embedded, 0 already stored, 0 failed (width 1280" in result.output


BAD_OPTIONS = [
    (["--image-size", "0"], "--image-size"),
    (["--image-size", "8"], "--image-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--alpha", "0.3"], "--alpha"),
    (["--alpha", "x"], "--alpha"),
    (["--augment-views", "-1"], "--augment-views"),
    (["--rotation", "-5"], "--rotation"),
    (["--shift", "1"], "--shift"),
    (["--shear", "91"], "--shear"),
    (["--zoom", "-0.1"], "--zoom"),
    (["--fill", "mirror"], "--fill"),
    (["--engine", "tflite"], "--engine"),
    (["--random-seed", "x"], "--random-seed"),
    (["--augment-seed", "1.5"], "--augment-seed"),
    (["--window", "40"], "--window"),
    (["--slices", "every:0"], "--slices"),
    (["--slice-axis", "oblique"], "--slice-axis"),
    (["--percentiles", "90,10"], "--percentiles"),
    (["--id-pattern", "("], "--id-pattern"),
    (["--id-pattern", r"^\w+"], "--id-pattern"),
    (["--on-error", "ignore"], "--on-error"),
    (["--wait", "-1"], "--wait"),
    (["--weights", "/nonexistent"], "--weights"),
]


BAD_ARGUMENTS = [
    ({"image_size": 0}, "--image-size"),
    ({"batch_size": 0}, "--batch-size"),
    ({"alpha": 0.3}, "--alpha"),
    ({"augment_views": -1}, "--augment-views"),
    ({"engine": "tflite"}, "--engine"),
    ({"on_error": "ignore"}, "--on-error"),
    ({"id_pattern": "("}, "--id-pattern"),
    ({"id_pattern": r"^\w+"}, "--id-pattern"),
    ({"weights": "/nonexistent"}, "--weights"),
]


@pytest.mark.parametrize("arguments, option", BAD_ARGUMENTS, ids=[next(iter(a)) + "=" + str(next(iter(a.values()))) for a, _ in BAD_ARGUMENTS])
def test_bad_argument_raises_before_store(class_folder, tmp_path, arguments, option):
    store = tmp_path / "s.h5"

    with pytest.raises(InputError) as raised:
        embed_images(class_folder, store, **{**TINY, **arguments})

    assert str(raised.value).startswith(option)
    assert "\n" not in str(raised.value)
    assert not store.exists()


def test_bad_augment_setting_raises_input_error():
    from mmdx.embed.augment import AugmentSettings

    with pytest.raises(InputError, match="^--rotation must be between 0 and 180 degrees, got -5"):
        AugmentSettings(rotation=-5)


@pytest.mark.parametrize("args, option", BAD_OPTIONS, ids=[" ".join(args) for args, _ in BAD_OPTIONS])
def test_cli_bad_option_one_error_line(class_folder, tmp_path, args, option):
    store = tmp_path / "s.h5"

    result = CliRunner().invoke(main, ["embed", "images", str(class_folder), "--store", str(store), *args])

    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.output
    assert option in error_lines[0]
    assert "Traceback" not in result.output
    assert not store.exists()


def test_cli_help_states_every_default():
    from mmdx.cli.embed_images import images

    for param in images.params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        assert param.help, param.name
        has_default = param.required or param.is_flag or param.show_default or "[default:" in param.help
        assert has_default, param.name


def test_cli_alpha_help_lists_mobilenet_alphas():
    from mmdx.cli.embed_images import ALPHA_HELP
    from mmdx.embed.images import MOBILENET_ALPHAS

    listed = ALPHA_HELP.replace(" or ", ", ").split(", ")

    assert tuple(float(value) for value in listed) == MOBILENET_ALPHAS


# Real data and weights ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize("preprocessing", ["keras", "pillow"])
def test_medpix_vectors_match_keras_predict(shared_data, shared_mobilenet_weights, tmp_path, preprocessing):
    import keras
    import tensorflow as tf

    source = shared_data / "medpix-mr"
    with open(source / "images.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # A few RGB and RGBA images: the first rows and the first RGBA row.
    chosen = rows[:3]
    for row in rows:
        if Image.open(source / row["image"]).mode == "RGBA":
            chosen.append(row)
            break
    assert len(chosen) == 4
    manifest = tmp_path / "images.csv"
    (tmp_path / "images").symlink_to(source / "images")
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)

    embed_images(
        manifest, tmp_path / "s.h5", weights=shared_mobilenet_weights, engine="keras", preprocessing=preprocessing, quiet=True
    )

    stored = read_rows(tmp_path / "s.h5")
    inputs = []
    for row in chosen:
        image = Image.open(source / row["image"])
        pixels = np.asarray(image, dtype=np.float32)
        if image.mode == "RGBA":
            pixels = pixels[..., :3] * (pixels[..., 3:] / 255.0)
        rgb = np.rint(pixels).astype(np.uint8)
        if preprocessing == "keras":
            resized = tf.image.resize(rgb, (128, 128), method="bilinear").numpy()
        else:
            resized = Image.fromarray(rgb).resize((128, 128), Image.Resampling.BILINEAR)
        inputs.append(np.asarray(resized, dtype=np.float32))
    batch = keras.applications.mobilenet_v2.preprocess_input(np.stack(inputs))
    model = keras.applications.MobileNetV2(
        input_shape=(128, 128, 3), include_top=False, pooling="avg", weights=str(shared_mobilenet_weights)
    )
    expected = model.predict(batch, verbose=0)

    for row, vector in zip(chosen, expected):
        digest, actual = stored[(row["patient_id"], row["image"], 0)]
        assert actual.shape == (1280,)
        assert float(np.abs(actual - vector).max()) < 1e-4


@pytest.mark.slow
@pytest.mark.shared_data
def test_default_embedding_matches_keras_pipeline(shared_data, shared_mobilenet_weights, tmp_path):
    # mmdx's defaults (keras preprocessing, ONNX Runtime when installed)
    # against image_dataset_from_directory + preprocess_input + predict, on
    # real JPEG slices of brain-mri-4class.
    import keras

    files = sorted((shared_data / "brain-mri-4class").rglob("*.jpg"))
    chosen = files[:: len(files) // 300][:300]
    folder = tmp_path / "slices"
    folder.mkdir()
    for index, path in enumerate(chosen):
        (folder / f"s{index:04d}.jpg").symlink_to(path)

    report = embed_images(folder, tmp_path / "s.h5", weights=shared_mobilenet_weights, quiet=True)
    dataset = keras.utils.image_dataset_from_directory(
        folder, labels=None, image_size=(128, 128), batch_size=32, shuffle=False, verbose=False
    )
    model = keras.applications.MobileNetV2(
        input_shape=(128, 128, 3), include_top=False, pooling="avg", weights=str(shared_mobilenet_weights)
    )
    expected = model.predict(dataset.map(keras.applications.mobilenet_v2.preprocess_input), verbose=0)

    stored = read_rows(tmp_path / "s.h5")
    assert report.n_embedded == len(chosen)
    differences = [
        float(np.abs(stored[(Path(name).stem, Path(name).name, 0)][1] - vector).max())
        for name, vector in zip(dataset.file_paths, expected)
    ]
    assert len(differences) == len(chosen)
    assert max(differences) < 1e-4


def test_identical_files_embedded_once(tmp_path, monkeypatch):
    from mmdx.embed import images as images_module

    folder = tmp_path / "images"
    write_image(folder / "a.png", 1)
    write_image(folder / "b.png", 2)
    (folder / "copy-of-a.png").write_bytes((folder / "a.png").read_bytes())
    (folder / "second-copy.png").write_bytes((folder / "a.png").read_bytes())
    rows_run = []
    load_encoder = images_module._load_encoder

    def counting_load_encoder(*args):
        name, run = load_encoder(*args)

        def counting_run(batch):
            rows_run.append(len(batch))
            return run(batch)

        return name, counting_run

    monkeypatch.setattr(images_module, "_load_encoder", counting_load_encoder)

    report = embed_images(folder, tmp_path / "s.h5", **TINY)

    stored = read_rows(tmp_path / "s.h5")
    assert report.n_embedded == 4
    assert sum(rows_run) == 2
    assert np.array_equal(stored[("copy-of-a", "copy-of-a.png", 0)][1], stored[("a", "a.png", 0)][1])
    assert np.array_equal(stored[("second-copy", "second-copy.png", 0)][1], stored[("a", "a.png", 0)][1])
    assert not np.array_equal(stored[("b", "b.png", 0)][1], stored[("a", "a.png", 0)][1])


def test_identical_broken_files_all_rejected(tmp_path):
    folder = tmp_path / "images"
    write_image(folder / "good.png", 1)
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "bad-copy.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")

    report = embed_images(folder, tmp_path / "s.h5", on_error="skip", **TINY)

    assert report.n_embedded == 1
    assert sorted(failure.item.name for failure in report.failures) == ["bad-copy.png", "bad.png"]
