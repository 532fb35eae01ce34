from ..config import ConfigError


class DataError(ConfigError):
    """A data source that cannot be used; the message names it and the fix."""
