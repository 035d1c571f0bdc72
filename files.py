"""Every file written whole or not at all (temporary name, fsync, rename); debris of killed runs removed; output
paths and free space checked before any long work; one writer per folder (an flock the OS drops when its holder
dies, so a killed run never blocks its own resume)."""
import contextlib
import errno
import fcntl
import hashlib
import math
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
    except (OSError, RuntimeError) as e:  # RuntimeError: torch's zip writer, which masks a full disk's OSError
        raise write_error(path, e) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_error(path, e):
    """The one-line RunError for a failed write (a full disk, a read-only folder); any other error as it is."""
    cause = e if isinstance(e, OSError) else e.__context__
    if not isinstance(cause, OSError):
        return e
    return RunError(f"cannot write {path} ({first_line(cause)}); free disk space or choose a writable folder "
                    "(the previous file, if any, is unchanged)")


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
        raise RunError(f"cannot write {dst} ({first_line(e)}); free disk space or choose a writable --out-dir") \
            from None
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


def sha256_of(files):
    """sha256 of the files' bytes in order, streamed; an entry (path, n) contributes only its first n bytes."""
    h = hashlib.sha256()
    for entry in files:
        path, left = entry if isinstance(entry, tuple) else (entry, math.inf)
        with open(path, "rb") as f:
            while left > 0 and (block := f.read(int(min(1 << 22, left)))):
                h.update(block)
                left -= len(block)
    return h.hexdigest()


def check_free_space(folder, need, what):
    """Fail now, writing nothing, if the disk of folder (or its nearest existing parent) has under `need` bytes free."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise RunError(f"{what} needs {size(need)} but {path} has {size(free)} free; free disk space, choose another "
                       "folder, or lower the size")


def size(n):
    """Bytes in words: '1.3 GB', '180.3 kB', '56 bytes'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


def allocate(fd, n):
    """Reserve the disk blocks of the first n bytes of an open file (no holes): a full disk is an OSError now, not a
    SIGBUS when a memory map of the file is written later. A no-op where the filesystem cannot do it."""
    try:
        os.posix_fallocate(fd, 0, n)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    except AttributeError:  # no posix_fallocate (macOS)
        pass


# ----- One writer per folder -----

def lock_folder(folder, what="--out-dir"):
    """An exclusive flock on the folder, held until unlock(fd) or the process ends (the OS drops it then)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise in_use(fd, folder, what) from None
    return fd


def in_use(fd, folder, what):
    os.close(fd)
    return RunError(f"{what} {folder} is in use by another run (pid {lock_holder(folder)}); wait for it to end or "
                    "stop it, or pick another folder")


def lock_holder(folder):
    """The pid holding the flock on folder, from /proc/locks (Linux), else 'unknown'."""
    st = os.stat(folder)
    node = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "FLOCK" in parts and node in parts:
                    return parts[parts.index(node) - 1]
    except OSError:
        pass
    return "unknown"


def unlock(fd):
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def locked(folder, what):
    """lock_folder for the length of a with block."""
    fd = lock_folder(folder, what)
    try:
        yield
    finally:
        unlock(fd)
