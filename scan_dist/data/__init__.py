"""data package of scan_dist."""
