"""One root exception for the suite, split into decisions and faults.

* ``Denied``: a decision the suite made on purpose (bad job input, policy).
  Expected; the node stays healthy.
* ``Fault``: something broke (config, hardware, cgroupfs, a daemon). The
  caller decides whether the node is unsafe.

``exit_code`` follows the suite's convention: 1 denied/findings, 2 usage or
configuration error.
"""

from __future__ import annotations


class ZtgpuError(Exception):
    """Root of every error the suite raises on purpose."""

    exit_code = 1


class Denied(ZtgpuError):
    """A request was refused by decision (not because something broke)."""


class InputRejected(Denied):
    """Input from outside (Slurm environment, socket request) is malformed."""


class Fault(ZtgpuError):
    """Something the suite depends on failed."""


class ConfigError(Fault):
    """The configuration file is missing, unreadable or invalid."""

    exit_code = 2


class UsageError(ZtgpuError):
    """The command line was used wrongly."""

    exit_code = 2


class GpuError(Fault):
    """The GPU backend (NVML or simulated inventory) failed."""


class CgroupError(Fault):
    """A cgroupfs operation failed."""


class DeviceError(Fault):
    """A device-file operation (stat, chown, chmod) failed."""


class SpoolError(Fault):
    """The durable audit spool could not be written or read."""


class SlurmError(Fault):
    """A Slurm command failed or timed out."""


class AgentUnreachable(Fault):
    """The node agent's socket could not be reached."""


class AgentBusy(Fault):
    """The node agent had no room for the request (it says to retry)."""
