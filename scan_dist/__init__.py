"""scan_dist: SCAN (Learning to Classify Images without Labels) from a laptop demo to a SLURM cluster."""

__version__ = "0.1.0"
