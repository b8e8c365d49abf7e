"""qrun's exceptions. Each docstring is the default message; the CLI turns them into one-line errors."""


class QrunError(Exception):
    """qrun failed."""

    exit_code = 1

    def __init__(self, message: str | None = None):
        super().__init__(message or (self.__doc__ or "").strip())


class BadInput(QrunError):
    """Invalid input."""

    exit_code = 2


class JobNotFound(BadInput):
    """No such job."""


class TransitionError(QrunError):
    """The job is not in a state that allows this."""

    exit_code = 2


class SchemaTooNew(BadInput):
    """The database was written by a newer qrun."""


class JobLost(QrunError):
    """This worker no longer holds the job (cancelled, or its lease expired and it was requeued)."""
