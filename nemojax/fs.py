"""Where models are read from, and writing user-owned directories so that nothing is lost or half-overwritten.

`model_path(spec)` is a model directory, or a Hugging Face Hub id (`org/name`) resolved in the local Hugging Face
cache only (nothing is downloaded).

`replace_directory(target, force)` yields a temporary sibling of `target` to write into. Only when the block
finishes is the new directory swapped in: with an atomic exchange (Linux renameat2 RENAME_EXCHANGE) when target
exists, then the old copy is removed. If the block fails (disk full, an exception, Ctrl-C), the temporary is
removed and target is untouched. An existing non-empty target is refused without force, and even with force
when it is not a model directory (no config file), holds one of the sources or the working directory, or is a
mount point (which cannot be swapped). Files and directories written inside get normal permissions (0644 / 0755
under the usual umask).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
import time

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")
MODEL_FILES = ("config.json", "nemojax_config.json")      # what makes a directory one that --force may replace
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
logger = logging.getLogger(__name__)


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def model_path(spec: str) -> str:
    """The directory a model argument names: an existing path as given, else a Hub id (`org/name`) found in the
    local Hugging Face cache (HF_HOME / HF_HUB_CACHE, `models--org--name/snapshots/REV`, the revision `main`
    points to). Offline: a Hub id that is not cached is one error saying how to fetch it."""
    if os.path.exists(spec) or not _HUB_ID.match(spec):
        return spec
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(spec, local_files_only=True)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"{spec} is not a directory, and no snapshot of the Hub model {spec!r} is in the "
                                f"local Hugging Face cache ({HF_HUB_CACHE}); nemojax does not download: fetch it "
                                f"with `hf download {spec}` (huggingface_hub) and run again") from None


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux renameat2); False where the system or filesystem lacks the call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def storage_reason(e: BaseException) -> str:
    """One short line for an error from a storage library (tensorstore and safetensors write pages: specs, paths,
    nested causes): the operating system's words where the error carries an errno, else its first line."""
    found = re.search(r"os_error_code='?(\d+)|os error (\d+)", str(e))
    code = getattr(e, "errno", None) or (found and (found.group(1) or found.group(2)))
    if code:
        return os.strerror(int(code))
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def normal_permissions(path: str) -> None:
    """chmod every file under path (and path) to 0666 / 0777 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def check_writable_target(target: str, force: bool, sources: tuple = ()) -> None:
    """Raises FileExistsError for a target that is a file, a non-empty directory without force, or (with force)
    one that replacing would lose more than a model: see the module doc. `sources`: paths being read."""
    if os.path.isfile(target):
        raise FileExistsError(f"{target} is a file, not a directory")
    if not os.path.isdir(target):
        return
    if os.path.ismount(os.path.realpath(target)):
        raise FileExistsError(f"{target} is a mount point, which cannot be replaced as a whole; write to a new "
                              f"directory inside it")
    if not os.listdir(target):
        return
    if not force:
        raise FileExistsError(f"{target} already exists and is not empty; pass --force (force=True) to replace it")
    for inner in (*sources, os.getcwd()):
        if _inside(inner, target):
            raise FileExistsError(f"refusing to replace {target}: it holds {inner}")
    if not any(os.path.exists(os.path.join(target, name)) for name in MODEL_FILES):
        raise FileExistsError(f"refusing to replace {target} with --force: it is not a model directory (no "
                              f"{' or '.join(MODEL_FILES)}); choose a new or empty directory")


@contextlib.contextmanager
def replace_directory(target: str, force: bool = False, sources: tuple = ()):
    """Yields a temporary directory beside `target` (a symlink's destination); on success it becomes `target`
    (see the module doc)."""
    target = os.path.realpath(target)
    check_writable_target(target, force, sources)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    _sweep_abandoned(target)
    tmp = tempfile.mkdtemp(prefix=f"{_writing_prefix(target)}{socket.gethostname()}-{os.getpid()}-", dir=parent)
    try:
        yield tmp
        normal_permissions(tmp)
        old = _swap_in(tmp, target)
    except _Stranded as e:                                      # the undo failed: say where the old copy is
        remove_tree(tmp)
        raise OSError(f"writing {target} failed ({e})") from e
    except OSError as e:                                        # disk full, permissions: one line, nothing lost
        remove_tree(tmp)
        kept = f"{target} is unchanged" if os.path.exists(target) else "nothing was written"
        raise OSError(f"writing {target} failed ({storage_reason(e)}); {kept}") from e
    except BaseException:
        remove_tree(tmp)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)                  # the replaced copy


def remove_tree(path: str, settle: float = 0.25, timeout: float = 30.0) -> bool:
    """Removes the directory `path` and keeps removing it until it has stayed absent for `settle` seconds (at
    most `timeout`): a storage library whose write failed can still have writes in flight on its own threads
    (Orbax's other arrays: tensorstore creates their directories again), which a single rmtree leaves behind.
    Returns whether path is gone; a temporary still there at the timeout is logged (the next write of the
    same target sweeps it once this process has exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(settle if not os.path.lexists(path) else 0.05)
        if not os.path.lexists(path):
            return True
    logger.warning("could not remove %s: something is still writing into it", path)
    return False


def _writing_prefix(target: str) -> str:
    return f".{os.path.basename(target)}.writing-"


def _sweep_abandoned(target: str) -> list[str]:
    """Removes temporary siblings of target that a writer on this host left behind when it was killed
    (`.NAME.writing-HOST-PID-*` whose process no longer exists): what they hold was never swapped in, so it is
    nobody's model. Siblings of other hosts (a shared filesystem), of live processes and of the older unnamed
    form are left alone. Returns the removed paths."""
    parent, prefix = os.path.dirname(target), _writing_prefix(target)
    mine = re.compile(re.escape(prefix + socket.gethostname()) + r"-(\d+)-[^/]*$")
    removed = []
    for name in os.listdir(parent) if os.path.isdir(parent) else ():
        match = mine.match(name)
        if not match or name.endswith(".old") or _alive(int(match.group(1))):
            continue
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        removed.append(os.path.join(parent, name))
        logger.warning("removed %s, a partial write of %s left by a process that no longer exists", name, target)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                     # exists, owned by another user
        return True
    return True


class _Stranded(OSError):
    """Swapping in failed and the old copy could not be put back."""


def _swap_in(new: str, target: str):
    """Moves `new` to `target`; returns the path now holding the replaced copy (None if there was none). On an
    error target is as it was."""
    if not os.path.exists(target):
        os.rename(new, target)
        return None
    if _exchange(new, target):
        return new
    old = new + ".old"                                          # no atomic exchange: two renames, undone on error
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError as e:
        try:
            os.rename(old, target)
        except OSError:
            raise _Stranded(f"{e.strerror}; the previous copy of {target} is at {old}") from e
        raise
    return old


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copies the tokenizer and generation files a checkpoint directory holds (TOKENIZER_FILES) to dst."""
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied
