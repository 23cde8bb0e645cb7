"""``mmdx store ...``: inspect and maintain feature stores."""

from __future__ import annotations

import json

import click

from mmdx.cli import report_errors

_STORE = click.Path(dir_okay=True)  # folders pass here so the library can name the mistake
_WAIT_HELP = "Seconds to wait for another process that is writing the store; 0 fails at once."


@click.group()
def store() -> None:
    """Inspect and maintain a feature store."""


@store.command("info")
@click.argument("store_path", metavar="STORE", type=_STORE)
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
@report_errors
def info(store_path: str, as_json: bool) -> None:
    """List the feature sets of STORE with rows, patients, width and provenance."""
    from mmdx.store.api import displayed_config
    from mmdx.store.maintenance import store_info

    summary = store_info(store_path)
    if as_json:
        click.echo(json.dumps(_as_dict(summary), indent=2, sort_keys=True))
        return
    click.echo(
        f"{summary.path}: format version {summary.format_version}, {len(summary.feature_sets)} feature set(s), "
        f"{summary.pending_shards} journal shard(s) pending, {summary.size_bytes / 1e6:.1f} MB"
    )
    for s in summary.feature_sets:
        click.echo(f"{s.name}")
        click.echo(f"  modality {s.modality}, encoder {s.encoder}, width {s.width}")
        click.echo(f"  rows {s.n_rows}, patients {s.n_patients}, views {s.n_views}")
        click.echo(f"  created {s.created}, updated {s.updated}")
        config = {
            k: v for k, v in displayed_config(s.modality, s.encoder, s.config).items() if k not in ("modality", "encoder", "width")
        }
        for title, values in (("configuration", config), ("provenance", s.info)):
            if values:
                click.echo(f"  {title}:")
            for key in sorted(values):
                click.echo(f"    {key}: {json.dumps(values[key], sort_keys=True)}")


def _as_dict(summary) -> dict:
    data = dict(vars(summary))
    data["feature_sets"] = [vars(s) for s in summary.feature_sets]
    return data


@store.command("verify")
@click.argument("store_path", metavar="STORE", type=_STORE)
@report_errors
def verify(store_path: str) -> None:
    """Check every file of STORE; exit 1 and name each fault if any is found."""
    from mmdx.store.maintenance import verify_store

    report = verify_store(store_path)
    for note in report.notes:
        click.echo(f"note: {note}")
    for fault in report.faults:
        click.echo(f"fault: {fault}", err=True)
    if not report.ok:
        raise click.ClickException(f"{store_path}: {len(report.faults)} fault(s) found")
    click.echo(
        f"{store_path}: OK, {len(report.feature_sets)} feature set(s), {report.n_rows} rows, "
        f"{report.n_shards} journal shard(s)"
    )


@store.command("rm")
@click.argument("store_path", metavar="STORE", type=_STORE)
@click.argument("name", metavar="SET")
@click.option("--yes", is_flag=True, help="Remove without asking for confirmation.")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True, help=_WAIT_HELP)
@report_errors
def rm(store_path: str, name: str, yes: bool, wait: float) -> None:
    """Remove the feature set SET from STORE."""
    from mmdx.store.maintenance import remove_feature_set

    if not yes:
        click.confirm(f"Remove feature set {name} from {store_path}?", abort=True)
    n_rows = remove_feature_set(store_path, name, wait=wait)
    click.echo(f"{store_path}: removed {name} ({n_rows} rows)")


@store.command("export")
@click.argument("store_path", metavar="STORE", type=_STORE)
@click.argument("name", metavar="SET")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output file: .npz (patient_ids, items, item_hashes, views, vectors) or .csv (one row per vector).",
)
@report_errors
def export(store_path: str, name: str, out: str) -> None:
    """Write the feature set SET of STORE to an .npz or .csv file."""
    from mmdx.store.maintenance import export_feature_set

    n_rows = export_feature_set(store_path, name, out)
    click.echo(f"{out}: {n_rows} rows of {name}")


@store.command("merge")
@click.argument("out", metavar="OUT", type=_STORE)
@click.argument("sources", metavar="STORE...", nargs=-1, required=True, type=_STORE)
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True, help=_WAIT_HELP)
@report_errors
def merge(out: str, sources: tuple[str, ...], wait: float) -> None:
    """Merge the feature sets of each STORE into OUT (created if absent).

    Sets with the same name are united; on equal keys the later STORE wins.
    A set whose name matches but whose configuration differs stops the
    merge, and OUT stays unchanged.
    """
    from mmdx.store.maintenance import merge_stores

    report = merge_stores(out, list(sources), wait=wait)
    for name, n_rows in sorted(report.rows_per_set.items()):
        click.echo(f"{name}: {n_rows} rows")
    click.echo(f"{out}: merged {len(sources)} store(s)")
