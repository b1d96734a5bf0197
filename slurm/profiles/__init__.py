"""Cluster profiles for `--nodes` (installed as scan_dist.slurm_profiles; the YAML files are the content)."""
