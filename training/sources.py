"""What a model, tokenizer, data, chat-template or output option may name, checked against the disk.

Each check is a ``PathCheck`` a config option declares (see training/options.py). They run before
anything loads (``check_environment``), read at most a config.json or a file header, and raise
``ConfigError(reason)``; the caller prefixes the key and the value. Hub ids (``owner/name``) are
accepted as they are: whether they exist is only known when they are downloaded.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from pathlib import Path

from tunesmith.training.config import ConfigError

PACKAGE_PREFIX = "package:"
DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def looks_like_hub_id(value: str) -> bool:
    """``owner/name`` that is not meant as a local path: ``./x/y``, ``/x``, ``~/x`` are paths, and so
    is ``x/y`` when a local folder ``x`` exists."""
    if not _HUB_ID.fullmatch(value) or value.startswith((".", "/", "~")):
        return False
    return not Path(value).exists() and not Path(value.split("/")[0]).is_dir()


def _package_file(value: str) -> Path | None:
    """The file a ``package:MODULE/FILE`` source names (not imported), or None for ``package:MODULE``."""
    module, _, filename = value[len(PACKAGE_PREFIX):].partition("/")
    try:
        spec = importlib.util.find_spec(module) if module else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ConfigError(f"the Python package '{module}' is not installed (see the README's setup command)")
    if not filename:
        return None
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ConfigError(f"package '{module}' has no file {filename}")
    return path


def _missing(value: str, what: str) -> ConfigError:
    return ConfigError(f"no such file or folder (and not a Hub repo id 'owner/name'); give {what}")


def check_model_source(value: str) -> None:
    """A model: an HF folder (config.json with a supported model_type + safetensors), a ``.gguf``
    file, ``package:MODULE[/FILE]`` or a Hub repo id."""
    what = "a model folder (config.json + *.safetensors), a .gguf file or a Hub repo id"
    if value.startswith(PACKAGE_PREFIX):
        path = _package_file(value)
        if path is not None and path.suffix != ".gguf":
            raise ConfigError(f"{path} is not a .gguf file")
        return
    path = Path(value).expanduser()
    if path.is_dir():
        from tunesmith.models.hf_checkpoint import CheckpointFormatError, read_config, safetensors_files

        if not (path / "config.json").is_file():
            hint = " (it has adapter_config.json: a PEFT adapter goes in adapter=, its base model in model=)" \
                if (path / "adapter_config.json").is_file() else ""
            raise ConfigError(f"the folder has no config.json, so it is not a Hugging Face model folder{hint}")
        try:
            read_config(path)
            safetensors_files(path)
        except CheckpointFormatError as e:
            raise ConfigError(str(e)) from None
        except ValueError as e:  # config.json that is not JSON
            raise ConfigError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    elif path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(f"this is a file, not a model: give {what}")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ConfigError("this file is not a GGUF file (it does not start with the GGUF magic bytes)")
    elif value.endswith(".gguf") or not looks_like_hub_id(value):
        raise _missing(value, what)


def check_tokenizer_source(value: str) -> None:
    """A tokenizer: a folder with tokenizer.json / tokenizer.model, a ``.gguf`` or ``.model`` file,
    ``package:MODULE/FILE`` or a Hub repo id."""
    what = "a folder with tokenizer.json or tokenizer.model, a .gguf / .model file or a Hub repo id"
    if value.startswith(PACKAGE_PREFIX):
        _package_file(value)
        return
    path = Path(value).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ConfigError(f"the folder has no {' or '.join(TOKENIZER_FILES)}")
    elif path.is_file():
        if path.suffix not in (".gguf", ".model"):
            raise ConfigError(f"this file is not a tokenizer: give {what}")
    elif not looks_like_hub_id(value):
        raise _missing(value, what)


def check_model_has_tokenizer(model: str, tokenizer: str | None) -> None:
    """With ``tokenizer`` unset the tokenizer is read from ``model``: a local model folder must hold one."""
    path = Path(model).expanduser()
    if tokenizer is None and path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"config key 'model' = {model!r}: the model folder has no {' or '.join(TOKENIZER_FILES)}; "
                          "name where the tokenizer is with tokenizer=PATH_OR_HUB_ID")


def check_data_source(value: str) -> None:
    """Data: a ``.json``/``.jsonl``(``.gz``)/``.parquet`` file, a dataset folder, ``package:``, or a Hub id."""
    what = "a .json/.jsonl/.parquet file, a dataset folder or a Hub dataset id"
    if value.startswith(PACKAGE_PREFIX):
        path = _package_file(value)
        if path is None:
            raise ConfigError("name the file inside the package: package:MODULE/FILE")
        value = str(path)
    path = Path(value).expanduser()
    if path.is_file():
        if not path.name.endswith(DATA_SUFFIXES):
            raise ConfigError(f"unsupported data file type: use one of {', '.join(DATA_SUFFIXES)}")
        if path.stat().st_size == 0:
            raise ConfigError("the data file is empty")
    elif not path.is_dir() and (path.name.endswith(DATA_SUFFIXES) or not looks_like_hub_id(value)):
        raise _missing(value, what)


def check_chat_template(value: str) -> None:
    """A bundled template name or a Jinja file that parses."""
    from tunesmith.data import chat_templates
    from tunesmith.data.tokenizer import TemplateError, compile_template

    if value in chat_templates.TEMPLATES:
        return
    path = Path(value).expanduser()
    if not path.is_file():
        names = sorted(chat_templates.TEMPLATES)
        close = difflib.get_close_matches(value, names, n=1, cutoff=0.5)
        hint = f" — did you mean {close[0]}?" if close else ""
        raise ConfigError(f"neither a bundled template ({', '.join(names)}) nor a Jinja file{hint}")
    try:
        compile_template(path.read_text(encoding="utf-8"))
    except TemplateError as e:
        raise ConfigError(str(e)) from None
    except UnicodeDecodeError:
        raise ConfigError("the template file is not UTF-8 text") from None


def check_output_dir(value: str) -> None:
    """A folder that is, or can become, a writable directory."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError("this is a file, not a folder: choose another output_dir")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{parent} is a file, so no folder can be made below it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{parent} is not writable by this user")


def check_no_earlier_run(output_dir: str, resume: bool) -> None:
    """A fresh run (``resume=false``) must not write into a folder holding an earlier run's
    checkpoints: its saves and pruning (``keep_last``) would replace and delete them."""
    path = Path(output_dir).expanduser()
    if resume or not path.is_dir():
        return
    steps = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name.startswith("step_"))
    if steps:
        shown = ", ".join(steps[-3:])
        raise ConfigError(f"output_dir {output_dir} already holds checkpoints of an earlier run ({shown}); "
                          "resume=true continues that run; to start a new one choose another output_dir "
                          "(or delete those folders yourself)")


def check_device_available(device: str) -> None:
    """``device=cuda``/``cuda:N``/``mps`` on a machine that has it."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"config key 'device' = {device!r}: CUDA is not available on this machine; "
                              "use device=cpu or device=auto")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"config key 'device' = {device!r}: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("config key 'device' = 'mps': MPS is not available on this machine; use device=cpu")
