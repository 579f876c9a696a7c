"""The `minifn` command line: a Click group over the pure core. I/O, devices and errors live here."""

import click


@click.group()
@click.version_option(package_name="minifn")
def cli():
    """minifn: pure-functional language-model training on torch.func and torch.compile."""


def main():
    cli()
