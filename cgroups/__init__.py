"""Device-access mechanisms: cgroup v1 device allowlists and device-file ownership."""
