"""``mmdx store ...``: inspect and maintain feature stores."""

from __future__ import annotations

import json

import click

from mmdx.cli import report_errors


@click.group()
def store() -> None:
    """Inspect and maintain a feature store."""


@store.command("info")
@click.argument("store_path", metavar="STORE", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
@report_errors
def info(store_path: str, as_json: bool) -> None:
    """List the feature sets of STORE with rows, patients, width and provenance."""
    from mmdx.store import FeatureStore

    sets = FeatureStore(store_path).list_sets()
    if as_json:
        click.echo(json.dumps([vars(s) for s in sets], indent=2, sort_keys=True))
        return
    if not sets:
        click.echo(f"{store_path}: no feature sets")
        return
    for s in sets:
        click.echo(f"{s.name}")
        click.echo(f"  modality {s.modality}, encoder {s.encoder}, width {s.width}")
        click.echo(f"  rows {s.n_rows}, patients {s.n_patients}, views {s.n_views}")
        click.echo(f"  created {s.created}, updated {s.updated}")
        for key in sorted(s.config):
            if key not in ("modality", "encoder", "width"):
                click.echo(f"  {key}: {json.dumps(s.config[key], sort_keys=True)}")
        for key in sorted(s.info):
            click.echo(f"  {key}: {json.dumps(s.info[key], sort_keys=True)}")
