"""stages package of scan_dist."""
