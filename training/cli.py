"""``tune-run``: run a recipe with a config, list what is bundled, or copy a file out to edit.

    tune-run ls
    tune-run cp lora_single_device ./my_recipe.py
    tune-run RECIPE --config CONFIG [--dry-run] [key=value ...]
    tune-run RECIPE_distributed --config CONFIG --nproc-per-node 8 [--nnodes N --node-rank R
             --rdzv-endpoint HOST:PORT] [--dry-run] [key=value ...]

RECIPE is a bundled recipe name or a path to a ``.py`` file; CONFIG is a bundled config name or a
path to a YAML file. A recipe file defines a ``Config`` dataclass (its options, typed, with defaults)
and ``main(cfg)``; that is the whole contract, so a copied and edited recipe runs the same way.

User mistakes (unknown key, wrong type or range, a path that does not exist, malformed data, a
checkpoint that does not fit) end with exit code 2 and a message naming the file / line / key and
what to do, not a traceback. Only the typed errors that our checks raise count as user mistakes
(``ConfigError``, ``DataError``, ``CheckpointError``, ...; see ``user_errors``): anything else is a
bug and keeps its traceback (exit 1).

Recipes whose ``Config`` has the FSDP options (``training/options.py:ShardingOptions``) run under
torchrun; only they accept the launch flags (``--nproc-per-node`` ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

from tunesmith.training.config import ConfigError, build_config, check_environment, load_yaml, to_yaml
from tunesmith.training.options import ShardingOptions
from tunesmith.training.sources import check_device_available

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
# torchrun flags we pass through unchanged (multi-node launches)
LAUNCH_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-backend", "--rdzv-id",
                "--master-addr", "--master-port")

USAGE = """usage:
  tune-run ls                                   list bundled recipes and configs
  tune-run cp NAME DEST                         copy a bundled recipe or config out to edit
  tune-run RECIPE --config CONFIG [--dry-run] [key=value ...]
  tune-run RECIPE --config CONFIG --nproc-per-node N [--nnodes N --node-rank R --rdzv-endpoint H:P] [key=value ...]"""


def bundled_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.py") if not p.name.startswith("_"))


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def own_file_values(config_cls: type, values: dict) -> dict:
    """A training run's config file as a recipe that reads one (``generate``, ``eval``) takes it: the
    training options it does not declare (``lr``, ``lora``, ``data``, … — keys some bundled training
    recipe declares) are dropped; its own keys and any other key are kept, so a typo is still reported."""
    own = {f.name for f in dataclasses.fields(config_cls)}
    training = {f.name for name in bundled_recipes() for f in dataclasses.fields(load_recipe(name).Config)
                if not getattr(load_recipe(name).Config, "reads_training_configs", False)}
    return {k: v for k, v in values.items() if k in own or k not in training}


def _unknown(kind: str, name: str, choices: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f" — did you mean {close[0]}?" if close else ""
    return ConfigError(f"no {kind} named '{name}'{hint} (`tune-run ls` lists them; a path to a file works too)")


def load_recipe(name_or_path: str) -> ModuleType:
    """Import a bundled recipe by name, or a recipe ``.py`` file by path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"tunesmith_user_recipe_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses need the module registered
        spec.loader.exec_module(module)
    elif name_or_path in bundled_recipes():
        module = importlib.import_module(f"tunesmith.recipes.{name_or_path}")
    else:
        raise _unknown("recipe", name_or_path, bundled_recipes())
    if not dataclasses.is_dataclass(getattr(module, "Config", None)) or not callable(getattr(module, "main", None)):
        raise ConfigError(f"{name_or_path} is not a recipe: it must define a `Config` dataclass and `main(cfg)`")
    return module


