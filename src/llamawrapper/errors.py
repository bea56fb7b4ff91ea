"""The exception tree every layer raises; the server maps these types to HTTP statuses.

    LlamaWrapperError                      base of everything raised on purpose
    ├── ModelError
    │   ├── ModelNotFoundError             unknown alias, missing path, hub unreachable and not cached
    │   ├── InvalidModelError              the file or folder is not a loadable model
    │   ├── UnsupportedModelError          an architecture the engine cannot run
    │   ├── ModelConflictError             an admin change that clashes with the model's state
    │   │   └── ModelHashMismatchError     the source's sha256 differs from the pin (names both)
    │   └── ModelUnavailableError          the model is loading, or failed to load; retry later
    ├── InvalidRequestError                bad parameter or message; ``param`` names it
    │   └── ContextLengthExceededError     prompt + max_tokens > the model's context
    ├── QueueFullError                     admission refused: the engine's queue is full
    ├── RequestCancelledError              the request was cancelled before it finished
    ├── GenerationError                    processing of one request failed inside the engine
    ├── PluginError                        a plugin hook raised; ``hook`` and ``plugin`` name it
    │   └── PluginRejectedError            ...as invalid input (also an InvalidRequestError → 400)
    └── SecurityError                      keys, limits, audit, encryption (``llamawrapper.security``)
        ├── AuthenticationError            no key, bad header, unknown/revoked/expired key → 401
        ├── PermissionDeniedError          a key outside its scopes (non-admin on /admin) → 403
        ├── KeyNotFoundError               no stored key with that id → 404
        ├── RateLimitError                 over rpm / tpm / max_parallel → 429 + Retry-After
        ├── StateUnavailableError          Redis unreachable; limited keys fail closed → 503
        └── EncryptionKeyError             encrypted data without the right key; refused at start
"""

from __future__ import annotations


class LlamaWrapperError(Exception):
    """Base class of every error LlamaWrapper raises on purpose."""


class ModelError(LlamaWrapperError):
    """A model could not be found, read or run."""


class ModelNotFoundError(ModelError):
    """An alias, path or hub id that resolves to no model."""


class InvalidModelError(ModelError):
    """A file or folder that exists but is not a loadable model."""


class UnsupportedModelError(ModelError):
    """A model whose architecture the engine does not run."""


class ModelConflictError(ModelError):
    """An admin change that clashes with the model's state (a version already loading, nothing to
    promote)."""


class ModelHashMismatchError(ModelConflictError):
    """A source whose sha256 differs from the pinned one; both are named."""

    def __init__(self, source: str, expected: str, actual: str) -> None:
        super().__init__(f"The sha256 of '{source}' is {actual}, but the pin says {expected}.")
        self.source, self.expected, self.actual = source, expected, actual


class ModelUnavailableError(ModelError):
    """The model exists but cannot serve now (loading, or its only version failed); retry later."""


class InvalidRequestError(LlamaWrapperError):
    """A request with a bad parameter or message. ``param`` names the culprit."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthExceededError(InvalidRequestError):
    """The prompt plus the requested completion does not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context_length} tokens, but the request "
            f"asks for {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_tokens} for the completion).",
            param="messages",
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length


class QueueFullError(LlamaWrapperError):
    """The engine's queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str = "The engine's request queue is full.", retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestCancelledError(LlamaWrapperError):
    """The request was cancelled before it finished."""


class GenerationError(LlamaWrapperError):
    """Processing one request failed inside the engine; other requests were not affected."""


class PluginError(LlamaWrapperError):
    """A plugin hook raised while handling one request; ``hook`` and ``plugin`` name it."""

    def __init__(self, message: str, hook: str, plugin: str) -> None:
        super().__init__(message)
        self.hook = hook
        self.plugin = plugin


class PluginRejectedError(InvalidRequestError, PluginError):
    """A plugin hook refused the request as invalid (for example the input length guard)."""

    def __init__(self, message: str, hook: str, plugin: str, param: str | None = None) -> None:
        Exception.__init__(self, message)  # both parents' __init__ chain through super(); set fields here
        self.param = param
        self.hook = hook
        self.plugin = plugin


class SecurityError(LlamaWrapperError):
    """Keys, limits, audit and encryption: the base of the errors below."""


class AuthenticationError(SecurityError):
    """No key, a malformed ``Authorization`` header, or an unknown, revoked or expired key (401)."""

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


class PermissionDeniedError(SecurityError):
    """A valid key asking for what its scopes do not allow, such as a non-admin key on ``/admin`` (403)."""


class KeyNotFoundError(SecurityError):
    """No stored key has this id (404)."""


class RateLimitError(SecurityError):
    """A key over its ``rpm``, ``tpm`` or ``max_parallel``; retry after ``retry_after`` seconds (429)."""

    def __init__(self, message: str, retry_after: float, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = headers or {}


class StateUnavailableError(SecurityError):
    """The shared state (Redis) is unreachable: limited keys fail closed (503)."""


class EncryptionKeyError(SecurityError):
    """Encrypted data and a missing, malformed or wrong ``encryption_key``; refused at start."""
