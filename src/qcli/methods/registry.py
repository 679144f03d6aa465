"""Method registries: adding a method is adding a file that registers itself.

A calibration method registers its settings as frozen dataclasses whose user-facing fields
carry their flag, help and choices (`setting`), plus what it can do (`Capabilities`). The CLI
generates its options and `click.Choice` lists from these, and `check_settings` refuses a
setting the chosen method does not read, so help text, validation and dispatch never drift.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from qcli.errors import UsageError

CALIBRATION_METHODS: dict[str, CalibrationMethod] = {}
DATA_METHODS: dict[str, DataMethod] = {}


@dataclass(frozen=True)
class Flag:
    """How a settings field is set from the command line (no Click here: the CLI maps it).

    `kind` is the value's type (bool: a switch, which gives its field `sets`); `low`/`high`
    bound a number, `low_open`/`high_open` exclude the bound; `choices` lists the accepted
    strings."""

    flag: str
    help: str
    kind: type = str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    sets: Any = True  # what a given switch sets its field to (False: a --no-X ablation)

    @property
    def dest(self) -> str:
        """The parameter name the flag fills (`--recon-batch` -> `recon_batch`)."""
        return self.flag.lstrip("-").replace("-", "_")


def setting(flag: str, help: str, *, default: Any = None, **kw: Any) -> Any:
    """A settings field set by `flag` (see `Flag` for `kw`); `default` is the method's own."""
    return field(default=default, metadata={"flag": Flag(flag, help, **kw)})


def flag_of(f: dataclasses.Field) -> Flag | None:
    return f.metadata.get("flag")


def flagged_fields(*classes: type) -> Iterator[tuple[str, Flag]]:
    """(field name, Flag) of every flag-bearing field of the classes, each name once."""
    seen: set[str] = set()
    for cls in classes:
        for f in dataclasses.fields(cls):
            flag = flag_of(f)
            if flag is not None and f.name not in seen:
                seen.add(f.name)
                yield f.name, flag


@dataclass(frozen=True)
class Capabilities:
    """What a calibration method does, for the stages that must know without naming it."""

    reconstructs: bool = False  # tunes units in order: has per-unit losses (--plot)
    needs_labels: bool = False  # needs labelled calibration images (none does yet)
    data_free_ok: bool = True  # works on generated images (`quantize` without --data)


@dataclass(frozen=True)
class CalibrationMethod:
    name: str
    run: Callable  # (qgraph, calibration batches, settings dict, progress) -> metrics dict
    summary: str
    # Its settings dataclasses (the engine's and each ingredient's): every field is a setting
    # it reads; fields made with `setting` are flags. Anything else is a usage error.
    settings: tuple[type, ...] = ()
    capabilities: Capabilities = Capabilities()
    # (qgraph, number of images, settings) -> progress steps; None: one step per image
    total: Callable | None = None
    # settings dict -> None: combinations its dataclasses cannot express, checked before work
    validate: Callable[[dict[str, Any]], None] | None = None

    def accepts(self, name: str) -> bool:
        return any(name in {f.name for f in dataclasses.fields(c)} for c in self.settings)


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
    settings: tuple[type, ...] = (),
    capabilities: Capabilities = Capabilities(),
    total: Callable | None = None,
    validate: Callable[[dict[str, Any]], None] | None = None,
):
    def wrap(fn: Callable) -> Callable:
        CALIBRATION_METHODS[name] = CalibrationMethod(
            name, fn, summary, settings, capabilities, total, validate
        )
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


def calibration_method(name: str) -> CalibrationMethod:
    load_all()
    if name not in CALIBRATION_METHODS:
        raise UsageError(f"unknown --method {name!r}; choose from {sorted(CALIBRATION_METHODS)}")
    return CALIBRATION_METHODS[name]


def calibration_flags() -> dict[str, Flag]:
    """Every calibration method's flags by settings field, in registration order."""
    load_all()
    classes = [c for m in CALIBRATION_METHODS.values() for c in m.settings]
    return dict(flagged_fields(*classes))


def data_flags() -> dict[str, Flag]:
    """Every data generator's flags by settings field (generic ones, --iters and --lr, are
    the command's own)."""
    load_all()
    return dict(flagged_fields(*(m.settings for m in DATA_METHODS.values())))


def check_settings(method: str, settings: dict[str, Any]) -> None:
    """The one check of a method's settings dict: every key is a field of its settings
    dataclasses (else a usage error naming the flag and the methods it applies to), then
    the method's own combination checks."""
    m = calibration_method(method)
    extra = [k for k in settings if k != "seed" and not m.accepts(k)]
    if extra:
        flags = calibration_flags()
        owners = sorted(o.name for o in CALIBRATION_METHODS.values() if o.accepts(extra[0]))
        named = ", ".join(flags[k].flag if k in flags else k for k in extra)
        raise UsageError(
            f"{named} {'does' if len(extra) == 1 else 'do'} not apply to --method {method}"
            + (f" (it applies to {', '.join(owners)})" if owners else "")
        )
    if m.validate is not None:
        m.validate(settings)


def load_all() -> None:
    """Import every method module so each registers itself."""
    from qcli.methods import range_setting, recipes  # noqa: F401
    from qcli.methods.generators import bns, dgh, noise  # noqa: F401
