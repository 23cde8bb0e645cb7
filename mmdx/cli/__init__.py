"""Command-line interface: thin wrappers that parse options and call library functions.

Modules under ``mmdx.cli`` import click and the standard library only at the
top; TensorFlow and torch are imported inside the library functions that
need them, so ``mmdx --help`` and ``mmdx train-head`` start fast.
"""

from __future__ import annotations

import functools
import logging

import click

from mmdx import __version__
from mmdx.errors import MmdxError

__all__ = ["main", "report_errors"]


INTERRUPTED_RESUMABLE = "interrupted; batches committed before the interrupt are kept; re-run the same command to resume"
INTERRUPTED_NOTHING_WRITTEN = "interrupted; nothing was written to --out"


class Interrupted(click.ClickException):
    """A command stopped by Ctrl-C: prints ``Error: <message>`` and exits 130, as shells do for SIGINT."""

    exit_code = 130


def report_errors(function=None, *, interrupted: str = "interrupted"):
    """Turn ``MmdxError`` into a one-line ``Error:`` message and exit status 1.

    A ``KeyboardInterrupt`` becomes ``Error: <interrupted>`` and exit status
    130. Use as ``@report_errors`` or ``@report_errors(interrupted=...)``
    to say what an interrupt leaves behind for that command.
    """
    if function is None:
        return functools.partial(report_errors, interrupted=interrupted)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except MmdxError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            raise Interrupted(interrupted) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mmdx")
@click.option("-v", "--verbose", count=True, help="Log more: -v for info, -vv for debug.")
def main(verbose: int) -> None:
    """Multimodal diagnosis research: embed MR images and clinical text once, train heads often."""
    levels = {0: logging.WARNING, 1: logging.INFO}
    level = levels.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.group()
def embed() -> None:
    """Run an encoder over images or texts and store the vectors."""


def _register() -> None:
    from mmdx.cli import embed_images, embed_texts, store, train

    embed.add_command(embed_images.images)
    embed.add_command(embed_texts.texts)
    main.add_command(train.train_head)
    main.add_command(store.store)

    from mmdx.cli import finetune

    main.add_command(finetune.finetune_text)

    from mmdx.cli import compare

    main.add_command(compare.compare)


_register()
