import click


@click.command("train-head")
def train_head() -> None:
    """Train a head (being written)."""
    raise click.ClickException("not built yet")
