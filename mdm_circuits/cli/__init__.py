"""The `mdm-circuits` command line (nothing in the library imports it)."""

from mdm_circuits.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
