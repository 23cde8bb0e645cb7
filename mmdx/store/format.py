"""Read and write the mmdx HDF5 layout; the only module that calls h5py.

The layout is specified in ``docs/store-format.md``. In short, a store is a
main HDF5 file plus a journal folder beside it (``<store>.journal/``). The
main file is never modified in place: writers commit each batch as a new
shard file in the journal (written under a temporary name, fsynced, then
renamed), and a compaction writes a fresh main file from the old one and the
journal, fsyncs it and renames it over the old one. A reader therefore sees
either the old or the new main file, never a half-written one.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np

from mmdx import __version__
from mmdx.errors import StoreError

__all__ = [
    "FORMAT_VERSION",
    "FeatureSet",
    "Rows",
    "SetHeader",
    "journal_dir",
    "list_shards",
    "read_store",
    "rebuild_main",
    "write_shard",
]

FORMAT_VERSION = 1
ROOT_GROUP = "feature_sets"
SHARD_SUFFIX = ".shard.h5"
_SHARD_NAME = re.compile(r"^(\d{12})-[0-9a-f]{8}" + re.escape(SHARD_SUFFIX) + "$")
_STR = h5py.string_dtype(encoding="utf-8")
_ROW_CHUNK = 1024


@dataclass
class SetHeader:
    """Identity and provenance of one feature set.

    ``config`` is the identity: two embed runs with equal configs write to the
    same feature set, any difference makes a new one. ``info`` holds
    provenance that does not change the vectors' meaning (for example counts
    of truncated texts), and is replaced by the latest writer.
    """

    name: str
    modality: str
    encoder: str
    width: int
    config: dict
    info: dict = field(default_factory=dict)
    created: str = ""
    updated: str = ""
    mmdx_version: str = __version__

    def to_attrs(self) -> dict:
        return {
            "modality": self.modality,
            "encoder": self.encoder,
            "width": int(self.width),
            "config_json": canonical_json(self.config),
            "info_json": canonical_json(self.info),
            "created": self.created,
            "updated": self.updated,
            "mmdx_version": self.mmdx_version,
        }

    @classmethod
    def from_attrs(cls, name: str, attrs, where: str) -> "SetHeader":
        try:
            return cls(
                name=name,
                modality=str(attrs["modality"]),
                encoder=str(attrs["encoder"]),
                width=int(attrs["width"]),
                config=json.loads(attrs["config_json"]),
                info=json.loads(attrs.get("info_json", "{}")),
                created=str(attrs.get("created", "")),
                updated=str(attrs.get("updated", "")),
                mmdx_version=str(attrs.get("mmdx_version", "")),
            )
        except (KeyError, ValueError) as exc:
            raise StoreError(
                f"{where}: feature set {name!r} has missing or invalid attributes ({exc}); "
                "run `mmdx store verify` on it"
            ) from exc


@dataclass
class Rows:
    """Rows of one feature set: one vector per (patient ID, item, view)."""

    patient_ids: np.ndarray  # object array of str
    items: np.ndarray  # object array of str: image path or text row
    hashes: np.ndarray  # object array of str: SHA-256 of the item's content
    views: np.ndarray  # int32: 0 for the plain item, k >= 1 for augmented view k
    vectors: np.ndarray  # float32, (n, width)

    def __len__(self) -> int:
        return len(self.patient_ids)

    @classmethod
    def empty(cls, width: int) -> "Rows":
        return cls(
            np.empty(0, dtype=object),
            np.empty(0, dtype=object),
            np.empty(0, dtype=object),
            np.empty(0, dtype=np.int32),
            np.empty((0, width), dtype=np.float32),
        )

    def keys(self) -> list[tuple[str, str, int]]:
        return list(zip(self.patient_ids.tolist(), self.items.tolist(), self.views.tolist()))


@dataclass
class FeatureSet:
    """A feature set as read: its header and its rows (journal applied)."""

    header: SetHeader
    rows: Rows

    @property
    def name(self) -> str:
        return self.header.name


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def journal_dir(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".journal")


def list_shards(store_path: Path) -> list[Path]:
    """Return the committed journal shards in commit order (temporary files excluded)."""
    folder = journal_dir(store_path)
    if not folder.is_dir():
        return []
    shards = [p for p in folder.iterdir() if _SHARD_NAME.match(p.name)]
    return sorted(shards, key=lambda p: p.name)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_h5(path: Path, mode: str = "r") -> h5py.File:
    try:
        return h5py.File(path, mode, locking=False)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StoreError(
            f"{path}: not a readable HDF5 file ({exc}); "
            "check the path, or restore the store from a copy"
        ) from exc


def _check_version(handle: h5py.File, path: Path) -> None:
    version = handle.attrs.get("mmdx_format_version")
    if version is None:
        raise StoreError(
            f"{path}: HDF5 file without an mmdx_format_version attribute, so not an mmdx store; "
            "choose another --store path"
        )
    if int(version) > FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {int(version)} is newer than this mmdx "
            f"({__version__}) reads (up to {FORMAT_VERSION}); upgrade mmdx"
        )


def _create_row_datasets(group: h5py.Group, width: int) -> None:
    chunk_rows = max(1, min(_ROW_CHUNK, (1 << 20) // max(4 * width, 1)))
    for key in ("patient_id", "item", "item_hash"):
        group.create_dataset(key, shape=(0,), maxshape=(None,), dtype=_STR, chunks=(_ROW_CHUNK,))
    group.create_dataset("view", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(_ROW_CHUNK,))
    group.create_dataset(
        "vectors",
        shape=(0, width),
        maxshape=(None, width),
        dtype=np.float32,
        chunks=(chunk_rows, width),
    )


def _append_rows(group: h5py.Group, rows: Rows) -> None:
    n_old = group["patient_id"].shape[0]
    n_new = n_old + len(rows)
    for key, values in (
        ("patient_id", rows.patient_ids),
        ("item", rows.items),
        ("item_hash", rows.hashes),
        ("view", rows.views),
    ):
        group[key].resize((n_new,))
        group[key][n_old:n_new] = values
    group["vectors"].resize((n_new, group["vectors"].shape[1]))
    group["vectors"][n_old:n_new] = rows.vectors


def _read_keys(group: h5py.Group) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    patient_ids = np.asarray(group["patient_id"].asstr()[()], dtype=object)
    items = np.asarray(group["item"].asstr()[()], dtype=object)
    hashes = np.asarray(group["item_hash"].asstr()[()], dtype=object)
    views = np.asarray(group["view"][()], dtype=np.int32)
    return patient_ids, items, hashes, views


def _read_rows(group: h5py.Group, with_vectors: bool) -> Rows:
    patient_ids, items, hashes, views = _read_keys(group)
    width = int(group["vectors"].shape[1])
    if with_vectors:
        vectors = np.asarray(group["vectors"][()], dtype=np.float32)
    else:
        vectors = np.empty((len(patient_ids), 0), dtype=np.float32)
    if vectors.shape[0] != len(patient_ids) or not (
        len(items) == len(hashes) == len(views) == len(patient_ids)
    ):
        raise StoreError(
            f"feature set {group.name}: datasets have different row counts; "
            "run `mmdx store verify` on the store"
        )
    del width
    return Rows(patient_ids, items, hashes, views, vectors)


def write_shard(store_path: Path, header: SetHeader, rows: Rows) -> Path:
    """Commit one batch of rows as a new journal shard, atomically.

    The shard is written under a temporary name, flushed and fsynced, then
    renamed into place and the folder fsynced: after this returns the rows
    survive a crash, and before it they are absent, never half there.
    """
    folder = journal_dir(store_path)
    folder.mkdir(exist_ok=True)
    existing = list_shards(store_path)
    sequence = int(existing[-1].name[:12]) + 1 if existing else 1
    final = folder / f"{sequence:012d}-{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"
    temporary = final.with_name(final.name + ".tmp")
    with h5py.File(temporary, "w", locking=False) as handle:
        handle.attrs["mmdx_format_version"] = FORMAT_VERSION
        handle.attrs["set_name"] = header.name
        group = handle.create_group(f"{ROOT_GROUP}/{header.name}")
        for key, value in header.to_attrs().items():
            group.attrs[key] = value
        _create_row_datasets(group, header.width)
        _append_rows(group, rows)
    _fsync_file(temporary)
    os.replace(temporary, final)
    _fsync_dir(folder)
    return final


def _iter_shard_sets(shard: Path) -> Iterator[tuple[SetHeader, h5py.Group]]:
    with _open_h5(shard) as handle:
        _check_version(handle, shard)
        for name, group in handle[ROOT_GROUP].items():
            yield SetHeader.from_attrs(name, group.attrs, str(shard)), group


class _SetBuilder:
    """Apply rows to a feature set in memory, the latest row per key winning."""

    def __init__(self, header: SetHeader, rows: Rows):
        self.header = header
        self.rows = rows
        self.index = {key: i for i, key in enumerate(rows.keys())}

    def apply(self, header: SetHeader, rows: Rows, where: str) -> None:
        if header.width != self.header.width or header.config != self.header.config:
            raise StoreError(
                f"{where}: rows for feature set {header.name!r} have a different configuration "
                "than the set; run `mmdx store verify`"
            )
        self.header.info = header.info or self.header.info
        self.header.updated = max(self.header.updated, header.updated)
        replace_at, replace_from, append_from = [], [], []
        for i, key in enumerate(rows.keys()):
            j = self.index.get(key)
            if j is None:
                self.index[key] = len(self.index)
                append_from.append(i)
            else:
                replace_at.append(j)
                replace_from.append(i)
        if replace_at:
            at, src = np.asarray(replace_at), np.asarray(replace_from)
            self.rows.hashes[at] = rows.hashes[src]
            if self.rows.vectors.shape[1] == rows.vectors.shape[1]:
                self.rows.vectors[at] = rows.vectors[src]
        if append_from:
            src = np.asarray(append_from)
            self.rows = Rows(
                np.concatenate([self.rows.patient_ids, rows.patient_ids[src]]),
                np.concatenate([self.rows.items, rows.items[src]]),
                np.concatenate([self.rows.hashes, rows.hashes[src]]),
                np.concatenate([self.rows.views, rows.views[src]]),
                np.concatenate([self.rows.vectors, rows.vectors[src]]),
            )


def read_store(
    store_path: Path, names: Iterable[str] | None = None, with_vectors: bool = True
) -> dict[str, FeatureSet]:
    """Read feature sets from the main file with the journal applied.

    ``names`` limits the sets read (all by default); ``with_vectors=False``
    reads keys and hashes only, for listings. A compaction running at the same
    time can delete shards under us; the read then starts again.
    """
    wanted = None if names is None else set(names)
    for _attempt in range(20):
        shards = list_shards(store_path)
        try:
            return _read_store_once(store_path, shards, wanted, with_vectors)
        except FileNotFoundError:
            if not store_path.exists() and not list_shards(store_path):
                raise StoreError(
                    f"{store_path}: store not found; check the --store path, "
                    "or run `mmdx embed` to create it"
                ) from None
            time.sleep(0.05)
    raise StoreError(f"{store_path}: the journal kept changing while reading; try again")


def _read_store_once(store_path, shards, wanted, with_vectors) -> dict[str, FeatureSet]:
    builders: dict[str, _SetBuilder] = {}
    if store_path.exists():
        with _open_h5(store_path) as handle:
            _check_version(handle, store_path)
            for name, group in handle.get(ROOT_GROUP, {}).items():
                if wanted is not None and name not in wanted:
                    continue
                header = SetHeader.from_attrs(name, group.attrs, str(store_path))
                builders[name] = _SetBuilder(header, _read_rows(group, with_vectors))
    elif not shards:
        raise FileNotFoundError(store_path)
    for shard in shards:
        for header, group in _iter_shard_sets(shard):
            if wanted is not None and header.name not in wanted:
                continue
            rows = _read_rows(group, with_vectors)
            if header.name in builders:
                builders[header.name].apply(header, rows, str(shard))
            else:
                builders[header.name] = _SetBuilder(header, rows)
    return {name: FeatureSet(b.header, b.rows) for name, b in sorted(builders.items())}


def read_root_attrs(store_path: Path) -> dict:
    with _open_h5(store_path) as handle:
        _check_version(handle, store_path)
        return {key: handle.attrs[key] for key in handle.attrs}


def check_readable(store_path: Path) -> None:
    """Raise ``StoreError`` unless ``store_path`` is absent or an mmdx store this version reads."""
    if not store_path.exists():
        return
    if store_path.is_dir():
        raise StoreError(f"{store_path}: is a folder; --store takes an .h5 file path")
    with _open_h5(store_path) as handle:
        _check_version(handle, store_path)


def rebuild_main(store_path: Path, drop: Iterable[str] = (), extra: Iterable[FeatureSet] = ()) -> None:
    """Write a fresh main file from the current one plus the journal, then swap it in.

    ``drop`` names feature sets to leave out; ``extra`` adds whole feature sets
    (as a merge does). The caller holds the writer lock. Sets are copied group
    by group, so memory stays bounded by one set's journal rows. The journal
    shards are deleted only after the new main file is in place; applying a
    shard twice gives the same result, so a kill between the two steps is safe.
    """
    drop = set(drop)
    shards = list_shards(store_path)
    temporary = store_path.with_name(f"{store_path.name}.tmp-{os.getpid()}")
    with h5py.File(temporary, "w", locking=False) as out:
        out.attrs["mmdx_format_version"] = FORMAT_VERSION
        out.attrs["mmdx_version"] = __version__
        root = out.create_group(ROOT_GROUP)
        if store_path.exists():
            with _open_h5(store_path) as handle:
                _check_version(handle, store_path)
                for name, group in handle.get(ROOT_GROUP, {}).items():
                    if name not in drop:
                        handle.copy(group, root, name=name)
        for shard in shards:
            for header, group in _iter_shard_sets(shard):
                if header.name in drop:
                    continue
                _merge_group(root, header, _read_rows(group, True), str(shard))
        for feature_set in extra:
            _merge_group(root, feature_set.header, feature_set.rows, "merge")
    _fsync_file(temporary)
    os.replace(temporary, store_path)
    _fsync_dir(store_path.parent)
    for shard in shards:
        shard.unlink(missing_ok=True)


def _merge_group(root: h5py.Group, header: SetHeader, rows: Rows, where: str) -> None:
    if header.name not in root:
        group = root.create_group(header.name)
        for key, value in header.to_attrs().items():
            group.attrs[key] = value
        _create_row_datasets(group, header.width)
        _append_rows(group, rows)
        return
    group = root[header.name]
    current = SetHeader.from_attrs(header.name, group.attrs, where)
    if current.width != header.width or current.config != header.config:
        raise StoreError(
            f"{where}: feature set {header.name!r} exists with a different configuration; "
            "vectors of different configurations never mix"
        )
    patient_ids, items, _hashes, views = _read_keys(group)
    index = {key: i for i, key in enumerate(zip(patient_ids.tolist(), items.tolist(), views.tolist()))}
    append_from = []
    for i, key in enumerate(rows.keys()):
        j = index.get(key)
        if j is None:
            append_from.append(i)
        else:
            # NOTE: one HDF5 write per replaced row; replacements are rare (changed items).
            group["item_hash"][j] = rows.hashes[i]
            group["vectors"][j] = rows.vectors[i]
    if append_from:
        src = np.asarray(append_from)
        _append_rows(
            group,
            Rows(rows.patient_ids[src], rows.items[src], rows.hashes[src], rows.views[src], rows.vectors[src]),
        )
    group.attrs["updated"] = max(str(group.attrs.get("updated", "")), header.updated)
    if header.info:
        group.attrs["info_json"] = canonical_json(header.info)


def remove_stale_temporaries(store_path: Path) -> list[Path]:
    """Delete temporary files a killed writer left behind; the caller holds the writer lock."""
    removed = []
    for path in store_path.parent.glob(f"{store_path.name}.tmp-*"):
        path.unlink(missing_ok=True)
        removed.append(path)
    folder = journal_dir(store_path)
    if folder.is_dir():
        for path in folder.glob(f"*{SHARD_SUFFIX}.tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
