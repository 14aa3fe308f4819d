"""Controller-side Slurm integration (PrologSlurmctld job gate). Arrives with the MFA issue."""
