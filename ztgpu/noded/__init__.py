"""The node agent ztgpu-noded: enforcement point for per-job GPU access."""
