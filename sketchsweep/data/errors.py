"""The one error type of the data layer, in a module of its own so every data module can raise it."""

from sketchsweep.cli import UserError


class DataError(UserError):
    """The data on disk (or a data setting) is not what sketchsweep expects; the message names the
    file or key and what was expected."""
