"""Every error phitune raises.

```
PhituneError
├── SpecError                  a job option is invalid; ``field`` names it
│   └── UnsupportedOptionError a backend cannot honour an option; ``field`` and ``backend`` name them
│       └── OfferRetiredError  the cloud retired that offer of the model; names the date and what is still open
├── DatasetError               a dataset is invalid; ``path`` and ``issues`` (each with its 1-based line)
├── NotFoundError              no such file / job / model / deployment
│   └── MissingContentError    the object is recorded, but its content (stored dataset, weights) is gone
├── ConflictError              the object is in a state that forbids the request
├── WontFitError               a job cannot fit the machine; carries the estimate and what would make it fit
├── MissingDependencyError     an optional extra is not installed
├── WaitTimeoutError           ``wait`` gave up before the job finished
├── StoreError                 the local home cannot be read or written (read-only, damaged, disk full, lost database)
└── APIError                   a remote service answered with an error
    ├── APIConnectionError     no answer (connection refused, reset, timed out)
    └── APIStatusError         an HTTP error status; ``status_code``
        ├── BadRequestError        400
        ├── AuthenticationError    401
        ├── PermissionDeniedError  403
        ├── RemoteNotFoundError    404 (also a NotFoundError)
        ├── RemoteConflictError    409 (also a ConflictError)
        ├── RateLimitError         429
        └── InternalServerError    >= 500
```

Warnings: :class:`OfferLifecycleWarning` (``warnings.warn``) when a job or deployment uses a legacy or deprecated
cloud offer.

Messages never carry secrets: anything that looks like a key or token is redacted by :func:`redact`. What a process
reports beyond itself (job errors and events, server answers) carries no file system path: :func:`scrub_paths`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .types import DatasetIssue

_SECRET_PATTERNS = [
    # key=value, "key": "value", key: value
    re.compile(
        r"(?i)\b(api[-_]?key|access[-_]?token|client[-_]?secret|secret|password|sig)([\"']?\s*[:=]\s*[\"']?)([^\s\"',&]+)"
    ),
    re.compile(r"(?i)(--api[-_]key[\s=]+)(\S+)"),  # command lines
    re.compile(r"(?i)(\bbearer\s+)([^\s\"',]+)"),  # Authorization: Bearer ...
]
_SHAPED_SECRETS = [
    re.compile(r"\beyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]*"),  # JWTs
    re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"),  # OpenAI-style keys
]


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """Replace known secrets and anything shaped like a credential in ``text`` with ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _SECRET_PATTERNS[0].sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    for pattern in _SECRET_PATTERNS[1:]:
        text = pattern.sub(lambda m: f"{m.group(1)}***", text)
    for pattern in _SHAPED_SECRETS:
        text = pattern.sub("***", text)
    return text


_PATH = re.compile(r"(?<![\w.~:/\\-])(?:~|/)[^\s'\"`:,;()<>\[\]{}|]*/([^\s'\"`:,;()<>\[\]{}|/]*)")
"""An absolute (or home-relative) path of at least two components; group 1 is its last component."""


def scrub_paths(text: str) -> str:
    """``text`` with every absolute path shortened to ``…/<last component>``: what a process reports beyond itself
    names no folder of its file system (homes, site-packages, caches)."""
    return _PATH.sub(lambda match: f"…/{match.group(1)}", text)


class PhituneError(Exception):
    """Base class of every phitune error."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))

    @property
    def message(self) -> str:
        """The message, with anything shaped like a secret redacted."""
        return str(self.args[0])


class SpecError(PhituneError, ValueError):
    """An option of a job, deployment or request is invalid. ``field`` is the dotted name to change."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class UnsupportedOptionError(SpecError):
    """The chosen backend cannot honour an option; raised before anything is sent."""

    def __init__(self, field: str, backend: str, message: str) -> None:
        self.backend = backend
        super().__init__(field, f"not supported by the {backend} backend: {message}")


class OfferRetiredError(UnsupportedOptionError):
    """The cloud retired this offer of the model (e.g. Azure's serverless fine-tuning of Phi-3); raised before any
    request is sent. ``retired_on`` is the date, ``replacement`` the suggested model, ``alternatives`` the ways to
    train this model that are still open."""

    def __init__(
        self,
        field: str,
        backend: str,
        message: str,
        *,
        retired_on: Any,
        replacement: str | None,
        alternatives: Sequence[str],
    ) -> None:
        self.retired_on = retired_on
        self.replacement = replacement
        self.alternatives = list(alternatives)
        super().__init__(field, backend, message)


class OfferLifecycleWarning(UserWarning):
    """A job or deployment uses a cloud offer that is legacy or deprecated: it works until its retirement date."""


