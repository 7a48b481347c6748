"""``tune-run``: run a recipe with a config, list what is bundled, or copy a file out to edit.

    tune-run ls
    tune-run cp lora_single_device ./my_recipe.py
    tune-run RECIPE --config CONFIG [--dry-run] [key=value ...]
    tune-run full_finetune_distributed --config CONFIG --nproc-per-node 8 [--nnodes N --node-rank R
             --rdzv-endpoint HOST:PORT] [key=value ...]

RECIPE is a bundled recipe name or a path to a ``.py`` file; CONFIG is a bundled config name or a
path to a YAML file. A recipe file defines a ``Config`` dataclass (its options, typed, with defaults)
and ``main(cfg)``; that is the whole contract, so a copied and edited recipe runs the same way.

User mistakes (unknown key, wrong type, malformed data, a checkpoint that does not fit) end with
exit code 2 and a one-paragraph message, not a traceback.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tunesmith.training.config import ConfigError, build_config, load_yaml, to_yaml

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
    if not hasattr(module, "Config") or not hasattr(module, "main"):
        raise ConfigError(f"{name_or_path} is not a recipe: it must define a `Config` dataclass and `main(cfg)`")
    return module


def resolve_config_path(name_or_path: str) -> Path:
    """A bundled config name (``smollm2_135m``) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    if name_or_path in bundled_configs():
        return CONFIGS_DIR / f"{name_or_path}.yaml"
    raise _unknown("config", name_or_path, bundled_configs())


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user's input is wrong" (exit 2, no traceback)."""
    from tunesmith.data.datasets import DataError
    from tunesmith.data.tokenizer import TemplateError
    from tunesmith.models.hf_checkpoint import CheckpointFormatError
    from tunesmith.training.checkpointing import CheckpointError

    return (ConfigError, DataError, CheckpointError, CheckpointFormatError, TemplateError, FileNotFoundError)


def _split_args(args: list[str]) -> tuple[str | None, bool, list[str], list[str]]:
    """→ (config, dry_run, launch flags for torchrun, key=value overrides)."""
    config, dry_run, launch, overrides = None, False, [], []
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, inline = arg.partition("=")
        if arg == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a value: a bundled config name or a YAML path")
            config, i = args[i + 1], i + 2
        elif flag == "--config" and eq:
            config, i = inline, i + 1
        elif arg == "--dry-run":
            dry_run, i = True, i + 1
        elif flag.replace("_", "-") in LAUNCH_FLAGS:
            if eq:
                launch += [flag.replace("_", "-"), inline]
                i += 1
            else:
                if i + 1 >= len(args):
                    raise ConfigError(f"{arg} needs a value")
                launch += [flag.replace("_", "-"), args[i + 1]]
                i += 2
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg}\n{USAGE}")
        else:
            overrides.append(arg)
            i += 1
    return config, dry_run, launch, overrides


def run(recipe: str, args: list[str]) -> int:
    """Resolve recipe + config + overrides, then dry-run, launch under torchrun, or call ``main``."""
    config, dry_run, launch, overrides = _split_args(args)
    if config is None:
        raise ConfigError(f"missing --config: name a bundled config (`tune-run ls`) or a YAML file\n{USAGE}")
    module = load_recipe(recipe)
    config_path = resolve_config_path(config)
    values = load_yaml(config_path)
    if hasattr(module, "config_file_values"):  # a recipe that reads another recipe's config file (eval)
        values = module.config_file_values(values)
    cfg = build_config(module.Config, values, overrides, yaml_name=str(config_path))
    if dry_run:
        print(to_yaml(cfg), end="")
        if hasattr(module, "estimate_memory"):
            print(module.estimate_memory(cfg))
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
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        if argv[0] == "ls":
            return list_bundled()
        if argv[0] == "cp":
            if len(argv) != 3:
                raise ConfigError(f"cp takes NAME and DEST\n{USAGE}")
            return copy_out(argv[1], argv[2])
        return run(argv[0], argv[1:])
    except _user_errors() as e:
        print(f"tune-run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tune-run: interrupted; the last complete checkpoint in output_dir is intact (resume=true)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
