"""ztgpu: zero-trust, per-job least-privilege GPU access for Slurm."""

__version__ = "0.1.0"
