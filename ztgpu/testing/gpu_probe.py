"""A job-side GPU probe shared by the integration tests, the demo and the bench.

``PROBE`` is a tiny script a job runs to try opening every GPU device node;
it prints one ``PROBE <label> nvidia0=<outcome> ...`` line, where an outcome
is ``open`` (allowed: ENXIO on a simulated node means the kernel let the open
reach the driver) or the errno name that refused it (EPERM: a devices cgroup;
EACCES: file ownership).
"""

from __future__ import annotations

from pathlib import Path

PROBE = r'''
import errno, glob, os, sys
label, devdir = sys.argv[1], sys.argv[2]
out = []
for path in sorted(glob.glob(os.path.join(devdir, "nvidia*"))):
    try:
        os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
        result = "open"
    except OSError as exc:
        result = "open" if exc.errno == errno.ENXIO else errno.errorcode[exc.errno]
    out.append(f"{os.path.basename(path)}={result}")
print("PROBE", label, " ".join(out), flush=True)
'''


def install_probe(work_dir: Path) -> Path:
    path = work_dir / "probe.py"
    path.write_text(PROBE)
    path.chmod(0o644)
    return path


def job_script(work_dir: Path, dev_dir: Path, hold_end: bool = False) -> str:
    """Probe from the batch step and an srun step, wait for ``go-<job>``, probe
    again; with *hold_end*, also wait for ``end-<job>`` before exiting."""
    end = (f"while [ ! -e {work_dir}/end-$SLURM_JOB_ID ]; do sleep 0.1; done\n"
           if hold_end else "")
    return f"""#!/bin/sh
python3 {work_dir}/probe.py batch {dev_dir}
srun -n1 python3 {work_dir}/probe.py step0 {dev_dir}
while [ ! -e {work_dir}/go-$SLURM_JOB_ID ]; do sleep 0.1; done
python3 {work_dir}/probe.py batch-late {dev_dir}
srun -n1 python3 {work_dir}/probe.py step1 {dev_dir}
{end}"""


def parse_probes(output: str) -> dict[str, dict[str, str]]:
    """``{label: {device: outcome}}`` from a job's output."""
    found = {}
    for line in output.splitlines():
        if line.startswith("PROBE "):
            _, label, *pairs = line.split()
            found[label] = dict(p.split("=", 1) for p in pairs)
    return found
