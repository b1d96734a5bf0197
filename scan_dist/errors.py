"""User-facing errors: the CLI prints these as one line (no traceback) and exits with status 2."""


class ScanDistError(Exception):
    """Base class of every error a user can fix (bad setting, missing file, bad data)."""


class ConfigError(ScanDistError):
    """A configuration key or value is wrong; the message names the key."""


class DataError(ScanDistError):
    """Input data is missing, empty, unreadable or inconsistent; the message names the file or setting."""


class TrainingError(ScanDistError):
    """Training went wrong in a way a setting can fix (a loss or feature became NaN/inf); names stage and setting."""


class StorageError(ScanDistError):
    """A file could not be written (full disk, quota, read-only filesystem); names the file, keeps the old one."""
