"""Augmented views: the transforms, their seeding, and how views are stored."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mmdx.cli import main
from mmdx.embed.augment import AugmentSettings, apply_transform, augment_image, draw_transform, view_generator
from mmdx.embed.images import embed_images
from mmdx.errors import InputError
from mmdx.store import FeatureStore

TINY = {
    "weights": "random",
    "alpha": 0.35,
    "image_size": 32,
    "random_seed": 7,
    "batch_size": 4,
    "engine": "keras",
    "quiet": True,
}
HASH_A = "ab" * 32
HASH_B = "cd" * 32


def noise_image(seed: int, height: int = 32, width: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.float32)


# Transforms ---------------------------------------------------------------------------

KERAS_CASES = [
    {"theta": 25.0, "tx": 3.0, "ty": -5.0, "shear": 10.0, "zx": 1.1, "zy": 0.85, "flip_horizontal": True},
    {"theta": -35.0, "tx": -6.0, "ty": 2.0, "shear": -0.2, "zx": 0.8, "zy": 1.2, "flip_horizontal": False},
    {"theta": 0.0, "tx": 0.0, "ty": 0.0, "shear": 0.0, "zx": 1.0, "zy": 1.0, "flip_horizontal": True},
]


@pytest.mark.parametrize("fill", ["nearest", "constant", "reflect", "wrap"])
@pytest.mark.parametrize("params", KERAS_CASES)
def test_transform_matches_keras(params, fill):
    legacy = pytest.importorskip("keras.src.legacy.preprocessing.image", reason="Keras legacy ImageDataGenerator not available")
    image = noise_image(1)

    expected = legacy.ImageDataGenerator(fill_mode=fill).apply_transform(image, dict(params))

    assert np.array_equal(apply_transform(image, params, fill), expected)


def test_zero_ranges_keep_image():
    image = noise_image(2)
    settings = AugmentSettings(rotation=0, shift=0, shear=0, zoom=0, flip=False)

    augmented = augment_image(image, settings, view_generator(0, HASH_A, 1))

    np.testing.assert_allclose(augmented, image, atol=1e-3)


def test_drawn_parameters_within_ranges():
    settings = AugmentSettings()
    draws = [draw_transform(settings, view_generator(0, HASH_A, view), 128, 64) for view in range(1, 400)]

    assert max(abs(d["theta"]) for d in draws) <= 40
    assert max(abs(d["theta"]) for d in draws) > 30
    assert max(abs(d["tx"]) for d in draws) <= 0.2 * 128
    assert max(abs(d["ty"]) for d in draws) <= 0.2 * 64
    assert max(abs(d["shear"]) for d in draws) <= 0.2
    assert min(min(d["zx"], d["zy"]) for d in draws) >= 0.8
    assert max(max(d["zx"], d["zy"]) for d in draws) <= 1.2
    flips = sum(d["flip_horizontal"] for d in draws)
    assert 150 < flips < 250


def test_no_flip_never_flips():
    settings = AugmentSettings(flip=False)
    draws = [draw_transform(settings, view_generator(0, HASH_A, view), 32, 32) for view in range(1, 100)]
    assert not any(d["flip_horizontal"] for d in draws)


def test_one_range_leaves_other_draws():
    wide = draw_transform(AugmentSettings(rotation=40), view_generator(3, HASH_A, 2), 32, 32)
    narrow = draw_transform(AugmentSettings(rotation=10), view_generator(3, HASH_A, 2), 32, 32)

    assert narrow["theta"] == pytest.approx(wide["theta"] / 4)
    for name in ("tx", "ty", "shear", "zx", "zy", "flip_horizontal"):
        assert narrow[name] == wide[name]


def test_view_generator_reproducible():
    first = view_generator(5, HASH_A, 3).random(4)
    again = view_generator(5, HASH_A, 3).random(4)
    assert np.array_equal(first, again)


@pytest.mark.parametrize(
    "other",
    [(6, HASH_A, 3, None), (5, HASH_B, 3, None), (5, HASH_A, 4, None), (5, HASH_A, 3, 0)],
    ids=["seed", "content", "view", "slice"],
)
def test_view_generator_depends_on_each_input(other):
    base = view_generator(5, HASH_A, 3, None).random(4)
    assert not np.array_equal(view_generator(*other).random(4), base)


@pytest.mark.parametrize(
    "field, value, expected",
    [("rotation", 200, "--rotation"), ("shift", 1.0, "--shift"), ("shear", -1, "--shear"), ("zoom", 1.5, "--zoom"), ("fill", "mirror", "--fill")],
)
def test_settings_reject_out_of_range(field, value, expected):
    with pytest.raises(InputError, match=expected):
        AugmentSettings(**{field: value})


def test_settings_config_records_seed_and_ranges():
    config = AugmentSettings(rotation=15).config(seed=9)
    assert config["rotation"] == 15
    assert config["seed"] == 9
    assert config["fill"] == "nearest"
    assert config["shear_unit"] == "degrees"


# Stored views ---------------------------------------------------------------------------


@pytest.fixture
def manifest(tmp_path) -> Path:
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    rows = []
    for index in range(5):
        name = f"images/p{index % 2}_{index}.png"
        Image.fromarray(noise_image(10 + index, 40, 36).astype(np.uint8)).save(folder / name)
        rows.append((f"p{index % 2}", name))
    path = folder / "images.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "image"])
        writer.writerows(rows)
    return path


def read_views(store: Path, name: str | None = None) -> dict[tuple[str, str, int], np.ndarray]:
    reader = FeatureStore(store)
    name = name or reader.choose_set("image")
    rows = reader.read(name).rows
    return dict(zip(rows.keys(), rows.vectors))


def assert_same_vector(actual: np.ndarray, expected: np.ndarray) -> None:
    # Random-weight outputs are tiny, so compare relative to the vector's scale.
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * scale)


def test_views_stored_with_index(manifest, tmp_path):
    store = tmp_path / "s.h5"

    report = embed_images(manifest, store, augment_views=2, **TINY)

    assert report.n_items == 15
    assert report.n_embedded == 15
    assert "augmented views per image: 2" in report.summary()
    rows = FeatureStore(store).read(report.feature_set).rows
    assert sorted(set(rows.views.tolist())) == [0, 1, 2]
    assert rows.views.dtype == np.int32
    keys = rows.keys()
    assert ("p0", "images/p0_0.png", 2) in keys
    (info,) = FeatureStore(store).list_sets()
    assert info.n_views == 3
    assert info.info["augment_views"] == 2


def test_augmented_views_differ_from_plain(manifest, tmp_path):
    vectors = read_views_after(manifest, tmp_path / "s.h5", augment_views=2)
    plain = vectors[("p1", "images/p1_1.png", 0)]
    for view in (1, 2):
        assert not np.allclose(vectors[("p1", "images/p1_1.png", view)], plain, rtol=1e-3, atol=0)


def read_views_after(manifest: Path, store: Path, **options) -> dict:
    embed_images(manifest, store, **{**TINY, **options})
    return read_views(store)


def test_same_seed_same_views(manifest, tmp_path):
    first = read_views_after(manifest, tmp_path / "a.h5", augment_views=3, augment_seed=11)
    second = read_views_after(manifest, tmp_path / "b.h5", augment_views=3, augment_seed=11)

    assert sorted(first) == sorted(second)
    for key in first:
        assert np.array_equal(first[key], second[key])


def test_views_independent_of_batch_order(manifest, tmp_path):
    shuffled = manifest.with_name("shuffled.csv")
    lines = manifest.read_text().splitlines()
    body = lines[1:]
    random.Random(1).shuffle(body)
    assert body != lines[1:]
    shuffled.write_text("\n".join([lines[0]] + body) + "\n")

    first = read_views_after(manifest, tmp_path / "a.h5", augment_views=2)
    second = read_views_after(shuffled, tmp_path / "b.h5", augment_views=2, batch_size=3)

    assert sorted(first) == sorted(second)
    for key in first:
        assert_same_vector(second[key], first[key])


def test_other_seed_other_set_and_views(manifest, tmp_path):
    store = tmp_path / "s.h5"
    embed_images(manifest, store, augment_views=1, augment_seed=1, **TINY)
    embed_images(manifest, store, augment_views=1, augment_seed=2, **TINY)

    sets = FeatureStore(store).list_sets()

    assert len(sets) == 2
    first, second = (read_views(store, info.name) for info in sets)
    key = ("p0", "images/p0_0.png", 1)
    assert not np.allclose(first[key], second[key], rtol=1e-3, atol=0)


def test_larger_k_adds_only_missing_views(manifest, tmp_path):
    store = tmp_path / "s.h5"
    embed_images(manifest, store, augment_views=1, **TINY)
    before = read_views(store)

    report = embed_images(manifest, store, augment_views=3, **TINY)

    assert report.n_already_stored == 10
    assert report.n_embedded == 10
    after = read_views(store)
    assert len(after) == 20
    assert len(FeatureStore(store).list_sets()) == 1
    for key, vector in before.items():
        assert np.array_equal(after[key], vector)
    fresh = read_views_after(manifest, tmp_path / "fresh.h5", augment_views=3)
    for key in after:
        assert_same_vector(after[key], fresh[key])


def test_view_zero_equals_plain_vector(manifest, tmp_path):
    plain = read_views_after(manifest, tmp_path / "plain.h5")
    augmented = read_views_after(manifest, tmp_path / "aug.h5", augment_views=2)

    assert len(plain) == 5
    for key, vector in plain.items():
        assert key[2] == 0
        assert_same_vector(augmented[key], vector)


def test_plain_run_joins_augmented_set(manifest, tmp_path):
    store = tmp_path / "s.h5"
    embed_images(manifest, store, augment_views=2, **TINY)

    report = embed_images(manifest, store, **TINY)

    assert report.n_embedded == 0
    assert report.n_already_stored == 5
    assert len(FeatureStore(store).list_sets()) == 1
    assert "images with stored views above 0: 5" in report.summary()


def test_smaller_k_keeps_and_counts_views(manifest, tmp_path, caplog):
    store = tmp_path / "s.h5"
    embed_images(manifest, store, augment_views=3, **TINY)
    before = read_views(store)

    with caplog.at_level("INFO", logger="mmdx.embed.images"):
        report = embed_images(manifest, store, augment_views=1, **TINY)

    assert report.n_embedded == 0
    assert report.extra["images with stored views above 1"] == 5
    assert "5 images have stored views above --augment-views 1 from an earlier run" in caplog.text
    after = read_views(store)
    assert sorted(after) == sorted(before)
    assert max(key[2] for key in after) == 3


def test_same_k_reports_no_extra_views(manifest, tmp_path):
    store = tmp_path / "s.h5"
    embed_images(manifest, store, augment_views=2, **TINY)

    report = embed_images(manifest, store, augment_views=2, **TINY)

    assert not any("views above" in key for key in report.extra)


@pytest.mark.parametrize(
    "changed",
    [{"rotation": 10.0}, {"shift": 0.1}, {"shear": 5.0}, {"zoom": 0.3}, {"flip": False}, {"fill": "constant"}],
    ids=lambda changed: next(iter(changed)),
)
def test_settings_change_makes_new_set(manifest, tmp_path, changed):
    store = tmp_path / "s.h5"
    embed_images(manifest, store, augment_views=1, **TINY)

    report = embed_images(manifest, store, augment_views=1, augment=AugmentSettings(**changed), **TINY)

    assert report.n_embedded == 10
    sets = FeatureStore(store).list_sets()
    assert len(sets) == 2
    configs = {info.name: info.config["augmentation"] for info in sets}
    field = next(iter(changed))
    assert configs[report.feature_set][field] == changed[field]


def test_cli_augment_options(manifest, tmp_path):
    store = tmp_path / "s.h5"
    args = ["embed", "images", str(manifest), "--store", str(store), "--weights", "random", "--alpha", "0.35",
            "--image-size", "32", "--engine", "keras", "--quiet", "--augment-views", "2", "--rotation", "15",
            "--no-flip", "--fill", "reflect", "--augment-seed", "4"]

    result = CliRunner().invoke(main, args)

    assert result.exit_code == 0, result.output
    assert "15 items, 15 embedded" in result.output
    (info,) = FeatureStore(store).list_sets()
    augmentation = info.config["augmentation"]
    assert augmentation["rotation"] == 15.0
    assert augmentation["flip"] is False
    assert augmentation["fill"] == "reflect"
    assert augmentation["seed"] == 4


def test_cli_rejects_bad_augment_range(manifest, tmp_path):
    args = ["embed", "images", str(manifest), "--store", str(tmp_path / "s.h5"), "--zoom", "1.5"]

    result = CliRunner().invoke(main, args)

    assert result.exit_code == 2
    assert "--zoom" in result.output
