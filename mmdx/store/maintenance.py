"""Store maintenance behind ``mmdx store``: info, verify, rm, export and merge.

Each public function here is what one ``mmdx store`` command calls, and is
meant to be called from Python as well. Functions that change a store take
the writer lock and rewrite the main file atomically (see
:func:`mmdx.store.format.rebuild_main`), so a failure or a kill leaves the
store as it was.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from mmdx.errors import InputError, StoreError
from mmdx.store import format as fmt
from mmdx.store.api import FeatureSetInfo, FeatureStore, set_name_for

__all__ = [
    "EXPORT_FORMATS",
    "StoreInfo",
    "VerifyReport",
    "export_feature_set",
    "merge_stores",
    "remove_feature_set",
    "store_info",
    "verify_store",
]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = (".npz", ".csv")
_HASH = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED_ATTRS = ("modality", "encoder", "width", "config_json")
_SCAN_ROWS = 8192


@dataclass
class StoreInfo:
    """Summary of a store: its feature sets and the journal not yet compacted."""

    path: str
    format_version: int
    feature_sets: list[FeatureSetInfo]
    pending_shards: int
    size_bytes: int


def store_info(store_path: str | Path) -> StoreInfo:
    """Summarise a store without reading vectors.

    Raises
    ------
    StoreError
        The store is missing, not an mmdx store, or of a newer format.
    """
    path = Path(store_path)
    store = FeatureStore(path)
    sets = store.list_sets()
    version = int(fmt.read_root_attrs(path).get("mmdx_format_version", 0)) if path.exists() else fmt.FORMAT_VERSION
    pending = fmt.list_shards(path, after=fmt.applied_through(path))
    size = (path.stat().st_size if path.exists() else 0) + sum(p.stat().st_size for p in pending if p.exists())
    return StoreInfo(str(path), version, sets, len(pending), size)


# verify ---------------------------------------------------------------------


@dataclass
class Fault:
    """One problem found by :func:`verify_store`."""

    where: str  # the file at fault: the main file or a journal shard
    feature_set: str | None
    message: str

    def __str__(self) -> str:
        subject = f"feature set {self.feature_set!r}: " if self.feature_set else ""
        return f"{self.where}: {subject}{self.message}"


@dataclass
class VerifyReport:
    """Result of :func:`verify_store`: the sets and rows checked, faults and notes."""

    path: str
    feature_sets: list[str] = field(default_factory=list)
    n_rows: int = 0
    n_shards: int = 0
    faults: list[Fault] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults


def verify_store(store_path: str | Path) -> VerifyReport:
    """Check every file of a store for faults, reading every row.

    The checks cover the format version and the attributes of each feature
    set, including that its name is the hash of its configuration. They also
    cover dataset shapes and dtypes, equal row counts, NaN or inf vectors,
    repeated keys and the SHA-256 format of item hashes. Journal shards must
    be readable, match the main file's configuration, and follow each other
    without a gap in their sequence. Leftovers of
    killed writers are listed as notes, not faults: the next writer deletes
    them.

    Raises
    ------
    StoreError
        The path is missing or a folder (nothing to verify).
    """
    path = Path(store_path)
    if path.is_dir():
        raise StoreError(f"{path}: is a folder; `mmdx store verify` takes the store's .h5 file")
    if not fmt.list_shards(path) and not path.exists():
        raise StoreError(f"{path}: store not found; check the path")
    # A writer may commit or compact during the check. Checking again until the
    # files stay the same from start to end keeps a deleted shard from being a fault.
    for _attempt in range(_VERIFY_ATTEMPTS):
        before = _snapshot(path)
        report = _verify_once(path)
        if _snapshot(path) == before:
            return report
    report.notes.append("the store kept changing during the check (a writer is running); results may be stale")
    return report


_VERIFY_ATTEMPTS = 5


def _snapshot(path: Path) -> tuple:
    try:
        stat = path.stat()
        main = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    except FileNotFoundError:
        main = None
    return main, tuple(p.name for p in fmt.list_shards(path))


def _verify_once(path: Path) -> VerifyReport:
    report = VerifyReport(str(path))
    configs: dict[str, tuple[dict, int]] = {}
    shards = fmt.list_shards(path)
    folded = _verify_file(path, report, configs, is_shard=False) if path.exists() else 0
    stale = [p for p in shards if fmt.shard_sequence(p) <= folded]
    pending = [p for p in shards if fmt.shard_sequence(p) > folded]
    report.n_shards = len(pending)
    if stale:
        report.notes.append(f"{len(stale)} journal shard(s) already in the main file; the next writer deletes them")
    sequences = [fmt.shard_sequence(p) for p in pending]
    expected = list(range(folded + 1, folded + 1 + len(pending)))
    if sequences != expected:
        missing = sorted(set(range(folded + 1, max(sequences) + 1)) - set(sequences))
        report.faults.append(
            Fault(str(fmt.journal_dir(path)), None, f"journal shard sequence(s) {missing} missing after {folded}")
        )
    for shard in pending:
        _verify_file(shard, report, configs, is_shard=True)
    leftovers = list(path.parent.glob(f"{path.name}.tmp-*")) + list(fmt.journal_dir(path).glob("*.tmp"))
    if leftovers:
        report.notes.append(f"{len(leftovers)} temporary file(s) of a killed writer; the next writer deletes them")
    report.feature_sets = sorted(configs)
    return report


def _verify_file(path: Path, report: VerifyReport, configs: dict, is_shard: bool) -> int:
    """Check one main file or shard; return its ``journal_applied_through`` (0 for shards)."""
    where = str(path)
    try:
        handle = h5py.File(path, "r", locking=False)
    except OSError as exc:
        report.faults.append(Fault(where, None, f"not a readable HDF5 file ({exc})"))
        return 0
    with handle:
        version = handle.attrs.get("mmdx_format_version")
        if version is None:
            report.faults.append(Fault(where, None, "no mmdx_format_version attribute, so not an mmdx store file"))
            return 0
        if int(version) > fmt.FORMAT_VERSION:
            report.faults.append(
                Fault(where, None, f"format version {int(version)} is newer than this mmdx reads ({fmt.FORMAT_VERSION})")
            )
            return 0
        if fmt.ROOT_GROUP not in handle:
            if is_shard:
                report.faults.append(Fault(where, None, f"no {fmt.ROOT_GROUP!r} group"))
            return int(handle.attrs.get(fmt.APPLIED_ATTR, 0))
        for name, group in handle[fmt.ROOT_GROUP].items():
            if not isinstance(group, h5py.Group):
                report.faults.append(Fault(where, name, "is a dataset, not a group"))
                continue
            _verify_group(where, name, group, report, configs)
        return 0 if is_shard else int(handle.attrs.get(fmt.APPLIED_ATTR, 0))


def _verify_group(where: str, name: str, group: h5py.Group, report: VerifyReport, configs: dict) -> None:
    def fault(message: str) -> None:
        report.faults.append(Fault(where, name, message))

    missing = [key for key in _REQUIRED_ATTRS if key not in group.attrs]
    if missing:
        fault(f"missing attribute(s) {', '.join(missing)}")
        return
    try:
        config = json.loads(group.attrs["config_json"])
        json.loads(group.attrs.get("info_json", "{}"))
        width = int(group.attrs["width"])
    except (TypeError, ValueError) as exc:
        fault(f"attribute config_json, info_json or width is invalid ({exc})")
        return
    modality, encoder = str(group.attrs["modality"]), str(group.attrs["encoder"])
    if not isinstance(config, dict):
        fault("attribute config_json is not a JSON object")
        return
    for key, value in (("modality", modality), ("encoder", encoder), ("width", width)):
        if config.get(key) != value:
            fault(f"attribute {key}={value!r} differs from the configuration's {key}={config.get(key)!r}")
    expected_name = set_name_for(modality, encoder, config)
    if name != expected_name:
        fault(f"name does not match its configuration hash (expected {expected_name!r})")
    if name in configs and configs[name] != (config, width):
        fault("configuration differs from the same feature set in the main file or an earlier shard")
    configs.setdefault(name, (config, width))

    if not _verify_datasets(group, width, fault):
        return
    _verify_rows(group, fault)
    report.n_rows += int(group["vectors"].shape[0])


def _verify_datasets(group: h5py.Group, width: int, fault) -> bool:
    ok = True
    for key in ("patient_id", "item", "item_hash", "view", "vectors"):
        if key not in group or not isinstance(group[key], h5py.Dataset):
            fault(f"dataset {key!r} is missing")
            ok = False
    if not ok:
        return False
    for key in ("patient_id", "item", "item_hash"):
        if h5py.check_string_dtype(group[key].dtype) is None or group[key].ndim != 1:
            fault(f"dataset {key!r} is {group[key].dtype} of shape {group[key].shape}, expected 1-D UTF-8 strings")
            ok = False
    if group["view"].dtype != np.int32 or group["view"].ndim != 1:
        fault(f"dataset 'view' is {group['view'].dtype} of shape {group['view'].shape}, expected 1-D int32")
        ok = False
    vectors = group["vectors"]
    if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[1] != width:
        fault(f"dataset 'vectors' is {vectors.dtype} of shape {vectors.shape}, expected float32 of shape (n, {width})")
        ok = False
    counts = {key: group[key].shape[0] for key in ("patient_id", "item", "item_hash", "view", "vectors")}
    if len(set(counts.values())) != 1:
        fault(f"datasets have different row counts {counts}")
        ok = False
    return ok


def _verify_rows(group: h5py.Group, fault) -> None:
    patient_ids, items, hashes, views = fmt._read_keys(group)
    keys = list(zip(patient_ids.tolist(), items.tolist(), views.tolist()))
    if len(set(keys)) != len(keys):
        seen, repeated = set(), []
        for key in keys:
            if key in seen:
                repeated.append(key)
            seen.add(key)
        fault(f"{len(repeated)} repeated (patient ID, item, view) key(s), first {repeated[0]}")
    bad_hashes = [i for i, value in enumerate(hashes.tolist()) if not _HASH.match(value)]
    if bad_hashes:
        fault(f"{len(bad_hashes)} item hash(es) are not 64 lowercase hex digits, first at row {bad_hashes[0]}")
    empty_ids = [i for i, value in enumerate(patient_ids.tolist()) if not value]
    if empty_ids:
        fault(f"{len(empty_ids)} empty patient ID(s), first at row {empty_ids[0]}")
    if len(views) and views.min() < 0:
        fault(f"negative view number at row {int(np.argmin(views))}")
    for start, block in _vector_blocks(group["vectors"]):
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            fault(f"NaN or inf in {int((~finite).sum())} vector(s), first at row {row} (patient {patient_ids[row]!r})")
            break


def _vector_blocks(dataset: h5py.Dataset) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, dataset.shape[0], _SCAN_ROWS):
        yield start, dataset[start : start + _SCAN_ROWS]


# rm -------------------------------------------------------------------------


def remove_feature_set(store_path: str | Path, name: str, wait: float | None = 0.0) -> int:
    """Delete one feature set from a store and return how many rows it had.

    Raises
    ------
    StoreError
        The store or the set does not exist, or another writer holds the lock.
    """
    path = Path(store_path)
    if not fmt.list_shards(path) and not path.exists():
        raise StoreError(f"{path}: store not found; check the path")
    with FeatureStore(path, mode="a", wait=wait) as store:
        sets = {info.name: info for info in store.list_sets()}
        if name not in sets:
            available = ", ".join(sets) or "none"
            raise StoreError(f"{path}: no feature set named {name!r}; available: {available}")
        store.remove_set(name)
    logger.info("%s: removed feature set %s (%d rows)", path, name, sets[name].n_rows)
    return sets[name].n_rows


# export ---------------------------------------------------------------------


def export_feature_set(store_path: str | Path, name: str, out: str | Path) -> int:
    """Write one feature set to ``.npz`` or ``.csv`` and return the number of rows.

    The ``.npz`` file contains ``patient_ids``, ``items``, ``item_hashes`` and
    ``views`` (1-D) and ``vectors`` (float32, rows x width); the ``.csv`` file
    has one row per vector: ``patient_id, item, view, item_hash, v0 ...``.
    The file appears complete or not at all.

    Raises
    ------
    InputError
        ``out`` has another suffix, or its folder does not exist.
    StoreError
        The store or the set cannot be read.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise InputError(f"--out {out}: unknown export format {out.suffix!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist; create it first")
    rows = FeatureStore(store_path).read(name).rows
    temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if suffix == ".npz":
            with open(temporary, "wb") as handle:
                np.savez(
                    handle,
                    patient_ids=np.asarray(rows.patient_ids.tolist(), dtype=str),
                    items=np.asarray(rows.items.tolist(), dtype=str),
                    item_hashes=np.asarray(rows.hashes.tolist(), dtype=str),
                    views=rows.views,
                    vectors=rows.vectors,
                )
                handle.flush()
                os.fsync(handle.fileno())
        else:
            _write_csv(rows, temporary)
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    return len(rows)


