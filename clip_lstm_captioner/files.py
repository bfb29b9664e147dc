"""Where generated files go, and the one way user data is written: atomically.

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp())
>>> write_text_atomic(folder / "report.md", "# results\\n")
>>> (folder / "report.md").read_text()
'# results\\n'
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def default_cache_dir() -> Path:
    """Where generated data and caches go: `$CLIP_LSTM_CACHE`, else `~/.cache/clip_lstm_captioner`.

    >>> default_cache_dir().name if "CLIP_LSTM_CACHE" not in os.environ else "clip_lstm_captioner"
    'clip_lstm_captioner'
    """
    return Path(os.environ.get("CLIP_LSTM_CACHE") or Path.home() / ".cache" / "clip_lstm_captioner")


def _umask_mode() -> int:
    """The permissions a plain `open(path, "w")` would give a new file (mkstemp gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it replaces `path`, on error it is removed.

    Readers never see a half-written file, and a failed run leaves the previous file whole. The
    file gets the umask's permissions, like any file the user writes.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "rows.jsonl"
    >>> with atomic_write(target) as file:
    ...     _ = file.write("{}\\n")
    >>> target.read_text()
    '{}\\n'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.chmod(temporary, _umask_mode())
        with os.fdopen(handle, mode, **open_kwargs) as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`Path(path).write_text(text)` (UTF-8), atomically."""
    with atomic_write(path, encoding="utf-8") as file:
        file.write(text)
