"""Method registries: adding a method is adding a file that registers itself.

The CLI builds its `click.Choice` lists from these dictionaries, so help text, validation and
dispatch never drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

CALIBRATION_METHODS: dict[str, CalibrationMethod] = {}
DATA_METHODS: dict[str, DataMethod] = {}


@dataclass(frozen=True)
class CalibrationMethod:
    name: str
    run: Callable  # (qgraph, calibration batches, settings) -> metrics dict
    summary: str
    rank: int  # higher is better; `quantize` picks the best available


@dataclass(frozen=True)
class DataMethod:
    name: str
    run: Callable  # (model, input shape, settings) -> (images tensor, metrics dict)
    summary: str


def register_calibration(name: str, summary: str, rank: int = 0):
    def wrap(fn: Callable) -> Callable:
        CALIBRATION_METHODS[name] = CalibrationMethod(name, fn, summary, rank)
        return fn

    return wrap


def register_data(name: str, summary: str):
    def wrap(fn: Callable) -> Callable:
        DATA_METHODS[name] = DataMethod(name, fn, summary)
        return fn

    return wrap


def load_all() -> None:
    """Import every method module so each registers itself."""
    from qcli.methods import bns, range_setting  # noqa: F401
