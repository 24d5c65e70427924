"""``faultfs://``: the local file system, with storage faults on demand, for tests.

A real fsspec filesystem (``LocalFileSystem`` underneath: real files, real DCP), registered under
its own protocol so that ``Storage``, DCP's fsspec reader and writer, and the CLI all open it by
URL. Storage options choose the fault, so every rank (and every fsspec instance the URL makes)
behaves alike:

* ``read_error`` / ``write_error``: raised when a matching file is opened for reading / writing
  (``write_error`` also on ``makedirs``): ``"ConnectionError"``, ``"PermissionError"``,
  ``"TimeoutError"`` or ``"EndpointConnectionError"`` (botocore's, which is not an ``OSError``);
* ``match``: only paths containing this substring (default: every path);
* ``ranks``: only in processes whose ``RANK`` is listed (default: all), e.g. one node without
  access.

Dropping privileges would test the same thing but breaks where the repository sits in a
directory only root can read; an fsspec filesystem that raises does not.
"""

from __future__ import annotations

import os

import fsspec
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "faultfs"


def _error(name: str, path: str) -> BaseException:
    what = f"simulated storage fault on {path}"
    if name == "EndpointConnectionError":
        from botocore.exceptions import EndpointConnectionError

        return EndpointConnectionError(endpoint_url=f"http://127.0.0.1:1/{path}")
    if name == "PermissionError":
        return PermissionError(13, "Permission denied", path)
    if name in ("ConnectionError", "TimeoutError"):
        return {"ConnectionError": ConnectionError, "TimeoutError": TimeoutError}[name](what)
    raise ValueError(f"faultfs: unknown error {name!r}")


class FaultFS(LocalFileSystem):
    protocol = (PROTOCOL,)

    def __init__(self, read_error=None, write_error=None, match="", ranks=None, **kwargs):
        super().__init__(**kwargs)
        self.read_error, self.write_error = read_error, write_error
        self.match, self.ranks = match, ranks

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        if path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3 :]
        return super()._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return f"{PROTOCOL}://{self._strip_protocol(name)}"

    def _armed(self, error, path) -> bool:
        if not error or self.match not in str(path):
            return False
        return self.ranks is None or int(os.environ.get("RANK", "0")) in self.ranks

    def _open(self, path, mode="rb", **kwargs):
        error = self.write_error if any(c in mode for c in "wax+") else self.read_error
        if self._armed(error, path):
            raise _error(error, str(path))
        return super()._open(path, mode, **kwargs)

    def makedirs(self, path, exist_ok=False):
        if self._armed(self.write_error, path):
            raise _error(self.write_error, str(path))
        return super().makedirs(path, exist_ok=exist_ok)


fsspec.register_implementation(PROTOCOL, FaultFS, clobber=True)


def url(path) -> str:
    return f"{PROTOCOL}://{os.fspath(path)}"
