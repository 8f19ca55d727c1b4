"""Exceptions raised on bad user input; the CLI prints their message and exits 2."""


class WidthSearchError(Exception):
    """Base class: a problem the user can fix (bad source, path, profile or config)."""


class ModelSourceError(WidthSearchError):
    """Unknown model source, unimportable factory or unusable checkpoint."""


class CheckpointError(ModelSourceError):
    """A checkpoint that is missing, corrupt or does not fit the model."""


class DataSourceError(WidthSearchError):
    """Unknown data source, missing path or malformed arrays."""


class ProfileError(WidthSearchError):
    """A width profile that does not fit its WidthSpace."""


class ConfigError(WidthSearchError):
    """A search configuration with an unknown key or a bad value."""


class StorageError(WidthSearchError):
    """A storage (folder or URI) that cannot be written."""
