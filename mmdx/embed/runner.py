"""The loop shared by every embed command: skip stored items, encode, commit per batch.

An item is stored under the key (patient ID, item, view) with the SHA-256
of its content. Items whose key is stored with the same hash are skipped, so
re-running a command embeds only new or changed items. Each batch is
committed on its own, so a killed run keeps every finished batch, and the
re-run plans its batches over the remaining items in the same order, which
reproduces the batches of an uninterrupted run.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from mmdx.errors import InputError
from mmdx.store import FeatureStore, SetHeader

__all__ = ["EmbedReport", "Item", "ItemFailure", "embed_items", "sha256_bytes", "sha256_text", "fixed_size_batches"]

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("fail", "skip")
_CHANGED_SHOWN = 5  # patient IDs named in the warning about changed items
_OTHERS_SHOWN = 5  # other failed items of a batch named in the --on-error fail message


@dataclass(slots=True)
class Item:
    """One thing to embed: an image file (or one slice or view of it) or one text row."""

    patient_id: str
    name: str  # image path as given, or "row N" of a text source
    content_hash: str
    view: int = 0
    payload: Any = None  # what the encoder needs: a path, a text, a slice index

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.patient_id, self.name, self.view)


@dataclass
class ItemFailure:
    """An item that could not be embedded, with the reason in the user's words.

    ``skipped`` names a deliberate skip such as ``"empty text"``: the item
    has nothing to embed, so the summary counts it apart from failures. It
    still goes to the rejects CSV.
    """

    item: Item
    reason: str
    skipped: str | None = None


@dataclass
class EmbedReport:
    """Counts and failures of one embed run, for the CLI summary and for tests."""

    store: str
    feature_set: str
    width: int
    n_items: int = 0
    n_already_stored: int = 0
    n_embedded: int = 0
    n_changed: int = 0  # embedded items that replaced a stored vector of different content
    failures: list[ItemFailure] = field(default_factory=list)
    rejects_path: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        """Items that could not be embedded, deliberate skips excluded."""
        return sum(1 for failure in self.failures if failure.skipped is None)

    @property
    def n_skipped(self) -> dict[str, int]:
        """Deliberately skipped items by kind, for example ``{"empty text": 1}``."""
        counts: dict[str, int] = {}
        for failure in self.failures:
            if failure.skipped is not None:
                counts[failure.skipped] = counts.get(failure.skipped, 0) + 1
        return counts

    def summary(self) -> str:
        text = f"{self.feature_set}: {self.n_items} items, {self.n_embedded} embedded"
        if self.n_changed:
            text += f" ({self.n_changed} of them replace a changed stored item)"
        text += f", {self.n_already_stored} already stored"
        for kind, count in self.n_skipped.items():
            text += f", {count} skipped ({kind})"
        text += f", {self.n_failed} failed (width {self.width}, store {self.store})"
        for key, value in self.extra.items():
            text += f"; {key.replace('_', ' ')}: {value}"
        if self.rejects_path:
            text += f"; rejected items listed in {self.rejects_path}"
        return text


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fixed_size_batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


EncodeFn = Callable[[list[list[Item]]], Iterator[tuple[list[Item], np.ndarray, list[ItemFailure]]]]


def embed_items(
    store: FeatureStore,
    header: SetHeader,
    items: list[Item],
    plan: Callable[[list[Item]], list[list[Item]]],
    encode: EncodeFn,
    *,
    on_error: str = "fail",
    rejects_path: str | Path | None = None,
    progress_label: str = "embedding",
    quiet: bool = False,
    known_failures: Iterable[ItemFailure] = (),
    changed_hint: str = "check that the source is the one you meant",
) -> EmbedReport:
    """Embed the items not yet stored and commit them batch by batch.

    ``plan`` groups the remaining items into batches. ``encode`` takes those
    batches and yields, per batch, the items it embedded, their vectors (one
    row each, same order) and the items it could not embed; it may prefetch.
    With ``on_error="fail"`` the first failure raises ``InputError`` after the
    batches before it are committed; with ``"skip"`` failures are counted,
    logged and written to ``rejects_path`` (CSV), and the run goes on.

    ``known_failures`` are items the caller already found unusable (a
    missing file, an empty text); they count in ``n_items``, are logged and
    go to the rejects CSV like the failures of ``encode``. Items whose key is
    stored with a different hash are embedded again and replace the stored
    vector; their number is logged as a warning that ends with
    ``changed_hint``, since a wrong option can change many texts at once.
    """
    from tqdm.auto import tqdm

    if on_error not in ON_ERROR_CHOICES:
        raise InputError(f"--on-error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        seen, repeated = set(), None
        for key in keys:
            if key in seen:
                repeated = key
                break
            seen.add(key)
        raise InputError(f"patient {repeated[0]!r}: item {repeated[1]!r} appears twice in the input; remove the duplicate")

    known_failures = list(known_failures)
    report = EmbedReport(
        store=str(store.path), feature_set=header.name, width=header.width, n_items=len(items) + len(known_failures)
    )
    for failure in known_failures:
        logger.warning("skipped patient %r, %s: %s", failure.item.patient_id, failure.item.name, failure.reason)
    report.failures.extend(known_failures)
    stored = store.item_hashes(header.name)
    todo = [item for item in items if stored.get(item.key) != item.content_hash]
    report.n_already_stored = len(items) - len(todo)
    if report.n_already_stored:
        logger.info("%s: %d of %d items already stored, skipped", header.name, report.n_already_stored, len(items))
    changed = [item for item in todo if item.key in stored]
    if changed:
        first_patients = ", ".join(sorted({item.patient_id for item in changed})[:_CHANGED_SHOWN])
        logger.warning(
            "%s: %d stored items changed and are embedded again, replacing their vectors (patients %s%s); "
            "if that is not expected, %s",
            header.name, len(changed), first_patients, ", ..." if len(changed) > _CHANGED_SHOWN else "", changed_hint,
        )

    with tqdm(total=len(todo), desc=progress_label, unit="item", disable=quiet or not todo) as bar:
        for done, vectors, failures in encode(plan(todo)):
            for failure in failures:
                if on_error == "fail" and failure.skipped is None:
                    others = [other for other in failures if other.skipped is None and other is not failure]
                    others_note = ""
                    if others:
                        named = "; ".join(
                            f"patient {other.item.patient_id!r}, {other.item.name}: {other.reason}"
                            for other in others[:_OTHERS_SHOWN]
                        )
                        more = f" and {len(others) - _OTHERS_SHOWN} more" if len(others) > _OTHERS_SHOWN else ""
                        others_note = f"Other failures in this batch: {named}{more}. "
                    raise InputError(
                        f"patient {failure.item.patient_id!r}, {failure.item.name}: {failure.reason}. "
                        f"{others_note}Nothing from this batch was stored. Fix or remove the item, or pass "
                        "--on-error skip to list every failure in the rejects CSV"
                    )
                logger.warning("skipped patient %r, %s: %s", failure.item.patient_id, failure.item.name, failure.reason)
            report.failures.extend(failures)
            if done:
                store.commit(
                    header,
                    [item.patient_id for item in done],
                    [item.name for item in done],
                    [item.content_hash for item in done],
                    vectors,
                    [item.view for item in done],
                )
                report.n_embedded += len(done)
                report.n_changed += sum(1 for item in done if item.key in stored)
            bar.update(len(done) + len(failures))

    if rejects_path is not None:
        if report.failures:
            report.rejects_path = str(write_rejects(report.failures, Path(rejects_path), header.name))
        else:
            _remove_stale_rejects(Path(rejects_path), header.name)
    return report


def _remove_stale_rejects(path: Path, feature_set: str) -> None:
    """Delete the rejects CSV of an earlier run of the same feature set, since this run rejected nothing.

    Only a file in the format :func:`write_rejects` writes, whose rows all
    name ``feature_set``, is deleted. A rejects file of another feature set
    of the same store, or a ``--rejects`` path that names some other file, is
    left alone.
    """
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            sets = {row[-1] for row in reader if row}
    except (FileNotFoundError, IsADirectoryError):
        return
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        logger.warning("%s: could not read the rejects file of an earlier run (%s); it may be out of date", path, exc)
        return
    if header is None or tuple(header) != REJECTS_HEADER or sets - {feature_set}:
        return
    try:
        path.unlink()
    except OSError as exc:
        logger.warning("%s: could not remove the rejects file of an earlier run (%s); it is out of date", path, exc)
        return
    logger.info("%s: removed the rejects file of an earlier run, since this run rejected nothing", path)


REJECTS_HEADER = ("patient_id", "item", "view", "reason", "feature_set")


def write_rejects(failures: Iterable[ItemFailure], path: Path, feature_set: str) -> Path:
    """Write rejected items and their reasons as CSV (patient_id, item, view, reason, feature_set)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(REJECTS_HEADER)
        for failure in failures:
            writer.writerow([failure.item.patient_id, failure.item.name, failure.item.view, failure.reason, feature_set])
    return path
