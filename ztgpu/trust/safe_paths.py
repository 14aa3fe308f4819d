"""Paths that root executes or trusts must not be changeable by anyone else.

A root-run hook in a world-writable directory can be replaced by any user
(seen: another user replaced an installed ``prolog``). The check walks from
the path up to ``/``: every existing component must be owned by root (or by
the user running the check) and writable by nobody else, except a sticky
world-writable directory such as ``/tmp``, where others cannot rename or
remove entries they do not own, as long as the entry below it is root's.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ztgpu.errors import ConfigError


def untrusted_component(path: Path) -> str | None:
    """Why ``path`` (or a directory above it) could be changed by another user, or None.

    Components that do not exist yet are skipped: whoever creates them (the
    installer, the agent) makes them as root with a safe mode.
    """
    trusted = {0, os.geteuid()}
    current = Path(os.path.abspath(path))
    chain = [current, *current.parents]
    below_owner: int | None = None
    for component in chain:
        try:
            st = os.lstat(component)
        except FileNotFoundError:
            continue
        except OSError as exc:
            return f"{component}: cannot be checked ({exc.strerror})"
        if stat.S_ISLNK(st.st_mode):
            # Follow a link only if the link itself sits in a trusted directory
            # (checked on the way up) and points at a trusted place.
            target = Path(os.path.realpath(component))
            problem = untrusted_component(target)
            if problem is not None:
                return f"{component} links to {target}, and {problem}"
            below_owner = 0
            continue
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid not in trusted:
            return f"{component} is owned by uid {st.st_uid}, not root"
        writable_by_others = mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable_by_others:
            sticky_dir = stat.S_ISDIR(st.st_mode) and mode & stat.S_ISVTX
            if not (sticky_dir and below_owner in trusted and component != current):
                who = "others" if mode & stat.S_IWOTH else "its group"
                return f"{component} is writable by {who} (mode {mode:04o})"
        below_owner = st.st_uid
    return None


def require_trusted(path: Path, what: str) -> None:
    """ConfigError naming ``what``, the component and the fix if ``path`` is not safe."""
    problem = untrusted_component(path)
    if problem is not None:
        raise ConfigError(f"{what} {path} is not safe for root to use: {problem}; make every "
                          "directory on the way root-owned and writable only by root "
                          "(chown root; chmod go-w)")
