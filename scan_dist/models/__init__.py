"""models package of scan_dist."""
