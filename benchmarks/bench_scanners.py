"""Reading cost of the scanner formats alone, without a model: DICOM frames and NIfTI slices per second.

Times :func:`mmdx.embed.scanners.load_scanner_pixels` (decode, modality LUT,
window, 8-bit conversion) on DICOM files that pydicom ships and on a
synthetic NIfTI volume written to a temporary folder. The NIfTI time
includes reading and scaling the whole volume once; later slices come from
the cache.

Usage::

    python benchmarks/bench_scanners.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.data import get_testdata_file

from mmdx.embed.scanners import ScannerOptions, expand_scanner_file, load_scanner_pixels


def time_loads(label: str, path: str | Path, options: ScannerOptions, repeats: int) -> None:
    """Load every item of ``path`` ``repeats`` times and print loads per second."""
    items = expand_scanner_file(path, options, patient_id="bench")
    start = time.perf_counter()
    for _ in range(repeats):
        for item in items:
            load_scanner_pixels(item.payload, options)
    elapsed = time.perf_counter() - start
    n_loads = repeats * len(items)
    print(f"{label}: {n_loads} loads in {elapsed:.2f} s, {n_loads / elapsed:.0f} per second")


def main() -> None:
    options = ScannerOptions()
    time_loads("CT_small.dcm, 128x128, explicit VR", get_testdata_file("CT_small.dcm"), options, 300)
    time_loads("693_J2KI.dcm, 512x512, JPEG 2000 via Pillow", get_testdata_file("693_J2KI.dcm"), options, 20)
    emri = get_testdata_file("emri_small.dcm")  # from pydicom-data; None where it is not installed
    if emri is not None:
        time_loads("emri_small.dcm, 10 frames of 64x64", emri, options, 30)

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "volume.nii.gz"
        volume = np.random.default_rng(0).normal(size=(256, 256, 160)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
        all_slices = ScannerOptions(slices="all")
        start = time.perf_counter()
        n_items = len(expand_scanner_file(path, all_slices, patient_id="bench"))
        print(f"volume.nii.gz, 256x256x160 float32: listing {n_items} slices took {time.perf_counter() - start:.2f} s")
        time_loads("volume.nii.gz, all axial slices", path, all_slices, 1)


if __name__ == "__main__":
    main()
