"""Option groups shared by several commands, so that their names, defaults and help stay identical."""

from __future__ import annotations

import click

__all__ = ["label_options"]


def label_options(function):
    """Add ``--labels``, ``--label-column``, ``--positive`` and ``--negative`` to a command."""
    decorators = [
        click.option(
            "--labels", "labels_path", required=True, type=click.Path(dir_okay=False), help="Labels CSV with a header row."
        ),
        click.option("--label-column", required=True, help="Column of the labels CSV with the labels."),
        click.option(
            "--positive",
            default=None,
            help="Label value that means 1 (every other value means 0); without it the labels must be 0/1.",
        ),
        click.option(
            "--negative",
            multiple=True,
            help="With --positive: a label value that means 0 (repeatable); patients with other values are dropped.",
        ),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function