def resolve_config_path(name_or_path: str) -> Path:
    """A bundled config name (``smollm2_135m``) or a YAML path."""
    path = Path(name_or_path)
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder; give a YAML file or a bundled config name")
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    if name_or_path in bundled_configs():
        return CONFIGS_DIR / f"{name_or_path}.yaml"
    raise _unknown("config", name_or_path, bundled_configs())


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user's input is wrong" (exit 2, no traceback).

    Each is raised where an input is checked, with a message naming the file / key and what to
    do. A bare ``FileNotFoundError`` / ``ValueError`` is NOT one of them: from anywhere else it is
    a bug and shows its traceback.
    """
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    from tunesmith.data.datasets import DataError
    from tunesmith.data.tokenizer import TemplateError, TokenizerError
    from tunesmith.models.hf_checkpoint import CheckpointFormatError
    from tunesmith.models.lora import LoRATargetError
    from tunesmith.training.checkpointing import CheckpointError

    hub = (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError)  # no such repo, gated (HF_TOKEN), offline
    return (ConfigError, DataError, CheckpointError, CheckpointFormatError, LoRATargetError, TemplateError,
            TokenizerError, *hub)


OPTIONS = ("--config", "--dry-run", *LAUNCH_FLAGS)


_LAUNCH_VALUES = {  # flag → (accepted values, an example)
    "--nproc-per-node": (r"[1-9]\d*|auto|cpu|gpu", "8"),
    "--nnodes": (r"[1-9]\d*(:[1-9]\d*)?", "2"),
    "--node-rank": (r"\d+", "0"),
    "--master-port": (r"\d+", "29500"),
    "--rdzv-endpoint": (r"[^\s:]+(:\d+)?", "host0:29500"),
}


def _launch_value(flag: str, value: str) -> str:
    """Check a torchrun flag's value here, so a typo is a clear error rather than torchrun's traceback."""
    pattern, example = _LAUNCH_VALUES.get(flag, (r".+", "VALUE"))
    if value.startswith("-") or not re.fullmatch(pattern, value):
        raise ConfigError(f"{flag} {value!r} is not a valid value (e.g. {flag} {example})")
    return value


def _split_args(args: list[str]) -> tuple[str | None, bool, list[str], list[str]]:
    """→ (config, dry_run, launch flags for torchrun, key=value overrides)."""
    config, dry_run, launch, overrides = None, False, [], []
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, inline = arg.partition("=")
        if flag == "--config":
            if config is not None:
                raise ConfigError("--config is given twice; give one config (override single keys with key=value)")
            if not eq and (i + 1 >= len(args) or args[i + 1].startswith("-")):
                raise ConfigError("--config needs a value: a bundled config name or a YAML path")
            config, i = (inline, i + 1) if eq else (args[i + 1], i + 2)
        elif arg == "--dry-run":
            dry_run, i = True, i + 1
        elif flag.replace("_", "-") in LAUNCH_FLAGS:
            name = flag.replace("_", "-")
            if eq:
                launch += [name, _launch_value(name, inline)]
                i += 1
            else:
                if i + 1 >= len(args):
                    raise ConfigError(f"{arg} needs a value")
                launch += [name, _launch_value(name, args[i + 1])]
                i += 2
        elif arg.startswith("-"):
            close = difflib.get_close_matches(flag, OPTIONS, n=1, cutoff=0.6)
            hint = f" — did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown option {arg}{hint}\n{USAGE}")
        else:
            overrides.append(arg)
            i += 1
    return config, dry_run, launch, overrides


def launch_world_size(launch: list[str]) -> int:
    """Processes a launch starts: ``--nproc-per-node`` × ``--nnodes`` (1 without them; the smaller
    bound of an elastic ``--nnodes MIN:MAX``).

    Raises:
        ConfigError: a value that is not a whole number (``--nproc-per-node auto``).
    """
    values = dict(zip(launch[::2], launch[1::2]))
    try:
        nproc = int(values.get("--nproc-per-node", "1"))
        nnodes = int(values.get("--nnodes", "1").split(":")[0])
    except ValueError:
        raise ConfigError(f"--nproc-per-node and --nnodes must be whole numbers here (e.g. --nproc-per-node 8); "
                          f"got {values.get('--nproc-per-node')!r} and {values.get('--nnodes')!r}") from None
    return nproc * nnodes


@contextlib.contextmanager
def _as_launched(launch: list[str]) -> Iterator[None]:
    """While the config is checked before a torchrun launch, ``WORLD_SIZE`` says how many processes
    the launch will start (as torchrun will tell each of them), so rules like "batch_size is a
    multiple of the process count" (``ShardingOptions.validate``) are checked once, here, instead of
    failing in every process. ``--nproc-per-node auto`` leaves the count to torchrun."""
    try:
        world = launch_world_size(launch) if launch else None
    except ConfigError:
        world = None
    if world is None:
        yield
        return
    before = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world)
    try:
        yield
    finally:
        if before is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = before


def run(recipe: str, args: list[str]) -> int:
    """Resolve recipe + config + overrides, check them, then dry-run, launch under torchrun, or call ``main``."""
    config, dry_run, launch, overrides = _split_args(args)
    if config is None:
        raise ConfigError(f"missing --config: name a bundled config (`tune-run ls`) or a YAML file\n{USAGE}")
    module = load_recipe(recipe)
    if launch and not issubclass(module.Config, ShardingOptions):
        raise ConfigError(f"{recipe} runs in one process; {' '.join(launch[::2])} needs a distributed recipe "
                          "(lora_distributed, qlora_distributed, dpo_distributed, full_finetune_distributed)")
    config_path = resolve_config_path(config)
    values = load_yaml(config_path)
    if getattr(module.Config, "reads_training_configs", False):  # generate, eval: a training run's config file
        values = own_file_values(module.Config, values)
    with _as_launched(launch):
        cfg = build_config(module.Config, values, overrides, yaml_name=str(config_path))
        check_environment(cfg)
        if not dry_run and hasattr(cfg, "device"):  # --dry-run plans for another machine (device=cuda on a laptop)
            check_device_available(cfg.device)
    if dry_run:
        print(to_yaml(cfg), end="")
        if hasattr(module, "estimate_memory"):
            takes_world = "world_size" in inspect.signature(module.estimate_memory).parameters
            print(module.estimate_memory(cfg, world_size=launch_world_size(launch)) if takes_world
                  else module.estimate_memory(cfg))
        return 0
    if launch:
        recipe_file = Path(module.__file__ or "")
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch, str(recipe_file), "--config",
               str(config_path), *overrides]
        return subprocess.call(cmd)
    module.main(cfg)
    return 0


def run_file(recipe_file: str, argv: list[str] | None = None) -> int:
    """Entry point for ``python recipe.py --config X`` and ``torchrun recipe.py --config X``."""
    return main([recipe_file, *(sys.argv[1:] if argv is None else argv)])


def copy_out(name: str, dest: str) -> int:
    """``tune-run cp``: copy a bundled recipe or config to ``dest`` for editing; never overwrites."""
    if name in bundled_recipes():
        src = RECIPES_DIR / f"{name}.py"
    elif name in bundled_configs():
        src = CONFIGS_DIR / f"{name}.yaml"
    else:
        raise _unknown("recipe or config", name, bundled_recipes() + bundled_configs())
    target = Path(dest)
    if target.is_dir():
        target = target / src.name
    if target.exists():
        raise ConfigError(f"{target} already exists; choose another destination (tune-run cp never overwrites)")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    print(f"copied {src.name} to {target}")
    if src.suffix == ".py":
        print(f"run it with: tune-run {target} --config <config>")
    else:
        print(f"run with it: tune-run <recipe> --config {target}")
    return 0


def list_bundled() -> int:
    print("recipes:")
    for name in bundled_recipes():
        doc = (RECIPES_DIR / f"{name}.py").read_text().split('"""')
        summary = doc[1].strip().splitlines()[0] if len(doc) > 1 else ""
        print(f"  {name:<28} {summary}")
    print("configs:")
    for name in bundled_configs():
        first = (CONFIGS_DIR / f"{name}.yaml").read_text().splitlines()
        summary = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        print(f"  {name:<28} {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``tune-run``: exit 0 on success, 2 on a user error (one message, no traceback), 130 on Ctrl-C."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        if argv[0] == "ls":
            if len(argv) != 1:
                raise ConfigError(f"ls takes no arguments\n{USAGE}")
            return list_bundled()
        if argv[0] == "cp":
            if len(argv) != 3:
                raise ConfigError(f"cp takes NAME and DEST\n{USAGE}")
            return copy_out(argv[1], argv[2])
        return run(argv[0], argv[1:])
    except user_errors() as e:
        print(f"tune-run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tune-run: interrupted; the last complete checkpoint in output_dir is intact (resume=true)",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tune-run ls | head -3`: the reader left; stop quietly, as a shell tool does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 141


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
