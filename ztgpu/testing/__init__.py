"""Test doubles and the real-Slurm test cluster harness."""