def _write_csv(rows: fmt.Rows, path: Path) -> None:
    width = rows.vectors.shape[1]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "item", "view", "item_hash", *(f"v{j}" for j in range(width))])
        for i in range(len(rows)):
            # 9 significant digits read back to the same float32.
            values = [f"{value:.9g}" for value in rows.vectors[i].tolist()]
            writer.writerow([rows.patient_ids[i], rows.items[i], int(rows.views[i]), rows.hashes[i], *values])
        handle.flush()
        os.fsync(handle.fileno())


# merge ----------------------------------------------------------------------


@dataclass
class MergeReport:
    """Rows per feature set of the merged store, and where they came from."""

    out: str
    sources: list[str]
    rows_per_set: dict[str, int]


def merge_stores(out: str | Path, stores: Sequence[str | Path], wait: float | None = 0.0) -> MergeReport:
    """Merge the feature sets of ``stores`` into the store ``out``.

    Sets with the same name have the same configuration, so their rows are
    united. On equal (patient ID, item, view) keys the later source wins:
    ``out``'s own rows first, then ``stores`` in the order given. ``out`` is
    created if absent and is rewritten atomically, so a failure leaves it
    as it was.

    Raises
    ------
    StoreError
        A source cannot be read, a set name matches but its configuration or
        width differs (between sources or with ``out``), or a set name is not
        the hash of its configuration.
    """
    out = Path(out)
    if not stores:
        raise InputError("merge needs at least one source store")
    sources = [Path(s) for s in stores]
    for source in sources:
        FeatureStore(source)  # fails early on a missing or unreadable source
    with FeatureStore(out, mode="a", wait=wait) as target:
        known: dict[str, tuple[dict, int, str]] = {}
        for info in target.list_sets():
            known[info.name] = (info.config, info.width, str(out))
        extra: list[fmt.FeatureSet] = []
        for source in sources:
            if source.resolve() == out.resolve():
                continue
            # NOTE: each source is read whole into memory; fine for stores of a few GB.
            for name, feature_set in fmt.read_store(source).items():
                header = feature_set.header
                _check_mergeable(name, header, source, known)
                known.setdefault(name, (header.config, header.width, str(source)))
                extra.append(feature_set)
        target.add_sets(extra)
        rows = {info.name: info.n_rows for info in target.list_sets()}
    return MergeReport(str(out), [str(s) for s in sources], rows)


def _check_mergeable(name: str, header: fmt.SetHeader, source: Path, known: dict) -> None:
    if name in known:
        config, width, first = known[name]
        if config != header.config or width != header.width:
            differing = sorted(k for k in set(config) | set(header.config) if config.get(k) != header.config.get(k))
            raise StoreError(
                f"{source}: feature set {name!r} has a different configuration than in {first} "
                f"(differs in: {', '.join(differing) or 'width'}); vectors of different configurations "
                "never mix, so nothing was merged"
            )
    expected_name = set_name_for(header.modality, header.encoder, header.config)
    if name != expected_name:
        raise StoreError(
            f"{source}: feature set {name!r} does not match its configuration hash ({expected_name!r}); "
            f"run `mmdx store verify {source}`; nothing was merged"
        )
