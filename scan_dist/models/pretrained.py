"""Import a backbone from a pretrained checkpoint in a published layout (`model.pretrained=PATH`).

Recognised layouts (after unwrapping `state_dict` / `model` / `network` / ... nesting):

* MoCo v2: `module.encoder_q.*` under `state_dict` (the query encoder; `encoder_q.fc.*` is the projection MLP,
  `encoder_k.*` and the queue are dropped); the checkpoint may pickle its `args` as an argparse.Namespace.
* MoCo v3: `module.base_encoder.*` (its `fc.*` / `head.*` projector, the predictor and the momentum encoder are
  dropped).
* a DDP `module.` prefix on every key, around any of the layouts here.
* torchvision ResNet: `conv1.weight`, `layer1.0.conv1.weight`, ... (`fc.*`, the classifier, is dropped).
* SimCLR-style ports: the encoder under `backbone.` or `encoder.`, a projection head beside it (dropped).
* this project's own saved pretext (or SCAN) model: `{"model": state}` with `backbone.*` keys.

Keys are mapped onto the backbone's own names (e.g. torchvision's `conv1.weight` -> our wrapper's
`net.conv1.weight`) and loaded strictly: every backbone tensor must be found with its shape, and every encoder tensor
must have a place in the backbone (a projection/classifier head is dropped with a reason, anything else is an error,
so a ResNet-34 never loads silently into a ResNet-18).  Only BatchNorm's `num_batches_tracked` counters may be absent
(converted checkpoints often lack them; they do not change the features).
"""
from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import DataError

# Keys a checkpoint may nest its state dict under, tried in this order at every level.
NESTING_KEYS = ("state_dict", "model_state_dict", "model", "network", "net", "backbone", "encoder", "module")
# First name component of the heads a pretraining method puts on top of the encoder (dropped when the backbone has
# no such module): projection MLPs, predictors, classifiers.
HEAD_NAMES = ("fc", "head", "heads", "projector", "projection", "projection_head", "contrastive_head", "predictor",
              "classifier", "prototypes")
NUM_BATCHES = "num_batches_tracked"
# Classes a published checkpoint may pickle beside its tensors that are safe to rebuild (MoCo stores its `args`).
SAFE_EXTRA_GLOBALS = (argparse.Namespace,)


def load_pretrained_backbone(backbone: nn.Module, path, setting: str = "model.pretrained") -> dict:
    """Load the encoder weights of checkpoint `path` into `backbone` (strict); return what was done.

    The report: `path`, `format` (the detected layout), `nesting` (keys unwrapped), `prefix` (the encoder's key
    prefix in the file), `loaded` (number of tensors copied), `renamed` (key rewrites applied), `kept` (backbone
    tensors absent from the file and left as they were: only BatchNorm counters), `dropped` ({reason: [keys]}) and
    `summary` (one line for the log).  Errors are DataErrors naming `setting=path`.
    """
    where = f"{setting}={path}"
    raw = _read(Path(path), where)
    state, nesting = _unwrap(raw, where)
    fmt, prefix, dropped = _detect(state, nesting)
    encoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    target = backbone.state_dict()
    mapping, renamed = _align(list(encoder), target)

    matched: dict[str, torch.Tensor] = {}
    mismatched, unexpected, wrong_shape = [], [], set()
    for key, value in encoder.items():
        name = mapping[key]
        if name in target:
            if tuple(value.shape) == tuple(target[name].shape):
                matched[name] = value
            else:
                mismatched.append((prefix + key, tuple(value.shape), tuple(target[name].shape)))
                wrong_shape.add(name)
        elif key.split(".", 1)[0] in HEAD_NAMES:
            dropped.setdefault(f"projection/classifier head ({prefix}{key.split('.', 1)[0]}.*)", []).append(
                prefix + key)
        else:
            unexpected.append(prefix + key)
    missing = [name for name in target if name not in matched and name not in wrong_shape]
    kept = [name for name in missing if name.endswith(NUM_BATCHES)]
    missing = [name for name in missing if not name.endswith(NUM_BATCHES)]
    if missing or mismatched or unexpected:
        raise DataError(_mismatch_message(where, fmt, missing, mismatched, unexpected, len(target)))

    with torch.no_grad():
        backbone.load_state_dict({**{k: target[k] for k in kept}, **matched}, strict=True)
    dropped_count = sum(len(keys) for keys in dropped.values())
    dropped_text = "; ".join(f"{len(keys)} {reason}" for reason, keys in dropped.items())
    summary = (f"{where}: {fmt} checkpoint, {len(matched)} tensors loaded into the backbone"
               + (f" (encoder prefix {prefix!r})" if prefix else "")
               + (f", renamed {', '.join(renamed)}" if renamed else "")
               + (f", {len(kept)} BatchNorm counters absent (kept)" if kept else "")
               + (f"; dropped {dropped_count}: {dropped_text}" if dropped else ""))
    return {"path": str(path), "format": fmt, "nesting": nesting, "prefix": prefix, "loaded": len(matched),
            "renamed": renamed, "kept": kept, "dropped": dropped, "summary": summary}


