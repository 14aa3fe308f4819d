"""ztgpu-authd: MFA sessions, central policy, signed per-job grants, revocation."""
