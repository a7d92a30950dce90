class ConfigError(ValueError):
    """A configuration or input the framework refuses: the message names what is wrong and what is allowed."""
