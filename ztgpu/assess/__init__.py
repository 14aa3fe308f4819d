"""``ztgpu assess``: a node's zero-trust posture (facts, rules, checks, reports)."""
