"""Every file written whole or not at all (temporary name, fsync, rename); debris of killed runs removed; output
paths checked before any long work."""
import os
import re
import shutil

from errors import RunError, first_line

TMP_RE = re.compile(r"\.tmp(\d*)$")  # <name>.tmp<pid>: what atomic_write leaves when killed (older: no pid)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def atomic_write(path, write):
    """write(f) into <path>.tmp<pid>, fsync, os.replace onto path: the old file or the new one, never half of it."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise RunError(f"cannot write {path} ({first_line(e)}); free disk space or choose a writable folder "
                       "(the previous file, if any, is unchanged)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temps(folder):
    """Delete <name>.tmp<pid> files in folder (not below) left by killed processes; returns their names."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        m = TMP_RE.search(name)
        path = os.path.join(folder, name)
        pid = int(m.group(1) or 0) if m else None
        if m and pid != os.getpid() and not (pid and _pid_alive(pid)) and os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    return removed


def atomic_link(src, dst):
    """dst becomes the same file as src (a hard link; a copy where links are unsupported), atomically."""
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        raise RunError(f"cannot write {dst} ({e}); free disk space or choose a writable --out-dir") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable(path, what):
    """Fail now, before any long work, if the file `path` could not be created: it is a folder, or its folder (or
    the nearest existing parent) is a file or not writable. Creates nothing."""
    if os.path.isdir(path):
        raise RunError(f"{what} {path} is a folder; give a file path")
    check_dir(os.path.dirname(os.path.abspath(path)), what)


def check_dir(folder, what):
    """Fail now if the folder (or its nearest existing parent) is a file or not writable; creates nothing."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise RunError(f"{what} {folder}: {path} is a file, not a folder; give a folder path")
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunError(f"{what} {folder}: {path} is not writable (read-only disk or permissions); choose a "
                       "writable folder")


def make_dir(folder, what):
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create {what} {folder} ({first_line(e)}); choose a writable folder") from None
