"""Backend types: the policy of each kind of upstream over the shared flow in `base`."""


def backend_class(type_name: str):
    if type_name == "http":
        from .http import HttpBackend

        return HttpBackend
    if type_name == "huggingface":
        from .huggingface import HuggingFaceBackend

        return HuggingFaceBackend
    if type_name == "pypi":
        from .pypi import PyPIBackend

        return PyPIBackend
    if type_name == "apt":
        from .apt import AptBackend

        return AptBackend
    if type_name == "oci":
        from .oci import OciBackend

        return OciBackend
    raise KeyError(type_name)


def routers(backends) -> list:
    """Root routers for requests that no prefix describes: ``/v2/`` for the oci backends."""
    found = []
    oci = [b for b in backends if b.config.type == "oci"]
    if oci:
        from .oci import OciRouter

        found.append(OciRouter(oci))
    return found