def _read(path: Path, where: str):
    if not path.is_file():
        raise DataError(f"{where}: " + ("not a file" if path.exists() else "the file does not exist"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = exc
    except Exception as exc:  # a truncated zip, a text file, ...: not a torch checkpoint
        raise DataError(f"cannot read {where}: not a readable torch checkpoint ({type(exc).__name__}: "
                        f"{_short(exc)})") from None
    # weights_only refused a pickled object: retry with the few harmless classes published checkpoints carry
    # (MoCo's `args` Namespace).  Never falls back to unrestricted unpickling.
    try:
        with torch.serialization.safe_globals(list(SAFE_EXTRA_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = _short(exc if isinstance(exc, pickle.UnpicklingError) else first)
        raise DataError(f"cannot read {where} with weights-only loading: {detail}; it pickles objects other than "
                        "tensors and argparse.Namespace; re-save its state dict (torch.save(model.state_dict(), ...)) "
                        "from a trusted environment") from None


def _short(exc: Exception) -> str:
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"unsupported pickled class {found.group(1)}"
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).strip().splitlines()
    return (text[0] if text else repr(exc))[:200]


def _is_state(obj) -> bool:
    """A mapping of names to tensors (a few non-tensor entries, e.g. a version number, are tolerated)."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
    return tensors > 0 and tensors >= len(obj) / 2


def _unwrap(obj, where: str) -> tuple[dict, list[str]]:
    nesting: list[str] = []
    while True:
        if not isinstance(obj, Mapping):
            raise DataError(f"{where}: expected a state dict (a mapping of names to tensors), found a "
                            f"{type(obj).__name__}")
        # a state dict's values are tensors, so a nesting key holding a mapping is always a wrapper level, even
        # beside a few stray tensors (e.g. a checkpoint's {"model": {...}, "queue": tensor})
        key = next((k for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            if _is_state(obj):
                break
            raise DataError(f"{where}: no state dict found (top-level keys: {sorted(map(str, obj))[:8]}; looked for "
                            f"{', '.join(NESTING_KEYS)})")
        nesting.append(key)
        obj = obj[key]
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}, nesting


def _detect(state: dict, nesting: list[str]) -> tuple[str, str, dict]:
    """(format, encoder key prefix, {reason: dropped keys outside the encoder})."""
    keys = list(state)
    ddp = bool(keys) and all(k.startswith("module.") for k in keys)
    inner = [k[len("module."):] for k in keys] if ddp else keys
    outer = "module." if ddp else ""

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in inner)

    if has("encoder_q."):
        fmt, prefix = "MoCo v2", "encoder_q."
    elif has("base_encoder."):
        fmt, prefix = "MoCo v3", "base_encoder."
    elif nesting[-1:] == ["model"] and has("backbone.") and (has("projection.mlp.") or has("heads.weights.")):
        fmt, prefix = "scan_dist " + ("pretext" if has("projection.mlp.") else "SCAN") + " model", "backbone."
    elif has("backbone."):
        fmt, prefix = "SimCLR-style (backbone.*)", "backbone."
    elif has("encoder."):
        fmt, prefix = "SimCLR/SimSiam-style (encoder.*)", "encoder."
    elif "conv1.weight" in inner and has("layer1.0."):
        fmt, prefix = "torchvision ResNet", ""
    else:
        fmt, prefix = "plain state dict", ""
    if ddp and not fmt.startswith("MoCo"):  # MoCo checkpoints always carry DDP's prefix; say so only otherwise
        fmt = f"DDP-wrapped {fmt}"
    elif not ddp and fmt.startswith("MoCo"):
        fmt = f"{fmt} (no module. prefix)"

    dropped: dict[str, list[str]] = {}
    full = outer + prefix
    if prefix:
        for key in keys:
            if not key.startswith(full):
                branch = key[len(outer):].split(".", 1)[0]
                reason = {"encoder_k": "key (momentum) encoder", "momentum_encoder": "momentum encoder",
                          "predictor": "predictor MLP", "queue": "negatives queue", "queue_ptr": "negatives queue"
                          }.get(branch)
                if reason is None:
                    pattern = outer + branch + (".*" if "." in key[len(outer):] else "")
                    kind = "projection/classifier head" if branch in HEAD_NAMES else "outside the encoder"
                    reason = f"{kind} ({pattern})"
                dropped.setdefault(reason, []).append(key)
    return fmt, full, dropped


def _first_component(keys) -> str | None:
    """The common first name component of `keys` (e.g. 'net.'), if they all share one."""
    firsts = {k.split(".", 1)[0] for k in keys if "." in k}
    if len(firsts) == 1 and all("." in k for k in keys):
        return firsts.pop() + "."
    return None


def _align(source: list[str], target: Mapping) -> tuple[dict[str, str], list[str]]:
    """Map encoder keys onto backbone names: add/strip a one-level wrapper (our torchvision wrapper's `net.`) and,
    for CIFAR ResNets written with `shortcut` blocks, rename shortcut -> downsample.  The mapping that places the
    most keys wins (ties: the simplest)."""
    body = [k for k in source if k.split(".", 1)[0] not in HEAD_NAMES] or source
    strips = [""] + [p for p in [_first_component(body)] if p]
    adds = [""] + [p for p in [_first_component(target)] if p]
    best, best_hits, best_renames = {k: k for k in source}, -1, []
    for shortcut in (False, True):
        for strip in strips:
            for add in adds:
                if strip and strip == add:
                    continue
                mapping = {}
                for key in source:
                    name = key[len(strip):] if strip and key.startswith(strip) else key
                    if shortcut:
                        name = re.sub(r"(^|\.)shortcut\.", r"\1downsample.", name)
                    mapping[key] = add + name
                hits = sum(name in target for name in mapping.values())
                if hits > best_hits:
                    renames = [f"{strip or ''}* -> {add or ''}*"] if strip or add else []
                    best, best_hits = mapping, hits
                    best_renames = renames + (["shortcut -> downsample"] if shortcut else [])
    return best, best_renames


def _mismatch_message(where: str, fmt: str, missing: list, mismatched: list, unexpected: list, total: int) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} of {total} backbone tensors are missing: {', '.join(missing[:4])}"
                     + (", ..." if len(missing) > 4 else ""))
    if mismatched:
        shown = ", ".join(f"{key} is {list(have)} but the backbone needs {list(need)}"
                          for key, have, need in mismatched[:3])
        parts.append(f"{len(mismatched)} have the wrong shape: {shown}" + (", ..." if len(mismatched) > 3 else ""))
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint tensors have no place in the backbone: "
                     f"{', '.join(unexpected[:4])}" + (", ..." if len(unexpected) > 4 else ""))
    hint = " (check model.backbone"
    if any(key.endswith("conv1.weight") and have[1] != need[1] for key, have, need in mismatched):
        hint += "; the first convolution's input channels differ: set data.channels"
    return f"{where} looks like {fmt} but " + "; ".join(parts) + hint + ")"
