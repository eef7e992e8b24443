"""The one exception type raised for bad user input at the boundaries."""


class RattaInputError(ValueError):
    """Bad input (file, key, argument). Its message is one line naming what is wrong and where."""
