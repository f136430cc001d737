"""maml-runner: a Hydra-configured experiment runner for gradient-based meta-learning."""
import contextlib as _contextlib
import io as _io

__version__ = "0.1.0"

from . import schema as _schema  # noqa: E402,F401 - registers the config schemas with Hydra before any compose

# learn2learn imports the unmaintained `gym` package, which prints a multi-line deprecation banner on import.
with _contextlib.redirect_stderr(_io.StringIO()), _contextlib.redirect_stdout(_io.StringIO()):
    try:
        import gym as _gym  # noqa: F401
    except Exception:  # gym missing or broken: learn2learn's own import will report it
        pass
