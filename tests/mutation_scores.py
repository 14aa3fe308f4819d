"""Print per-module mutation scores from mutmut 3's ``mutants/**/*.py.meta`` files.

Run from the directory mutmut ran in (``make mutation`` uses build/mutation).
Killed = killed, timeout or caught by type check (exit codes 1, 3, 24, 36,
37, 152, 255, -24); the score is killed / (all mutants that were checked).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KILLED = {1, 3, 24, 36, 37, 152, 255, -24}


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "mutants")
    rows = []
    for meta in sorted(root.rglob("*.py.meta")):
        codes = json.loads(meta.read_text("utf-8"))["exit_code_by_key"]
        checked = {k: v for k, v in codes.items() if v is not None}
        if not checked:
            continue
        killed = sum(1 for v in checked.values() if v in KILLED)
        survived = sorted(k for k, v in checked.items() if v not in KILLED)
        module = str(meta.relative_to(root)).removesuffix(".meta")
        rows.append((module, killed, len(checked), survived))
    for module, killed, total, _ in rows:
        print(f"{module:28} {killed:5}/{total:<5} {100 * killed / total:5.1f} %")
    for module, _, _, survived in rows:
        for name in survived:
            print(f"  survived: {name} ({module})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
