"""MODEL as the user names it -> its config.json numbers: a preset, a config.json or model
directory, or a Hub id whose config.json is already in the local Hugging Face cache.

No network access is assumed: a Hub id that is not cached gets one line saying how to provide it.
"""

from __future__ import annotations

import glob
import json
import os

from vramtop_agent.estimator.presets import PRESET_NAMES, preset_config


def hf_cache_dir() -> str:
    """Where huggingface_hub keeps models (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.environ["HUGGINGFACE_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def cached_config_path(repo_id: str) -> str | None:
    """The newest cached snapshot's config.json of `repo_id` ("org/name"), or None."""
    folder = os.path.join(hf_cache_dir(), "models--" + repo_id.replace("/", "--"))
    ref = os.path.join(folder, "refs", "main")
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            path = os.path.join(folder, "snapshots", f.read().strip(), "config.json")
        if os.path.isfile(path):
            return path
    found = sorted(glob.glob(os.path.join(folder, "snapshots", "*", "config.json")), key=os.path.getmtime)
    return found[-1] if found else None


def read_config(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a config.json (not a JSON object)")
    return cfg


def resolve_model(name: str) -> tuple[dict, str]:
    """(config dict, display name) for a preset, a path, or a cached Hub id. ValueError: one line."""
    cfg = preset_config(name)
    if cfg is not None:
        return cfg, name.strip().lower()
    if os.path.exists(name) or name.endswith(".json") or name.startswith((".", "/", "~")):
        path = os.path.expanduser(name)
        label = os.path.basename(os.path.dirname(os.path.abspath(path if not os.path.isdir(path)
                                                                else os.path.join(path, "config.json"))))
        return read_config(path), label or name
    if name.count("/") == 1 and all(name.split("/")):
        cached = cached_config_path(name)
        if cached is None:
            raise ValueError(
                f"no config.json for {name!r} in the local Hugging Face cache ({hf_cache_dir()}): "
                f"fetch it with `huggingface-cli download {name} config.json`, or pass a path to a config.json")
        return read_config(cached), name
    raise ValueError(f"unknown model {name!r}: use a preset ({', '.join(PRESET_NAMES)}), a path to a "
                     f"config.json or model directory, or a Hub id (org/name) cached locally")
