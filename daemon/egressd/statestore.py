"""What was pushed over the API, kept in ``state.dir/state.json`` across restarts.

One JSON document holds every pushed object, so a change that touches several objects is one
atomic file replacement: write a temporary file, fsync it, rename it over the old one, fsync the
directory. A change is *prepared* (written) before the kernel is touched and *committed* (renamed)
after, so a failure at any step leaves the old file in place."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EgressdError, FieldError, ValidationError

FORMAT = 1


class StateWriteError(EgressdError):
    """state.dir could not be written (disk full, read-only, gone...). Nothing was changed: the
    old state file is intact and the kernel was not touched (or was rolled back)."""

    error_code = "INTERNAL_ERROR"


def _write_error(action: str, path: Path, e: OSError) -> StateWriteError:
    return StateWriteError(f"cannot {action} {path}: {e.strerror or e} (errno {e.errno}); "
                           "the change was not applied, the old state is kept")


@dataclass
class Pushed:
    """Pushed objects in their API JSON form (validated before they get here)."""

    policies: dict[str, dict] = field(default_factory=dict)
    bindings: dict[str, str] = field(default_factory=dict)
    workloads: dict[str, dict] = field(default_factory=dict)
    connections: dict[str, dict] = field(default_factory=dict)

    def copy(self) -> "Pushed":
        """A copy whose maps can be edited. The JSON documents inside are shared: they are never
        edited in place, only replaced, so unchanged ones keep their identity (and parse cache)."""
        return Pushed(dict(self.policies), dict(self.bindings), dict(self.workloads), dict(self.connections))

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "policies": self.policies,
            "bindings": self.bindings,
            "workloads": self.workloads,
            "connections": self.connections,
        }

    @classmethod
    def from_json(cls, doc: object) -> "Pushed":
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValidationError(FieldError("format", f"unsupported state format (expected {FORMAT})"))
        try:
            return cls(
                dict(doc.get("policies", {})),
                {str(k): str(v) for k, v in doc.get("bindings", {}).items()},
                dict(doc.get("workloads", {})),
                dict(doc.get("connections", {})),
            )
        except (TypeError, ValueError, AttributeError) as e:
            raise ValidationError(FieldError("", f"malformed state: {e}")) from None


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


_string = json.encoder.encode_basestring_ascii  # what json.dumps writes a string as (in C)


def _doc_json(obj: object) -> str:
    """_dumps of a policy document, its long lists of plain destination entries written by one
    format per entry: the encoder took 1.1 us per such two-key object, 110 ms for a policy of
    100,000 destinations, on each change."""
    if type(obj) is dict and all(type(k) is str for k in obj):
        return "{" + ",".join([f"{_string(k)}:{_doc_json(obj[k])}" for k in sorted(obj)]) + "}"
    if type(obj) is list and len(obj) > 16:
        try:
            if set(map(type, obj)) == {dict} and set(map(len, obj)) == {2}:
                return "[" + ",".join([
                    f'{{"destination":{_string(e["destination"])},'
                    f'"internet_destination_type":{_string(e["internet_destination_type"])}}}' for e in obj]) + "]"
        except (KeyError, TypeError):
            pass  # not the plain entries: the encoder writes it
    return _dumps(obj)


def dumps_state(pushed: Pushed) -> str:
    """The state file's text: json.dumps(pushed.to_json()), compact, keys sorted."""
    doc = pushed.to_json()
    return "{" + ",".join([
        f"{_string(k)}:{_doc_json(v) if k == 'policies' else _dumps(v)}" for k, v in sorted(doc.items())]) + "}"


class PreparedState:
    """A state file being written (StateStore.begin): a file of THREAD_AFTER bytes or more is
    written and fsynced by a thread (a state of 100,000 destinations: 7.5 MB, 20-50 ms, during
    which the change is planned and rendered), a smaller one at once."""

    THREAD_AFTER = 256 * 1024

    def __init__(self, path: Path, fd: int, data: bytes) -> None:
        self.path = path
        self._error: OSError | None = None
        self._thread: threading.Thread | None = None
        if len(data) < self.THREAD_AFTER:
            self._write(fd, data)
        else:
            self._thread = threading.Thread(target=self._write, args=(fd, data), name="egressd-state-write", daemon=True)
            self._thread.start()

    def _write(self, fd: int, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            self._error = e
        finally:
            os.close(fd)

    def wait(self) -> Path:
        """The path, once the file is written and fsynced. Raises StateWriteError (the file
        removed) when the disk refused; again on every later call."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            self.path.unlink(missing_ok=True)
            raise _write_error("write", self.path, self._error)
        return self.path

    def abort(self) -> None:
        """The change is given up: wait for the writer, remove the file."""
        if self._thread is not None:
            self._thread.join()
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass


class StateStore:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.path = self.dir / "state.json"

    def load(self) -> Pushed:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return Pushed()
        except OSError as e:
            raise EgressdError(f"cannot read {self.path}: {e.strerror}") from None
        try:
            return Pushed.from_json(json.loads(text))
        except (json.JSONDecodeError, ValidationError) as e:
            raise EgressdError(f"{self.path} is corrupt ({e}); refusing to guess. Move it away to start from the baked state.") from None

    def prepare(self, pushed: Pushed) -> Path:
        """Write the new state next to the old one, durably. Returns the temporary path.
        Raises StateWriteError (the temporary file removed) when the disk refuses."""
        return self.begin(pushed).wait()

    def begin(self, pushed: Pushed) -> "PreparedState":
        """prepare(), with a big file written and fsynced by a thread: its wait() returns the
        path once the file is durable (or raises StateWriteError). Meanwhile the caller can
        plan and render the change, but must not touch the kernel before wait() returned.
        Raises StateWriteError at once when the file cannot be created."""
        tmp = self.dir / f".state.json.{os.getpid()}.tmp"
        data = dumps_state(pushed).encode()
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        except OSError as e:
            raise _write_error("create", tmp, e) from None
        return PreparedState(tmp, fd, data)

    def commit(self, tmp: Path) -> None:
        """Rename the prepared file over the state file. Raises StateWriteError if the rename
        fails (the old file is then intact); a failed directory fsync after it is not an error
        of the change, which is already in place."""
        try:
            os.replace(tmp, self.path)
        except OSError as e:
            raise _write_error("replace", self.path, e) from None
        try:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass  # the rename is done; only its durability across a power cut is in doubt

    def abort(self, tmp: Path) -> None:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a leftover temporary file is harmless: the next prepare truncates it
