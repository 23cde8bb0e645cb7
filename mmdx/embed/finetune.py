"""Fine-tune a BERT-family text encoder on a binary label, once or once per fold.

Fine-tuning an encoder on every labelled patient and then cross-validating a
head on its vectors lets the encoder see the test patients' labels, which
inflates the metrics. The per-fold mode avoids that: for each fold of
:func:`mmdx.train.folds.patient_folds` (the folds train-head uses with the
same labels, fold count and seed) it fine-tunes one encoder on that fold's
training patients only, saves it under ``OUT/fold-<k>/`` and embeds every
patient with it into its own feature set.

Each saved folder is a Hugging Face model folder (encoder and tokenizer)
with an ``mmdx_training.json`` record, which ``embed texts`` copies into the
feature set config as ``config["encoder_training"]``. The record's keys
``group``, ``fold``, ``n_folds``, ``seed`` and ``patients`` (sorted training
patient IDs) are what train-head's leak check reads. A folder whose record
matches the requested training (same training texts and labels, base model
identity, hyperparameters and fold) is reused without training again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from mmdx.atomic import atomic_dir, check_output_dir
from mmdx.embed.runner import EmbedReport
from mmdx.embed.text_sources import JOIN_RULE, read_text_source
from mmdx.embed.texts import (
    DEFAULT_TEXT_MODEL,
    TRAINING_RECORD,
    TextEncoder,
    check_text_options,
    embed_texts,
    load_text_encoder,
    pool_hidden,
    resolve_max_length,
    set_torch_threads,
    transformers_progress,
)
from mmdx.errors import InputError

__all__ = ["DEFAULT_FINETUNE_MAX_LENGTH", "DEFAULT_TRAINABLE_LAYERS", "FinetuneReport", "FoldResult", "finetune_text"]

logger = logging.getLogger(__name__)

# Defaults sized for CPU training. A step costs about the forward pass over
# every layer plus the backward pass over the trained layers, and grows with
# the padded length. With 256 tokens (41 of the 267 non-empty MedPix reports,
# median 124 tokens, are longer) and the top 2 of MiniLM's 6 layers trained,
# a 5-fold run on MedPix used 12 CPU minutes, about 6 minutes of wall time on
# 2 idle cores (an estimate: it was measured on a busy machine). Training
# every layer measured about 1.9 times the CPU time per step.
DEFAULT_FINETUNE_MAX_LENGTH = 256
DEFAULT_TRAINABLE_LAYERS = 2
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.1
MAX_GRAD_NORM = 1.0
BUCKET_BATCHES = 8  # batches per length-sorted chunk in bucketed_batches
RECORD_FORMAT = 1
_OUTCOME = "outcome"


@dataclass
class FoldResult:
    """One fine-tuned encoder: where it is, whom it saw, and whether it was reused."""

    fold: int | None
    folder: Path
    n_train: int
    reused: bool
    seconds: float
    final_loss: float | None
    embed: EmbedReport | None = None


@dataclass
class FinetuneReport:
    """Outcome of a finetune-text run, for the CLI summary and for tests."""

    out: Path
    group: str | None
    folds: list[FoldResult] = field(default_factory=list)

    def summary(self) -> str:
        lines = []
        for result in self.folds:
            where = "all labelled patients" if result.fold is None else f"fold {result.fold}"
            action = "reused" if result.reused else f"fine-tuned in {result.seconds:.0f} s (final loss {result.final_loss:.4f})"
            line = f"{where}: {result.n_train} training patients, {action} -> {result.folder}"
            if result.embed is not None:
                line += f"; {result.embed.summary()}"
            lines.append(line)
        if self.group:
            lines.append(f"per-fold group {self.group}")
        return "\n".join(lines)


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _training_record(
    base: TextEncoder,
    texts: dict[str, str],
    labels: dict[str, int],
    patients: list[str],
    hyperparameters: dict,
    fold: int | None,
    n_folds: int | None,
    seed: int,
    group: str | None,
    text_columns: list[str],
) -> dict:
    """Build ``mmdx_training.json`` without its outcome: everything that decides the trained weights."""
    import torch
    import transformers

    data = [[patient, texts[patient], labels[patient]] for patient in patients]
    return {
        "format": RECORD_FORMAT,
        "group": group,
        "fold": fold,
        "n_folds": n_folds,
        "seed": seed,
        "patients": patients,
        "n_positive": int(sum(labels[patient] for patient in patients)),
        "training_data_sha256": _sha256_json(data),
        "text_columns": text_columns,
        "join": JOIN_RULE,
        "base_model": {"name": base.name, "identity": base.identity},
        "hyperparameters": hyperparameters,
        "libraries": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def _reusable(folder: Path, record: dict) -> bool:
    path = folder / TRAINING_RECORD
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    saved.pop(_OUTCOME, None)
    return saved == record


def bucketed_batches(lengths: list[int], batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle texts into batches of similar length, so that a batch pads little.

    The texts are shuffled, cut into chunks of ``BUCKET_BATCHES`` batches,
    sorted by length within each chunk and cut into batches, and the batch
    order is shuffled again. The result depends only on ``lengths`` and the
    generator state.
    """
    order = rng.permutation(len(lengths))
    chunk = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk].tolist(), key=lambda i: lengths[i])
        batches.extend(np.asarray(part[i : i + batch_size]) for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def _freeze_lower_layers(model, trainable_layers: int | None) -> None:
    """Freeze the embeddings and all but the top ``trainable_layers`` encoder layers (None trains all)."""
    if trainable_layers is None:
        return
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if layers is None or not hasattr(model, "embeddings"):
        raise InputError(
            f"--trainable-layers needs a BERT-style model (embeddings and encoder.layer), got {type(model).__name__}; "
            "leave --trainable-layers out to train every layer"
        )
    if trainable_layers > len(layers):
        raise InputError(f"--trainable-layers {trainable_layers} exceeds the model's {len(layers)} layers")
    for parameter in model.embeddings.parameters():
        parameter.requires_grad = False
    for layer in list(layers)[: len(layers) - trainable_layers]:
        for parameter in layer.parameters():
            parameter.requires_grad = False


def _train_encoder(
    encoder: TextEncoder,
    texts: list[str],
    targets: list[int],
    hyperparameters: dict,
    progress,
) -> float:
    """Fine-tune ``encoder.model`` in place with a linear classifier; return the last epoch's mean loss."""
    import torch

    seed = hyperparameters["seed"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = encoder.model
    _freeze_lower_layers(model, hyperparameters["trainable_layers"])
    classifier = torch.nn.Linear(encoder.width, 1)
    parameters = [p for p in model.parameters() if p.requires_grad] + list(classifier.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=hyperparameters["learning_rate"], weight_decay=WEIGHT_DECAY)

    batch_size = hyperparameters["batch_size"]
    steps_per_epoch = -(-len(texts) // batch_size)
    total_steps = steps_per_epoch * hyperparameters["epochs"]
    warmup = max(1, int(WARMUP_FRACTION * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup)))
    )
    y = torch.tensor(targets, dtype=torch.float32)
    n_positive = float(y.sum())
    # Weigh positives by the class ratio so that the minority class counts as much as the majority.
    pos_weight = torch.tensor((len(targets) - n_positive) / max(n_positive, 1.0))
    loss_function = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    encoded = encoder.tokenizer(texts, truncation=True, max_length=hyperparameters["max_length"])
    features = [{key: encoded[key][i] for key in encoded.keys()} for i in range(len(texts))]
    lengths = [len(feature["input_ids"]) for feature in features]

    model.train()
    epoch_loss = float("nan")
    for _ in range(hyperparameters["epochs"]):
        losses = []
        for batch in bucketed_batches(lengths, batch_size, rng):
            inputs = encoder.tokenizer.pad([features[i] for i in batch], return_tensors="pt")
            hidden = model(**inputs).last_hidden_state
            logits = classifier(pool_hidden(hidden, inputs["attention_mask"], hyperparameters["pooling"])).squeeze(-1)
            loss = loss_function(logits, y[torch.as_tensor(batch)])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            progress.update(len(batch))
        epoch_loss = float(np.mean(losses))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad = True
    return epoch_loss


def _save_encoder(encoder: TextEncoder, folder: Path, record: dict, protect: list[Path]) -> None:
    with atomic_dir(folder, protect=protect) as staging:
        encoder.model.save_pretrained(str(staging))
        encoder.tokenizer.save_pretrained(str(staging))
        (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _group_id(base: TextEncoder, texts: dict[str, str], labels: dict[str, int], hyperparameters: dict, n_folds: int) -> str:
    """Name a per-fold run by everything that decides its encoders, so a re-run gets the same group."""
    patients = sorted(set(texts) & set(labels))
    identity = {
        "data": _sha256_json([[patient, texts[patient], labels[patient]] for patient in patients]),
        "labels": _sha256_json(sorted(labels.items())),
        "base": base.identity,
        "hyperparameters": hyperparameters,
        "n_folds": n_folds,
    }
    return f"finetune-{base.name}-{_sha256_json(identity)[:10]}"


def _check_trainable(patients: list[str], labels: dict[str, int], where: str) -> None:
    n_positive = sum(labels[patient] for patient in patients)
    if n_positive == 0 or n_positive == len(patients):
        raise InputError(
            f"{where}: the {len(patients)} training patients all have label {int(n_positive > 0)}; "
            "fine-tuning needs both classes, so check --labels, --label-column and --positive"
        )


def _duplicate_image_groups(store: str | Path | None, label_map: dict) -> list[list[str]]:
    """Return the duplicate-image groups train-head would use for these patients, or none without images."""
    if store is None or not Path(store).is_file():
        return []
    from mmdx.train.data import store_duplicate_groups

    groups = store_duplicate_groups(store, list(label_map))
    if groups:
        logger.info(
            "%d group(s) of patients share identical images in %s; each group stays in one fold", len(groups), store
        )
    return groups


def finetune_text(
    source: str | Path,
    *,
    labels: str | Path,
    label_column: str,
    out: str | Path,
    text_columns: Sequence[str],
    positive: str | None = None,
    negative: Sequence[str] | None = None,
    id_column: str = "patient_id",
    labels_id_column: str | None = None,
    model: str = DEFAULT_TEXT_MODEL,
    epochs: int = 3,
    learning_rate: float = 2e-5,
    batch_size: int = 16,
    max_length: int | None = DEFAULT_FINETUNE_MAX_LENGTH,
    seed: int = 0,
    pooling: str = "cls",
    trainable_layers: int | None = DEFAULT_TRAINABLE_LAYERS,
    per_fold: bool = False,
    n_folds: int = 5,
    store: str | Path | None = None,
    embed_batch_size: int = 32,
    source_format: str | None = None,
    encoding: str = "utf-8",
    duplicates: str = "error",
    wait: float = 0.0,
    quiet: bool = False,
) -> FinetuneReport:
    """Fine-tune a text encoder for a binary label and save it as a model folder.

    Parameters
    ----------
    source
        Text source, read as by ``embed texts`` (one text per patient;
        ``duplicates="keep-all"`` is rejected because a patient needs one text).
    labels, label_column, positive, negative, labels_id_column
        Labels CSV read by :func:`mmdx.train.labels.load_labels`; its ID
        column defaults to ``id_column``.
    out
        Output folder: the model folder itself, or with ``per_fold`` the
        parent of ``fold-<k>/`` folders.
    text_columns, id_column, source_format, encoding, duplicates
        How the text source is read.
    model
        Base encoder: a local folder or a hub name.
    epochs, learning_rate, batch_size, max_length, seed, pooling
        Training settings. AdamW with weight decay 0.01, linear warm-up over
        the first 10% of steps and linear decay, gradient norm clipped at 1,
        binary cross-entropy with positives weighted by the class ratio.
        ``max_length`` (default 256) is used for training and for embedding.
        Batches group texts of similar length (see :func:`bucketed_batches`).
    trainable_layers
        Train only the top this many encoder layers (and the classifier),
        keeping the embeddings and lower layers frozen, which makes a step
        cheaper (default 2); ``None`` trains every layer.
    per_fold, n_folds
        Train one encoder per fold of ``patient_folds(labels, n_folds, seed)``
        on that fold's training patients only.
    store
        When given, embed every patient of ``source`` with each trained
        encoder into this store (one feature set per encoder). With
        ``per_fold``, patients whose stored images are byte-identical stay
        in one fold, as in ``train-head --duplicates group``, so embed the
        images before fine-tuning.
    embed_batch_size, wait, quiet
        Embedding batch size, seconds to wait for the store lock, and
        whether to hide progress bars (transformers' own included).

    Returns
    -------
    FinetuneReport
        One :class:`FoldResult` per trained or reused encoder.
    """
    from tqdm.auto import tqdm

    from mmdx.train.folds import patient_folds
    from mmdx.train.labels import load_labels

    check_text_options(pooling, batch_size, max_length)
    if duplicates == "keep-all":
        raise InputError("--duplicates keep-all is not supported by finetune-text: fine-tuning needs one text per patient")
    for option, value, minimum in (("--epochs", epochs, 1), ("--embed-batch-size", embed_batch_size, 1)):
        if value < minimum:
            raise InputError(f"{option} must be at least {minimum}, got {value}")
    if trainable_layers is not None and trainable_layers < 1:
        raise InputError(f"--trainable-layers must be at least 1, got {trainable_layers}")
    if not learning_rate > 0:
        raise InputError(f"--learning-rate must be positive, got {learning_rate}")
    if store is not None and not Path(store).parent.is_dir():
        raise InputError(f"--store {str(store)!r}: folder {Path(store).parent} does not exist; create it first")

    source_texts = read_text_source(source, id_column, text_columns, source_format=source_format, encoding=encoding)
    texts = {entry.patient_id: entry.text for entry in source_texts.texts if entry.text}
    label_table = load_labels(labels, labels_id_column or id_column, label_column, positive, negative)
    label_map = dict(label_table)
    usable = sorted(set(texts) & set(label_map))
    if not usable:
        raise InputError(
            f"{labels}: no labelled patient has a text in {source}; check that --id-column names the same IDs in both"
        )
    logger.info("%d labelled patients with text (%d labelled, %d with text)", len(usable), len(label_map), len(texts))
    if per_fold:
        image_groups = _duplicate_image_groups(store, label_map)
        folds = patient_folds(label_map, n_folds, seed, image_groups)
        splits = [(k, train) for k, (train, _) in enumerate(folds)]
    else:
        splits = [(None, list(usable))]
    plans = []
    for fold, train_ids in splits:
        patients = sorted(set(train_ids) & set(texts))
        _check_trainable(patients, label_map, "all patients" if fold is None else f"fold {fold}")
        plans.append((fold, patients))

    set_torch_threads()
    with transformers_progress(not quiet):
        base = load_text_encoder(model, max_length)
    max_length = resolve_max_length(base, max_length)
    hyperparameters = {
        "epochs": epochs,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "max_length": max_length,
        "pooling": pooling,
        "seed": seed,
        "optimizer": f"AdamW(weight_decay={WEIGHT_DECAY})",
        "schedule": f"linear warm-up {WARMUP_FRACTION:g}, linear decay",
        "max_grad_norm": MAX_GRAD_NORM,
        "loss": "BCEWithLogits, positives weighted by class ratio",
        "classifier": "linear on the pooled vector",
        "batching": f"length-bucketed, {BUCKET_BATCHES} batches per bucket",
        "trainable_layers": trainable_layers,
    }
    group = _group_id(base, texts, label_map, hyperparameters, n_folds) if per_fold else None
    out = Path(out)
    report = FinetuneReport(out, group)

    records = []
    for fold, patients in plans:
        folder = out if fold is None else out / f"fold-{fold}"
        record = _training_record(
            base, texts, label_map, patients, hyperparameters, fold, n_folds if per_fold else None, seed, group,
            list(text_columns),
        )
        records.append((fold, patients, folder, record))
    reused = {fold for fold, _, folder, record in records if _reusable(folder, record)}
    # The inputs, and the base model where it is a local folder, must survive replacing an output folder.
    protect = [Path(source), Path(labels), *([Path(store)] if store is not None else [])]
    protect += [Path(model)] if Path(model).exists() else []
    for fold, _, folder, _ in records:
        if fold not in reused:
            check_output_dir(folder, protect)  # fail before training, not after
    n_to_train = sum(len(patients) for fold, patients, _, _ in records if fold not in reused)
    base_state = {name: tensor.clone() for name, tensor in base.model.state_dict().items()} if n_to_train else None

    with tqdm(total=n_to_train * epochs, desc="fine-tuning text encoder", unit="text",
              disable=quiet or not n_to_train) as progress:
        for fold, patients, folder, record in records:
            started = time.perf_counter()
            if fold in reused:
                logger.info("%s: training record matches, reusing the saved encoder", folder)
                saved = json.loads((folder / TRAINING_RECORD).read_text(encoding="utf-8"))
                result = FoldResult(fold, folder, len(patients), True, 0.0, saved.get(_OUTCOME, {}).get("final_loss"))
            else:
                base.model.load_state_dict(base_state)
                loss = _train_encoder(
                    base, [texts[p] for p in patients], [label_map[p] for p in patients], hyperparameters, progress
                )
                seconds = time.perf_counter() - started
                _save_encoder(base, folder, {**record, _OUTCOME: {"final_loss": loss}}, protect)
                logger.info("%s: fine-tuned on %d patients in %.0f s, final loss %.4f", folder, len(patients), seconds, loss)
                result = FoldResult(fold, folder, len(patients), False, seconds, loss)
            if store is not None:
                result.embed = embed_texts(
                    source,
                    store,
                    text_columns=list(text_columns),
                    id_column=id_column,
                    model=str(folder),
                    max_length=max_length,
                    pooling=pooling,
                    batch_size=embed_batch_size,
                    source_format=source_format,
                    encoding=encoding,
                    on_error="skip",
                    wait=wait,
                    quiet=True,
                )
            report.folds.append(result)
    return report
