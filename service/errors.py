"""Domain errors. They know nothing of gRPC: the servicer maps each one to a status code in one table."""


class ServiceError(Exception):
    """Base of the errors that a request can get back."""


class InvalidInput(ServiceError):
    """The request is malformed: its message says what was expected (INVALID_ARGUMENT)."""


class Overloaded(ServiceError):
    """The queue is full; the client should back off and retry (RESOURCE_EXHAUSTED)."""


class ModelNotReady(ServiceError):
    """No model is loaded, or the server is draining (UNAVAILABLE)."""


class BundleError(Exception):
    """A model bundle is missing a file or does not match its model.json; raised at start."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its rows ran (DEADLINE_EXCEEDED)."""


class DeviceError(Exception):
    """The execution device asked for (`--device cuda`) is not really in use; raised at start."""
