"""A user's own method subclass outside midol, taking **kwargs (as docs/extending.md shows)."""

from __future__ import annotations

from typing import Any

from midol.methods import MIDoL


class MyMIDoL(MIDoL):
    """M-IDoL with one extra option of the user's."""

    def __init__(self, my_option: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.my_option = my_option
