"""Slurm node Prolog/Epilog thin clients of ztgpu-noded (standard library only)."""
