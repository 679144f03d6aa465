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
    # (qgraph, number of images, settings) -> progress steps; None: one step per image
    total: Callable | None = None
    settings: frozenset[str] = frozenset()  # the settings it reads; others are an error


@dataclass(frozen=True)
class DataMethod:
    name: str
    run: Callable  # (model, input spec, settings, progress) -> (images tensor, metrics dict)
    summary: str
    settings: type  # its frozen settings dataclass, with a validate() method
    total: Callable | None = None  # settings -> progress steps (None: no known total)
    uses_model: bool = True  # False: the model's input spec is all it needs


def register_calibration(
    name: str,
    summary: str,
    rank: int = 0,
    total: Callable | None = None,
    settings: frozenset[str] = frozenset(),
):
    def wrap(fn: Callable) -> Callable:
        CALIBRATION_METHODS[name] = CalibrationMethod(name, fn, summary, rank, total, settings)
        return fn

    return wrap


def register_data(
    name: str,
    summary: str,
    settings: type,
    total: Callable | None = None,
    uses_model: bool = True,
):
    def wrap(fn: Callable) -> Callable:
        DATA_METHODS[name] = DataMethod(name, fn, summary, settings, total, uses_model)
        return fn

    return wrap


def load_all() -> None:
    """Import every method module so each registers itself."""
    from qcli.methods import range_setting, recipes  # noqa: F401
    from qcli.methods.generators import bns, dgh, noise  # noqa: F401
