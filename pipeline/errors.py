"""Problems the user can fix. A stage turns any `UserError` into one line naming the key or file and
what would be valid, instead of a traceback; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Base of every error a stage reports as one line."""


class ConfigError(UserError, ValueError):
    """A params problem: which key, what was given, what is valid."""


class CorpusError(UserError, ValueError):
    """A corpus that cannot provide what the params ask for."""


class ModelStructureError(UserError, ValueError):
    """The model does not have the Llama block layout this pipeline prunes."""


class DatabaseError(UserError, ValueError):
    """A layer database that is corrupted on disk or was built for another model."""


class ResourceError(UserError, RuntimeError):
    """Not enough disk (or memory) for what the params ask."""


class ExportError(UserError, ValueError):
    """A model or tokenizer that an export format cannot hold exactly."""
