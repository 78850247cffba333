"""``python -m lightning_compress``: the command line."""

from lightning_compress.cli import run

run()
