"""How a config names research code: a built-in by its short name, anything else by import path.

    loss: dapo                       → the built-in class in the recipe's table
    loss: my_losses.MyLoss           → ``MyLoss`` from ./my_losses.py (or any importable module)
    rewards: [exact_match, my_rewards.score]

Losses (preference, policy, distillation) and reward functions are all looked up this way.
"""

from __future__ import annotations

import difflib
from typing import Any


def resolve(name: str, builtins: dict[str, Any], what: str) -> Any:
    """The object ``name`` refers to: ``builtins[name]``, or the object at import path ``name``.

    Args:
        name: A key of ``builtins`` or an import path ``package.module.Name``.
        builtins: Short names a config may use.
        what: The config key, for the error message (``loss``, ``rewards``).

    Raises:
        ConfigError: naming the key, for a name that is neither (with the closest short name), or an
            import path that does not import.
    """
    from tunesmith.training.config import ConfigError, import_object

    if name in builtins:
        return builtins[name]
    if "." in name:
        try:
            return import_object(name)
        except ConfigError as e:
            raise ConfigError(f"config key '{what}' = {name!r}: {e}") from None
    close = difflib.get_close_matches(name, list(builtins), n=1, cutoff=0.5)
    hint = f" — did you mean {close[0]}?" if close else ""
    raise ConfigError(f"config key '{what}' = {name!r} is not one of {', '.join(builtins)} nor an import path "
                      f"(my_module.Name){hint}")


def instantiate(cls: Any, args: dict[str, Any], key: str = "loss_args") -> Any:
    """``cls(**args)``; arguments the class does not take, or values it refuses (``ValueError``), are
    reported as a config error naming ``key``."""
    from tunesmith.training.config import ConfigError

    try:
        return cls(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key} {dict(args)} do not fit {getattr(cls, '__name__', cls)}: {e}") from None
