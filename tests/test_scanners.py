"""DICOM and NIfTI readers, on the real files that pydicom and nibabel ship."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from nibabel.testing import data_path as nibabel_data  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from mmdx.embed.runner import Item  # noqa: E402
from mmdx.embed.scanners import (  # noqa: E402
    DicomRef,
    ScannerOptions,
    arrange_dicom_items,
    expand_scanner_file,
    is_dicom,
    is_nifti,
    load_scanner_pixels,
    parse_percentiles,
    parse_slices,
    parse_window,
    scale_percentiles,
    scanner_config,
    window_linear,
)
from mmdx.errors import InputError  # noqa: E402

DEFAULT = ScannerOptions()


def sample_file(name: str) -> Path:
    return Path(get_testdata_file(name))


def raw_pixels(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


def write_copy(source: Path, target: Path, **tags) -> Path:
    """Write a copy of a DICOM file with some tags changed (None deletes a tag)."""
    ds = pydicom.dcmread(source)
    for keyword, value in tags.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
    return target


def load_one(path: Path, options: ScannerOptions = DEFAULT) -> np.ndarray:
    items = expand_scanner_file(path, options, patient_id="p1")
    assert len(items) == 1
    return load_scanner_pixels(items[0].payload, options)


# Windowing ----------------------------------------------------------------


def expected_linear(x: float, center: float, width: float) -> int:
    """Apply the DICOM LINEAR window to one value, written out independently of the module."""
    if x <= center - 0.5 - (width - 1) / 2:
        return 0
    if x > center - 0.5 + (width - 1) / 2:
        return 255
    return round(((x - (center - 0.5)) / (width - 1) + 0.5) * 255)


def test_window_linear_hand_computed():
    # c = 40, w = 400: values <= 40 - 0.5 - 199.5 = -160 give 0, values > 239 give 255,
    # and x in between gives ((x - 39.5) / 399 + 0.5) * 255:
    #   x = -159 -> (-198.5 / 399 + 0.5) * 255 = 0.6391 -> 1
    #   x = 0   -> (-39.5 / 399 + 0.5) * 255 = 102.2556 -> 102
    #   x = 40  -> (  0.5 / 399 + 0.5) * 255 = 127.8195 -> 128
    #   x = 100 -> ( 60.5 / 399 + 0.5) * 255 = 166.1654 -> 166
    values = np.array([-1000.0, -160.0, -159.0, 0.0, 40.0, 100.0, 239.0, 239.5, 3000.0])
    result = window_linear(values, 40.0, 400.0)
    assert result.dtype == np.uint8
    assert result.tolist() == [0, 0, 1, 102, 128, 166, 255, 255, 255]


def test_window_linear_width_one_is_threshold():
    assert window_linear(np.array([9.0, 9.5, 10.0]), 10.0, 1.0).tolist() == [0, 0, 255]


def test_stored_window_on_mr_pixel():
    path = sample_file("MR_small.dcm")  # Window Center 600, Width 1600, no rescale
    raw = raw_pixels(path)
    grey = load_one(path)
    x = float(raw[20, 30])
    expected = expected_linear(x, 600.0, 1600.0)
    assert 0 < expected < 255
    assert int(grey[20, 30]) == expected
    assert grey.shape == raw.shape


def test_user_window_overrides_stored():
    path = sample_file("MR_small.dcm")
    raw = raw_pixels(path).astype(float)
    grey = load_one(path, ScannerOptions(window=(1000.0, 500.0)))
    assert np.array_equal(grey, window_linear(raw, 1000.0, 500.0))
    assert not np.array_equal(grey, load_one(path))


def test_minmax_window():
    path = sample_file("MR_small.dcm")
    raw = raw_pixels(path).astype(float)
    grey = load_one(path, ScannerOptions(window="minmax"))
    position = np.unravel_index(np.argmax(raw), raw.shape)
    assert grey[position] == 255
    assert grey[np.unravel_index(np.argmin(raw), raw.shape)] == 0
    x = raw[20, 30]
    assert int(grey[20, 30]) == round((x - raw.min()) * 255 / (raw.max() - raw.min()))


def test_ct_rescale_intercept_applied():
    path = sample_file("CT_small.dcm")  # slope 1, intercept -1024, no stored window
    raw = raw_pixels(path).astype(float)
    grey = load_one(path, ScannerOptions(window=(40.0, 400.0)))
    hu = raw[64, 64] - 1024
    expected = expected_linear(hu, 40.0, 400.0)
    assert int(grey[64, 64]) == expected
    assert np.array_equal(grey, window_linear(raw - 1024, 40.0, 400.0))


def test_rescale_slope_and_intercept(tmp_path):
    path = write_copy(sample_file("CT_small.dcm"), tmp_path / "scaled.dcm", RescaleSlope="2", RescaleIntercept="-100")
    raw = raw_pixels(path).astype(float)
    grey = load_one(path, ScannerOptions(window=(1000.0, 2000.0)))
    x = raw[10, 10]
    value = 2 * x - 100
    expected = expected_linear(value, 1000.0, 2000.0)
    assert int(grey[10, 10]) == expected
    # Slope and intercept matter: the unscaled values give another image.
    assert not np.array_equal(grey, window_linear(raw, 1000.0, 2000.0))


def test_shared_functional_group_rescale(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(sample_file("emri_small.dcm") if _has_pydicom_data() else sample_file("rtdose.dcm"))
    transform = Dataset()
    transform.RescaleSlope = "3"
    transform.RescaleIntercept = "5"
    group = Dataset()
    group.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    items = expand_scanner_file(path, ScannerOptions(window=(500.0, 1000.0)), patient_id="p1")
    grey = load_scanner_pixels(items[1].payload, ScannerOptions(window=(500.0, 1000.0)))
    expected = window_linear(ds.pixel_array[1].astype(float) * 3 + 5, 500.0, 1000.0)
    assert np.array_equal(grey, expected)


def test_monochrome1_inverted(tmp_path):
    source = sample_file("MR_small.dcm")
    path = write_copy(source, tmp_path / "mono1.dcm", PhotometricInterpretation="MONOCHROME1")
    normal = load_one(source)
    inverted = load_one(path)
    assert np.array_equal(inverted, 255 - normal)


def test_invalid_stored_width(tmp_path):
    path = write_copy(sample_file("MR_small.dcm"), tmp_path / "w0.dcm", WindowWidth="0")
    with pytest.raises(ValueError, match="Window Width 0 is invalid"):
        load_one(path)


# Multi-frame --------------------------------------------------------------


def test_multiframe_one_item_per_frame():
    path = sample_file("rtdose.dcm")  # 15 frames, 10x10
    items = expand_scanner_file(path, DEFAULT, name="rtdose.dcm")
    assert len(items) == 15
    assert [item.name.rsplit("#", 1)[1] for item in items] == [f"frame={n}" for n in range(15)]
    assert all(item.patient_id == "id11111" for item in items)
    assert len({item.content_hash for item in items}) == 15
    frames = raw_pixels(path).astype(float)
    grey = load_scanner_pixels(items[3].payload, DEFAULT)
    # No stored window: the frame's own min/max.
    frame = frames[3]
    expected = np.rint((frame - frame.min()) * 255 / (frame.max() - frame.min())).astype(np.uint8)
    assert np.array_equal(grey, expected)


def test_arrange_keeps_frame_order():
    items = expand_scanner_file(sample_file("rtdose.dcm"), DEFAULT, name="rtdose.dcm")
    arranged = arrange_dicom_items(list(reversed(items)))
    assert [item.payload.index for item in arranged] == list(range(15))


def _has_pydicom_data() -> bool:
    try:
        import data_store  # noqa: F401  (the pydicom-data package)
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_pydicom_data(), reason="pydicom-data not installed (emri_small.dcm)")
def test_multiframe_mr_frames_differ():
    path = sample_file("emri_small.dcm")  # enhanced MR, 10 frames, empty PatientID
    items = expand_scanner_file(path, DEFAULT, name="emri.dcm", patient_id="given")
    assert len(items) == 10
    assert items[9].name.endswith("#frame=9")
    first = load_scanner_pixels(items[0].payload, DEFAULT)
    last = load_scanner_pixels(items[9].payload, DEFAULT)
    assert first.shape == (64, 64)
    assert not np.array_equal(first, last)


# Patient IDs, series and hashes ------------------------------------------


def test_patient_id_from_tag():
    items = expand_scanner_file(sample_file("MR_small.dcm"), DEFAULT, name="mr.dcm")
    assert items[0].patient_id == "4MR1"
    series = pydicom.dcmread(sample_file("MR_small.dcm")).SeriesInstanceUID
    assert items[0].name == f"mr.dcm#series={series}"


def test_caller_patient_id_wins():
    items = expand_scanner_file(sample_file("MR_small.dcm"), DEFAULT, name="mr.dcm", patient_id="007")
    assert items[0].patient_id == "007"


def test_missing_patient_id_error(tmp_path):
    path = write_copy(sample_file("MR_small.dcm"), tmp_path / "anon.dcm", PatientID=None, PatientName="Doe^Jane")
    with pytest.raises(InputError) as caught:
        expand_scanner_file(path, DEFAULT, name="scans/anon.dcm")
    message = str(caught.value)
    assert "scans/anon.dcm" in message
    assert "PatientID" in message
    assert "--id-pattern" in message
    assert "Doe" not in message


def test_no_identifying_tags_in_logs(tmp_path, caplog):
    path = write_copy(sample_file("MR_small.dcm"), tmp_path / "named.dcm", PatientName="Doe^Jane", PatientBirthDate="19700101")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(path.read_bytes()[:2000])
    caplog.set_level(logging.DEBUG)
    for file in (path, broken):
        for item in expand_scanner_file(file, DEFAULT, name=file.name):
            try:
                load_scanner_pixels(item.payload, DEFAULT)
            except ValueError as exc:
                assert "Doe" not in str(exc)
    assert "Doe" not in caplog.text
    assert "19700101" not in caplog.text


def test_hash_depends_on_window():
    path = sample_file("MR_small.dcm")
    stored = expand_scanner_file(path, DEFAULT)[0].content_hash
    again = expand_scanner_file(path, ScannerOptions())[0].content_hash
    windowed = expand_scanner_file(path, ScannerOptions(window=(40.0, 400.0)))[0].content_hash
    assert stored == again
    assert stored != windowed


def _series_copy(tmp_path: Path, name: str, series: str, instance: int, z: float) -> Path:
    return write_copy(
        sample_file("MR_small.dcm"),
        tmp_path / name,
        SeriesInstanceUID=series,
        SOPInstanceUID=pydicom.uid.generate_uid(),
        InstanceNumber=str(instance),
        ImagePositionPatient=["0", "0", str(z)],
        ImageOrientationPatient=["1", "0", "0", "0", "1", "0"],
    )


def test_series_grouping_and_order(tmp_path):
    files = [
        _series_copy(tmp_path, "a.dcm", "1.2.3.2", 1, 0.0),
        _series_copy(tmp_path, "b.dcm", "1.2.3.1", 2, 5.0),
        _series_copy(tmp_path, "c.dcm", "1.2.3.2", 2, 5.0),
        _series_copy(tmp_path, "d.dcm", "1.2.3.1", 1, 0.0),
    ]
    items = [item for path in files for item in expand_scanner_file(path, DEFAULT, name=path.name)]
    arranged = arrange_dicom_items(items)
    assert [item.name for item in arranged] == [
        "d.dcm#series=1.2.3.1",
        "b.dcm#series=1.2.3.1",
        "a.dcm#series=1.2.3.2",
        "c.dcm#series=1.2.3.2",
    ]
    assert {item.patient_id for item in arranged} == {"4MR1"}


def test_arrange_orders_by_position_without_instance(tmp_path):
    items = []
    for name, z in (("top.dcm", 20.0), ("bottom.dcm", -20.0), ("middle.dcm", 0.0)):
        path = _series_copy(tmp_path, name, "1.2.9", 1, z)
        items += expand_scanner_file(path, DEFAULT, name=name)
    other = Item("p", "photo.png", "h", 0, None)
    arranged = arrange_dicom_items([items[0], other, items[1], items[2]])
    assert arranged[1] is other
    assert [arranged[i].name.split("#")[0] for i in (0, 2, 3)] == ["bottom.dcm", "middle.dcm", "top.dcm"]


# Damaged files ------------------------------------------------------------


def test_not_dicom_file(tmp_path):
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"this is not a DICOM file" * 20)
    items = expand_scanner_file(path, DEFAULT, name="junk.dcm")
    assert len(items) == 1
    with pytest.raises(ValueError, match="not a DICOM file"):
        load_scanner_pixels(items[0].payload, DEFAULT)


def test_truncated_dicom():
    items = expand_scanner_file(sample_file("MR_truncated.dcm"), DEFAULT)
    with pytest.raises(ValueError, match="truncated"):
        load_scanner_pixels(items[0].payload, DEFAULT)


def test_dicom_without_pixel_data(tmp_path):
    path = write_copy(sample_file("MR_small.dcm"), tmp_path / "nopix.dcm", PixelData=None)
    items = expand_scanner_file(path, DEFAULT)
    with pytest.raises(ValueError, match="no pixel data"):
        load_scanner_pixels(items[0].payload, DEFAULT)


def test_non_image_dicom_skipped(tmp_path):
    dicomdir = Path(sample_file("MR_small.dcm")).parent / "dicomdirtests" / "DICOMDIR"
    assert is_dicom(dicomdir)
    assert expand_scanner_file(dicomdir, DEFAULT) == []
    assert expand_scanner_file(sample_file("rtplan.dcm"), DEFAULT) == []
    assert expand_scanner_file(sample_file("test-SR.dcm"), DEFAULT) == []


def test_missing_decoder_names_syntax_and_package():
    path = sample_file("MR_small_jpeg_ls_lossless.dcm")
    try:
        raw_pixels(path)
    except RuntimeError:
        pass
    else:
        pytest.skip("a JPEG-LS decoder is installed here")
    items = expand_scanner_file(path, DEFAULT)
    with pytest.raises(ValueError) as caught:
        load_scanner_pixels(items[0].payload, DEFAULT)
    assert "JPEG-LS Lossless" in str(caught.value)
    assert "1.2.840.10008.1.2.4.80" in str(caught.value)
    assert "pylibjpeg" in str(caught.value)


def test_deflated_transfer_syntax():
    path = sample_file("image_dfl.dcm")  # Deflated Explicit VR Little Endian, 512x512, no window
    raw = raw_pixels(path).astype(float)
    grey = load_one(path)
    expected = np.rint((raw - raw.min()) * 255 / (raw.max() - raw.min())).astype(np.uint8)
    assert np.array_equal(grey, expected)


def test_compressed_rle_decodes_like_uncompressed():
    plain = load_one(sample_file("MR_small.dcm"))
    rle = load_one(sample_file("MR_small_RLE.dcm"))
    assert np.array_equal(plain, rle)


# Detection ----------------------------------------------------------------


def test_is_dicom_by_preamble(tmp_path):
    no_suffix = tmp_path / "IM0001"
    shutil.copy(sample_file("MR_small.dcm"), no_suffix)
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    assert is_dicom(no_suffix)
    assert not is_dicom(png)
    assert is_dicom(tmp_path / "missing.DCM")


def test_is_nifti_names():
    assert is_nifti("brain.nii")
    assert is_nifti("Brain.NII.GZ")
    assert not is_nifti("brain.gz")
    assert not is_nifti("brain.nii.bak")


# NIfTI ----------------------------------------------------------------------


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_nifti_every_n_slice_count(tmp_path):
    path = write_nifti(tmp_path / "case-07.nii.gz", np.random.default_rng(0).random((10, 12, 7)).astype(np.float32))
    options = ScannerOptions(slices="every:3")
    items = expand_scanner_file(path, options, name="case-07.nii.gz")
    assert [item.name for item in items] == [f"case-07.nii.gz#slice={k}" for k in (0, 3, 6)]
    assert {item.patient_id for item in items} == {"case-07"}
    grey = load_scanner_pixels(items[1].payload, options)
    assert grey.shape == (12, 10)
    assert grey.dtype == np.uint8


def test_nifti_real_file_every_four():
    path = Path(nibabel_data) / "anatomical.nii"  # 33 x 41 x 25, LAS
    options = ScannerOptions(slices="every:4")
    items = expand_scanner_file(path, options)
    assert len(items) == math.ceil(25 / 4)
    assert items[0].patient_id == "anatomical"
    assert load_scanner_pixels(items[-1].payload, options).shape == (41, 33)


def test_nifti_middle_and_axes(tmp_path):
    path = write_nifti(tmp_path / "v.nii", np.zeros((4, 6, 8), dtype=np.int16))
    assert [i.name.split("#")[1] for i in expand_scanner_file(path, DEFAULT)] == ["slice=4"]
    coronal = ScannerOptions(slices="all", slice_axis="coronal")
    assert len(expand_scanner_file(path, coronal)) == 6
    sagittal = ScannerOptions(slices="all", slice_axis="sagittal")
    assert len(expand_scanner_file(path, sagittal)) == 4


def test_nifti_reoriented_to_ras(tmp_path):
    data = np.zeros((5, 6, 3), dtype=np.float32)
    data[0, 5, 1] = 100.0  # first voxel along x, last along y
    flip_x = np.diag([-1.0, 1.0, 1.0, 1.0])  # stored left-to-right: LAS
    path = write_nifti(tmp_path / "las.nii", data, flip_x)
    options = ScannerOptions(slices="all", percentiles=(0.0, 100.0))
    items = expand_scanner_file(path, options)
    grey = load_scanner_pixels(items[1].payload, options)
    # After RAS reorientation x = 0 becomes x = 4 (right-most column), and
    # y = 5 (most anterior) is drawn in the top row.
    assert grey.shape == (6, 5)
    assert grey[0, 4] == 255
    assert int(grey.sum()) == 255


def test_scale_percentiles_hand_computed():
    volume = np.arange(101, dtype=float)  # percentile p is the value p
    scaled = scale_percentiles(volume, 10.0, 60.0)
    assert scaled[10] == 0
    assert scaled[5] == 0
    assert scaled[60] == 255
    assert scaled[30] == 102  # (30 - 10) * 255 / 50 = 102


def test_nifti_hash_depends_on_slice_options(tmp_path):
    path = write_nifti(tmp_path / "v.nii", np.ones((4, 4, 4), dtype=np.float32))
    base = expand_scanner_file(path, ScannerOptions(slices="all"))[2].content_hash
    other = expand_scanner_file(path, ScannerOptions(slices="all", percentiles=(1.0, 99.0)))[2].content_hash
    assert base != other


def test_four_d_nifti_uses_first_volume():
    path = Path(nibabel_data) / "example4d.nii.gz"  # 128 x 96 x 24 x 2
    items = expand_scanner_file(path, DEFAULT)
    assert len(items) == 1
    assert load_scanner_pixels(items[0].payload, DEFAULT).shape == (96, 128)


# Options and config -------------------------------------------------------


def test_parse_window():
    assert parse_window("stored") == "stored"
    assert parse_window("MinMax") == "minmax"
    assert parse_window("40,400") == (40.0, 400.0)
    for bad in ("40", "40,0", "a,b", "40,400,1"):
        with pytest.raises(InputError, match="--window"):
            parse_window(bad)


def test_parse_slices_and_percentiles():
    assert parse_slices("every:04") == "every:4"
    assert parse_slices("ALL") == "all"
    with pytest.raises(InputError, match="--slices"):
        parse_slices("every:0")
    assert parse_percentiles("1,99") == (1.0, 99.0)
    with pytest.raises(InputError, match="--percentiles"):
        parse_percentiles("99,1")


def test_options_accept_cli_spellings():
    options = ScannerOptions(window="40,400", slices="EVERY:2", percentiles="1,99")
    assert options.window == (40.0, 400.0)
    assert options.slices == "every:2"
    assert options.percentiles == (1.0, 99.0)
    with pytest.raises(InputError, match="--slice-axis"):
        ScannerOptions(slice_axis="oblique")
    with pytest.raises(InputError, match="--window"):
        ScannerOptions(window=(40.0, 0.0))


def test_scanner_config_per_format():
    dicom = Item("p", "a.dcm", "h", 0, DicomRef(Path("a.dcm")))
    options = ScannerOptions(window=(40.0, 400.0), slices="all")
    config = scanner_config(options, [dicom])
    assert config["dicom"]["window"] == "40,400"
    assert "nifti" not in config
    assert scanner_config(options, [Item("p", "x.png", "h", 0, None)]) == {}


# Image sources and the CLI -----------------------------------------------


@pytest.fixture
def default_scanner_formats():
    """Restore the default scanner registration after a test that changes it."""
    from mmdx.embed.scanners import register_scanner_formats

    yield register_scanner_formats
    register_scanner_formats()


def dicom_folder(root: Path) -> Path:
    """Two series of patient 4MR1, one file without a suffix, patient 1CT1 and a DICOMDIR (no image)."""
    folder = root / "scans"
    _series_copy(folder, "s2_a.dcm", "1.2.3.2", 2, 5.0)
    _series_copy(folder, "s2_b.dcm", "1.2.3.2", 1, 0.0)
    _series_copy(folder, "s1_a.dcm", "1.2.3.1", 1, 0.0)
    shutil.copy(_series_copy(root, "tmp.dcm", "1.2.3.1", 2, 5.0), folder / "IM0004")
    shutil.copy(sample_file("CT_small.dcm"), folder / "ct.dcm")
    shutil.copy(Path(sample_file("MR_small.dcm")).parent / "dicomdirtests" / "DICOMDIR", folder / "DICOMDIR")
    return folder


def test_folder_of_dicom_collected(tmp_path):
    from mmdx.embed.image_sources import collect_image_items

    found = collect_image_items(dicom_folder(tmp_path))
    names = [item.name.split("#")[0] for item in found.items]
    assert names == ["ct.dcm", "s1_a.dcm", "IM0004", "s2_b.dcm", "s2_a.dcm"]
    assert [item.patient_id for item in found.items] == ["1CT1"] + ["4MR1"] * 4
    assert found.items[2].name == "IM0004#series=1.2.3.1"
    assert found.config["dicom"]["window"] == "stored"


def test_folder_id_pattern_overrides_tag(tmp_path):
    from mmdx.embed.image_sources import collect_image_items

    found = collect_image_items(dicom_folder(tmp_path), id_pattern=r"^(\w\w)")
    assert {item.patient_id for item in found.items} == {"s1", "s2", "IM", "ct"}


def test_folder_missing_patient_id(tmp_path):
    from mmdx.embed.image_sources import collect_image_items

    folder = tmp_path / "scans"
    write_copy(sample_file("MR_small.dcm"), folder / "anon.dcm", PatientID="")
    with pytest.raises(InputError, match=r"anon\.dcm: DICOM PatientID .*--id-pattern"):
        collect_image_items(folder)


def run_cli(*args: str):
    from click.testing import CliRunner

    from mmdx.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


TINY_MODEL = ("--weights", "random", "--alpha", "0.35", "--image-size", "32", "--batch-size", "2", "--quiet")


def test_cli_rejects_bad_window(tmp_path):
    result = run_cli("embed", "images", str(tmp_path), "--store", str(tmp_path / "s.h5"), "--window", "40")
    assert result.exit_code == 2
    assert "Invalid value for '--window'" in result.output
    assert "CENTER,WIDTH" in result.output


@pytest.mark.slow
def test_embed_dicom_folder_end_to_end(tmp_path, default_scanner_formats):
    from mmdx.store import FeatureStore

    folder = dicom_folder(tmp_path)
    store = tmp_path / "features.h5"

    first = run_cli("embed", "images", str(folder), "--store", str(store), *TINY_MODEL)
    assert first.exit_code == 0, first.output
    assert "5 embedded" in first.output
    (info,) = FeatureStore(store).list_sets()
    assert info.config["dicom"]["window"] == "stored"
    rows = FeatureStore(store).read(info.name).rows
    assert sorted(set(rows.patient_ids.tolist())) == ["1CT1", "4MR1"]
    assert rows.vectors.shape == (5, 1280)

    again = run_cli("embed", "images", str(folder), "--store", str(store), *TINY_MODEL)
    assert "0 embedded, 5 already stored" in again.output

    windowed = run_cli("embed", "images", str(folder), "--store", str(store), *TINY_MODEL, "--window", "40,400")
    assert windowed.exit_code == 0, windowed.output
    windows = sorted(info.config["dicom"]["window"] for info in FeatureStore(store).list_sets())
    assert windows == ["40,400", "stored"]


@pytest.mark.slow
def test_corrupt_dicom_store_unharmed(tmp_path, default_scanner_formats):
    from mmdx.store import FeatureStore

    folder = dicom_folder(tmp_path)
    store = tmp_path / "features.h5"
    assert run_cli("embed", "images", str(folder), "--store", str(store), *TINY_MODEL).exit_code == 0
    (info,) = FeatureStore(store).list_sets()
    before = FeatureStore(store).read(info.name).rows.vectors.copy()

    (folder / "zz_broken.dcm").write_bytes(sample_file("MR_small.dcm").read_bytes()[:3000])
    failed = run_cli("embed", "images", str(folder), "--store", str(store), *TINY_MODEL)
    assert failed.exit_code == 1
    assert "zz_broken.dcm" in failed.output
    assert "truncated" in failed.output
    assert np.array_equal(FeatureStore(store).read(info.name).rows.vectors, before)

    rejects = tmp_path / "rejects.csv"
    skipped = run_cli(
        "embed", "images", str(folder), "--store", str(store), *TINY_MODEL, "--on-error", "skip", "--rejects", str(rejects)
    )
    assert skipped.exit_code == 0, skipped.output
    assert "1 failed" in skipped.output
    assert "zz_broken.dcm" in rejects.read_text()
    assert len(FeatureStore(store).read(info.name).rows) == 5


@pytest.mark.slow
def test_embed_nifti_every_n(tmp_path, default_scanner_formats):
    from mmdx.store import FeatureStore

    folder = tmp_path / "volumes"
    folder.mkdir()
    write_nifti(folder / "case-01.nii.gz", np.random.default_rng(1).random((16, 16, 10)).astype(np.float32))
    store = tmp_path / "features.h5"
    result = run_cli("embed", "images", str(folder), "--store", str(store), *TINY_MODEL, "--slices", "every:3")
    assert result.exit_code == 0, result.output
    (info,) = FeatureStore(store).list_sets()
    assert info.config["nifti"]["slices"] == "every:3"
    rows = FeatureStore(store).read(info.name).rows
    assert rows.items.tolist() == [f"case-01.nii.gz#slice={k}" for k in (0, 3, 6, 9)]
    assert set(rows.patient_ids.tolist()) == {"case-01"}