class DatasetError(PhituneError, ValueError):
    """A dataset failed validation. ``path`` names the dataset (a local path, or a stored file's id and original
    filename); ``issues`` lists every problem found, each with its line number; ``fixes`` what would make it train."""

    def __init__(
        self, path: str, issues: Sequence[DatasetIssue], total: int | None = None, fixes: Sequence[str] = ()
    ) -> None:
        self.path = path
        self.issues = list(issues)
        self.fixes = list(fixes)
        total = len(self.issues) if total is None else total
        shown = "\n".join(f"  {path}:{i.line}: [{i.category}] {i.message}" for i in self.issues[:20])
        more = f"\n  ... and {total - 20} more" if total > 20 else ""
        remedies = "".join(f"\n  - {fix}" for fix in self.fixes)
        super().__init__(
            f"{path} has {total} problem(s):\n{shown}{more}" + (f"\nTo fix:{remedies}" if remedies else "")
        )


class NotFoundError(PhituneError, LookupError):
    """No object of that kind and id exists."""

    def __init__(self, kind: str, ident: str) -> None:
        self.kind = kind
        self.ident = ident
        super().__init__(f"no {kind} with id {ident!r}")


class MissingContentError(NotFoundError):
    """An object of the local home is recorded, but its content is gone from the disk (a dataset's stored copy, a
    fine-tuned model's weights). ``fix`` says what brings it back."""

    def __init__(self, kind: str, ident: str, what: str, fix: str) -> None:
        self.kind = kind
        self.ident = ident
        PhituneError.__init__(self, f"{what} of {kind} {ident} is missing from this home: {fix}")


class ConflictError(PhituneError):
    """The object's current state forbids the request (e.g. cancelling a finished job)."""


class WontFitError(PhituneError):
    """A job would not fit this machine's memory. ``estimate`` holds the numbers; ``suggestions`` what would fit."""

    def __init__(self, message: str, estimate: Any, suggestions: Sequence[str]) -> None:
        self.estimate = estimate
        self.suggestions = list(suggestions)
        tips = "".join(f"\n  - {s}" for s in self.suggestions)
        super().__init__(f"{message}{tips}")


class MissingDependencyError(PhituneError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, package: str, extra: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(f"{package} is not installed: pip install 'phitune[{extra}]'")


class WaitTimeoutError(PhituneError, TimeoutError):
    """``wait`` reached its timeout; the job keeps running."""


class StoreError(PhituneError):
    """The local home's database cannot be used: the home is read-only, the database is damaged or missing beside
    the home's data, the disk is full, or another process holds it locked too long. The message says what to do."""


class APIError(PhituneError):
    """A remote service answered with an error, or not at all."""


class APIConnectionError(APIError):
    """The service could not be reached."""


class APIStatusError(APIError):
    """The service answered with an HTTP error status."""

    def __init__(self, message: str, *, status_code: int, body: Any = None, request_id: str | None = None) -> None:
        self.status_code = status_code
        self.body = body
        self.request_id = request_id
        PhituneError.__init__(self, f"{status_code}: {message}")


class BadRequestError(APIStatusError):
    """400: the service refused the request as malformed or invalid."""


class AuthenticationError(APIStatusError):
    """401: the credential is missing, wrong or expired."""


class PermissionDeniedError(APIStatusError):
    """403: the credential may not do this."""


class RemoteNotFoundError(APIStatusError, NotFoundError):
    """404 from a service; also a :class:`NotFoundError`, so one ``except`` covers local and remote. ``kind`` and
    ``ident`` are what was asked for, where the caller knows them, else ``"resource"`` and the request's path."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: Any = None,
        request_id: str | None = None,
        kind: str = "resource",
        ident: str = "",
    ) -> None:
        self.kind = kind
        self.ident = ident
        APIStatusError.__init__(self, message, status_code=status_code, body=body, request_id=request_id)


class RemoteConflictError(APIStatusError, ConflictError):
    """409 from a service; also a :class:`ConflictError`."""


class RateLimitError(APIStatusError):
    """429: too many requests; retried with backoff, honouring ``Retry-After``."""


class InternalServerError(APIStatusError):
    """>= 500: the service failed."""


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: RemoteNotFoundError,
    409: RemoteConflictError,
    422: BadRequestError,
    429: RateLimitError,
}


def status_error(
    status_code: int,
    message: str,
    *,
    body: Any = None,
    request_id: str | None = None,
    kind: str = "resource",
    ident: str = "",
) -> APIStatusError:
    """The :class:`APIStatusError` subclass for an HTTP status code; ``kind`` and ``ident`` name what was asked for
    (kept by :class:`RemoteNotFoundError`)."""
    cls = _STATUS_ERRORS.get(status_code, InternalServerError if status_code >= 500 else APIStatusError)
    if cls is RemoteNotFoundError:
        return RemoteNotFoundError(
            message, status_code=status_code, body=body, request_id=request_id, kind=kind, ident=ident
        )
    return cls(message, status_code=status_code, body=body, request_id=request_id)
