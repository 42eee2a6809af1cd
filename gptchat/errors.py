"""User-facing errors.

Anything a user can cause (a missing file, a bad flag value, a prompt that does not fit) raises a
GptchatError subclass with a one-line message; the CLI prints it without a traceback and the server
turns it into an OpenAI error object.
"""


class GptchatError(Exception):
    """Base class: the message is shown to the user as it is."""


class ModelLoadError(GptchatError):
    """The path is missing, not a model, or a model of a kind we cannot load."""


class InvalidParameterError(GptchatError, ValueError):
    """A generation or CLI parameter is out of range. `param` names it (for the API's error object)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class ContextLengthError(GptchatError):
    """The prompt (plus the requested new tokens) cannot fit in the model's context."""

    def __init__(self, message: str, prompt_tokens: int = 0, context_length: int = 0):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length
