"""The one exception type for mistakes a person makes (bad config, missing or corrupt files).

The command line prints such an error as a single line naming the key or path, never a traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message names the config key or the file involved."""


class Interrupted(Exception):
    """A job stopped on SIGTERM (time limit, preemption) after writing a checkpoint."""


def require_package(module: str, package: str, extra: str, what: str) -> None:
    """A UserError naming ``what`` (a config key or file) unless ``module`` can be imported:
    it comes with ``package``, in the project's optional dependencies ``extra``."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs the package {package} (install it with `pip install -e '.[{extra}]'`, or `make {extra}`)")
