"""Options shared by the tools' parsers. Imports nothing heavy: ``midol <tool> --help`` of a tool
that builds its parser from these and the standard library answers without loading torch."""

from __future__ import annotations

from typing import Any


def add_trust_option(parser: Any) -> None:
    """``--class-path``: a module class outside ``midol.`` that the user trusts to import
    (their own subclass); checkpoints cannot choose what code runs otherwise."""
    parser.add_argument("--class-path", action="append", default=[], metavar="MODULE.CLASS",
                        help="trust this module class of the checkpoint (your own subclass "
                        "outside midol); repeatable")


def add_figure_options(parser: Any) -> None:
    """``--format`` and ``--dpi`` of every figure a tool saves."""
    parser.add_argument("--format", nargs="+", default=["png"], choices=["png", "pdf", "svg"],
                        help="figure file format(s); several write one file each (default: png)")
    parser.add_argument("--dpi", type=int, default=100, help="raster resolution (default: 100)")
