"""YAML files edited by people: load them and point at the line that is wrong.

Admins edit the config, rule and procedure files by hand. When one is wrong,
"field required" is not enough at 3 a.m.; the message has to name the file,
the line and the field path. PyYAML's composer keeps the position of every
node, so we load once into plain data and keep a map from field path to line.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T")


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a file, located for a person to find."""

    file: str
    line: int | None
    column: int | None
    field: str
    reason: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        return f"{where}: {self.field or '(top level)'}: {self.reason}"


class FileProblems(Exception):
    """A file that could not be used, with every problem found in it."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


Positions = dict[tuple[Any, ...], tuple[int, int]]


def _walk(node: yaml.Node, path: tuple[Any, ...], out: Positions) -> None:
    # A mapping key's own line wins over its value's: the key is what people look for.
    out.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = key.value
            out[(*path, name)] = (key.start_mark.line + 1, key.start_mark.column + 1)
            _walk(value, (*path, name), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), out)


_MERGE = "tag:yaml.org,2002:merge"


def _duplicates(loader: yaml.SafeLoader, node: yaml.Node, path: tuple[Any, ...], file: str) -> list[Problem]:
    """Keys given twice in one mapping, at any depth.

    PyYAML keeps the last silently, so an admin who pasted a second
    ``destinations:`` block gets the file half of them wrote, with no word.
    Keys compare as YAML reads them (``1`` and ``01`` are one key); a ``<<``
    merge may still be overridden, that is what it is for.
    """
    found: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, yaml.Node] = {}
        for key, value in node.value:
            if key.tag == _MERGE:
                continue
            try:
                seen = first.setdefault(loader.construct_object(key, deep=True), key)
            except (TypeError, yaml.YAMLError):  # a key that cannot be a dict key: the constructor says so later
                seen = key
            name = getattr(key, "value", "?")
            if seen is not key:
                found.append(
                    Problem(
                        file,
                        key.start_mark.line + 1,
                        key.start_mark.column + 1,
                        field_path((*path, name)),
                        f"duplicate key {name!r} (first at line {seen.start_mark.line + 1})",
                    )
                )
            found += _duplicates(loader, value, (*path, name), file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicates(loader, item, (*path, i), file)
    return found


def load(path: Path, text: str | None = None) -> tuple[Any, Positions]:
    """Read a YAML file into plain data plus the position of every field; a key given twice is a problem.

    ``text``: the file's content, already read (a version kept in the store);
    ``path`` then only names it in the problems.
    """
    name = str(path)
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise FileProblems([Problem(name, None, None, "", f"cannot read file: {exc.strerror}")]) from exc
    loader = yaml.SafeLoader(text)
    positions: Positions = {}
    try:
        node = loader.get_single_node()
        if node is not None:
            # Before constructing: it folds `<<` merges into the mapping, and those may repeat a key.
            duplicates = _duplicates(loader, node, (), name)
            if duplicates:
                raise FileProblems(duplicates)
            _walk(node, (), positions)
        data = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise FileProblems([Problem(name, line, col, "", f"not valid YAML: {reason}")]) from exc
    finally:
        loader.dispose()
    return ({} if data is None else data), positions


def load_mapping(path: Path, text: str | None = None) -> tuple[dict, Positions]:
    """`load`, for files whose top level must be a mapping of keys."""
    data, positions = load(path, text)
    if not isinstance(data, dict):
        raise FileProblems([Problem(str(path), 1, 1, "", "expected a mapping of keys at the top level")])
    return data, positions


def field_path(loc: tuple) -> str:
    """A location as people write it: ``rules[2].then.send``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def problem_at(file: str, positions: Positions, loc: tuple, reason: str) -> Problem:
    """A problem at ``loc``; a missing field has no line of its own, so it points at its parent."""
    probe = loc
    while probe and probe not in positions:
        probe = probe[:-1]
    line, col = positions.get(probe, (None, None))
    return Problem(file, line, col, field_path(loc), reason)


def problems_from(exc: ValidationError, file: str, positions: Positions) -> list[Problem]:
    """Turn pydantic's errors into located problems, nearest known line first."""
    problems = []
    for err in exc.errors(include_url=False):
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown field (check the spelling)"
        problems.append(problem_at(file, positions, tuple(err["loc"]), reason))
    return problems


def validate(model: type[BaseModel], path: Path, text: str | None = None) -> BaseModel:
    """Load and validate a YAML file against a pydantic model, or raise FileProblems."""
    data, positions = load_mapping(path, text)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise FileProblems(problems_from(exc, str(path), positions)) from exc


def digest(path: Path) -> str:
    """Which version of a file is meant: stored with each load and each decision made under it."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Reloaded(Generic[T]):
    """A file admins edit while the service runs: loaded when its bytes change.

    An invalid edit keeps the version that runs; each version is loaded (or
    refused) once, and every outcome goes to ``record`` (ok, digest, errors,
    and the text of a version that loaded) so that `nnrouter status` can show
    it and other stages can run the same version. ``name`` prefixes the log
    events. The file is read once per poll: the digest and the loaded value
    are of the same bytes, even when an admin saves in between.
    """

    def __init__(
        self,
        path: Path,
        load: Callable[[Path, str], T],
        record: Callable[[bool, str, str | None, str | None], None],
        name: str,
        summary: Callable[[T], dict[str, Any]],
        log: Any,
    ):
        self.path = Path(path)
        self.value: T | None = None
        self.digest: str | None = None
        self._load, self._record, self._name, self._summary, self._log = load, record, name, summary, log
        self._seen: str | None = None  # the digest (or read error) last looked at

    def poll(self) -> bool:
        """Load the file if it changed; True when a new version now runs."""
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            if self._seen != str(exc):
                self._seen = str(exc)
                self._record(False, "", f"{self.path}: cannot read: {exc.strerror or exc}", None)
                self._log.error(f"{self._name}_unreadable", path=str(self.path), error=exc.strerror or str(exc))
            return False
        version = hashlib.sha256(data).hexdigest()
        if version in (self.digest, self._seen):
            return False  # running, or refused already
        self._seen = version
        try:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FileProblems([Problem(str(self.path), None, None, "", f"not UTF-8 text: {exc.reason}")]) from exc
            value = self._load(self.path, text)
        except FileProblems as exc:
            self._record(False, version, str(exc), None)
            self._log.error(
                f"{self._name}_rejected",
                path=str(self.path),
                digest=version[:12],
                problems=len(exc.problems),
                first=str(exc.problems[0]) if exc.problems else None,
                kept=self.digest[:12] if self.digest else None,
            )
            return False
        self.value, self.digest = value, version
        self._record(True, version, None, text)
        self._log.info(f"{self._name}_loaded", path=str(self.path), digest=version[:12], **self._summary(value))
        return True


def write_atomically(path: Path, blob: bytes) -> None:
    """Replace ``path`` whole or not at all, and durably: a reader (the router polling a rule file, a
    worker loading a model) sees the old bytes or the new, never half of them."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; models, cards and rules are for everyone to read
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
