"""Atomic outputs: a stage either leaves its complete artifact or the previous one untouched.

Everything is written to a hidden temporary sibling (same directory, so the final rename
stays on one file system), fsynced, then renamed into place. A killed run leaves at most a
`.name.tmp-<pid>` behind, never a half-written artifact under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qcli.errors import QcliError, UsageError


def prepare_output(
    path: Path,
    force: bool,
    inputs: Mapping[str, str | Path | None] | None = None,
    flag: str = "--out",
) -> None:
    """Fail early (before any work) if `path` cannot be written; create missing parents.

    Refused, naming `flag`: an empty name, `.`/`..`, the working folder or one above it, and
    an output that is, holds or sits inside one of the `inputs` ({flag: path}): replacing it
    with --force would delete what the run reads.
    """
    check_output_path(path, flag, inputs or {})
    path = Path(path)
    if os.path.lexists(path) and not force:  # lexists: False (not an error) when unreadable
        raise QcliError(f"output '{path}' exists; pass --force to replace it")
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise QcliError(f"cannot write to '{parent}': not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QcliError(f"cannot write to '{parent}': permission denied")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QcliError(f"cannot write to '{path.parent}': {exc.strerror}") from exc
    _probe_writable(path.parent)


def check_output_path(path: str | Path, flag: str, inputs: Mapping[str, str | Path | None]) -> None:
    """The naming rules of `prepare_output`, without touching the file system."""
    text = str(path)
    if not text.strip() or Path(text).name in ("", ".", ".."):
        raise UsageError(f"{flag} {text!r} does not name a file or folder to write")
    out = Path(os.path.realpath(text))
    cwd = Path(os.path.realpath(os.getcwd()))
    if out == cwd or out in cwd.parents:
        raise UsageError(f"{flag} '{text}' is the working folder or holds it; name a new one")
    for input_flag, value in inputs.items():
        if value is None or not str(value):
            continue
        source = Path(os.path.realpath(value))
        if out == source or source in out.parents or out in source.parents:
            where = "is" if out == source else ("sits inside" if source in out.parents else "holds")
            raise UsageError(
                f"{flag} '{text}' {where} {input_flag} '{value}': writing it would replace "
                "what this run reads; choose another output"
            )


def _probe_writable(folder: Path) -> None:
    """Create and remove a file: permission bits say yes on /proc, sysfs and read-only mounts."""
    probe = folder / f".qcli-probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise QcliError(f"cannot write to '{folder}': {exc.strerror or exc}") from exc


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    _remove(tmp)
    try:
        yield tmp
        if not tmp.is_file():
            raise QcliError(f"nothing was written for '{path}'")
        _set_mode(tmp)
        _fsync_file(tmp)
        _swap_in(tmp, path)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; it replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    _remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for entry in [tmp, *tmp.rglob("*")]:
            _set_mode(entry)
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_file(file)
        _fsync_dir(tmp)
        _swap_in(tmp, path)
    finally:
        _remove(tmp)


def _swap_in(new: Path, path: Path) -> None:
    """Rename `new` to `path`; an existing output is moved aside first and deleted last."""
    if path.exists() and (path.is_dir() or new.is_dir()):
        old = _sibling(path, "old")
        _remove(old)
        os.replace(path, old)
        try:
            os.replace(new, path)
        except BaseException:
            os.replace(old, path)
            raise
        _remove(old)
    else:
        os.replace(new, path)
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _set_mode(path: Path) -> None:
    """One mode for every output, whatever wrote it (safetensors writes 0600): 0666 for
    files and 0777 for folders, less the user's umask, as open() and mkdir() give."""
    if path.is_symlink():
        return
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~_umask())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make the rename durable; some file systems refuse to open directories, which is fine."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- manifests


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write JSON, turning numpy/torch scalars, paths and dataclass specs into plain values."""
    text = json.dumps(manifest, indent=2, sort_keys=False, default=_jsonable)
    Path(path).write_text(text + "\n", encoding="utf-8")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"manifest value of type {type(value).__name__} is not JSON serializable")


def read_manifest(folder: Path, fmt: str, version: int, what: str) -> dict[str, Any]:
    """Load and check `folder/manifest.json`: it must exist, parse, and carry our format."""
    folder = Path(folder)
    if not folder.exists():
        raise QcliError(f"{what} '{folder}' does not exist")
    if not folder.is_dir():
        raise QcliError(f"{what} '{folder}' is not a folder")
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise QcliError(f"'{folder}' is not a {what} folder (it has no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QcliError(f"{what} '{folder}' has a corrupt manifest.json ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise QcliError(
            f"'{folder}' is not a {what} folder (manifest format {found!r}, not {fmt!r})"
        )
    found_version = manifest.get("format_version")
    if not isinstance(found_version, int) or found_version < 1:
        raise QcliError(f"{what} '{folder}' has a corrupt manifest.json (bad format_version)")
    if found_version > version:
        raise QcliError(
            f"{what} '{folder}' has format_version {found_version}, newer than this qcli "
            f"reads ({version}); upgrade qcli"
        )
    return manifest
