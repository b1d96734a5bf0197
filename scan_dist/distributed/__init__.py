"""dist package of scan_dist."""
