import click


@click.command()
def texts() -> None:
    """Embed texts (being written)."""
    raise click.ClickException("not built yet")
