"""The mapping side of ``self.hparams`` (Lightning's ``AttributeDict``), shared by the typed
option protocols of every method and task (``MIDoLOptions``, ``DEXOptions``, ...): attributes
are typed one by one there, so ``self.hparams.tmperature`` is a type error; indexing by a
name held in a variable stays possible."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol


class HParams(Protocol):
    def __getitem__(self, key: str) -> Any: ...

    def __setitem__(self, key: str, value: Any) -> None: ...

    def __contains__(self, key: object) -> bool: ...

    def __iter__(self) -> Iterator[str]: ...

    def __len__(self) -> int: ...

    def get(self, key: str, default: Any = None) -> Any: ...

    def keys(self) -> Any: ...

    def items(self) -> Any: ...
