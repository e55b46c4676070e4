"""lowrank_bench: a Hydra-driven runner that reproduces and compares low-rank adaptation methods."""


def _version() -> str:
    """The version setuptools-scm wrote into the built package; from a checkout (an editable install, where that file
    is absent), the installed metadata's."""
    try:
        from lowrank_bench._build_info import version
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version as installed_version

        try:
            return installed_version("lowrank_bench")
        except PackageNotFoundError:
            return "0+unknown"  # the source tree on sys.path, never installed
    return version


__version__ = _version()
