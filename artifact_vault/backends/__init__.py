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
    raise KeyError(type_name)
