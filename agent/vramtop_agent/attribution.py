"""Where the activations are: bytes saved for backward per top-level module, on tracked steps.

The units are the modules a reader thinks in: the embeddings, each decoder
layer, the final norm, the LM head. They are found by descending from the
root (through known wrappers) into module lists and single-child wrappers.
On a tracked step a forward pre hook on each unit names the unit that is
running; the saved-tensor tracker files each newly saved storage under it.
Nothing resets the name after a unit returns, so what the root computes
after the last unit (the loss, from the logits) is filed under that unit:
"lm_head" reads as "logits + loss".

The hooks exist only during tracked forwards (registered at the root's pre
hook, removed at its post hook): the steps in between pay nothing. Modules
inside a compiled region never get one (Dynamo would break its graph at it):
no attribution below a compiled root, and a compiled unit is skipped (its
saves go to the unit before it).
"""

from __future__ import annotations

import weakref

from vramtop_agent.autodetect import unwrap
from vramtop_agent.hooks import remove_hooks
from vramtop_agent.saved import ROOT_UNIT

MAX_UNITS = 160
MAX_DEPTH = 6


def _compiled(module) -> bool:
    return type(module).__name__ == "OptimizedModule" or getattr(module, "_compiled_call_impl", None) is not None


def _is_list(module) -> bool:
    return type(module).__name__ in ("ModuleList", "ModuleDict")


def _expand(module) -> bool:
    children = list(module.children())
    if _is_list(module) or len(children) == 1:
        return True
    return any(_is_list(c) and len(c) >= 2 for c in children)


def find_units(model) -> list[tuple[str, object]]:
    """(name, module) of the top-level units, in registration order; [] when none can be hooked."""
    root = unwrap(model)
    if _compiled(model) or _compiled(root):
        return []
    out: list = []

    def visit(module, prefix: str, depth: int) -> None:
        for name, child in module.named_children():
            if len(out) >= MAX_UNITS:
                return
            full = prefix + name
            if _compiled(child):
                continue
            if depth < MAX_DEPTH and _expand(child) and any(True for _ in child.children()):
                visit(child, full + ".", depth + 1)
            else:
                out.append((full, child))

    visit(root, "", 0)
    if len(out) < 2:
        return []
    return _strip_common_prefix(out)


def _strip_common_prefix(units: list) -> list:
    names = [n for n, _ in units]
    prefix = names[0]
    for n in names[1:]:
        while prefix and not n.startswith(prefix):
            prefix = prefix[:-1]
    prefix = prefix[: prefix.rfind(".") + 1]
    return [(n[len(prefix):] or n, m) for n, m in units]


class Attribution:
    def __init__(self, saved) -> None:
        self.saved = saved
        self._units: list = []  # (name, weakref(module), pre hook)
        self._handles: list = []

    def set_model(self, model) -> None:
        self.exit()
        self._units = []
        try:
            units = find_units(model)
        except Exception:
            units = []
        for name, module in units:
            self._units.append((name, weakref.ref(module), self._hook_for(name)))

    def _hook_for(self, name: str):
        saved = self.saved

        def pre(module, args):
            saved.unit = name
            return None

        return pre

    def hot_functions(self) -> list:
        return [self._hook_for("")]

    @property
    def units(self) -> list[str]:
        return [n for n, _, _ in self._units]

    def enter(self) -> None:
        """Tracked forward starts: hook every unit (a compiled one excepted)."""
        if self._handles:
            return
        self.saved.unit = ROOT_UNIT
        handles = []
        for _, ref, hook in self._units:
            m = ref()
            if m is not None and not _compiled(m):
                handles.append(m.register_forward_pre_hook(hook))
        self._handles = handles

    def exit(self) -> None:
        handles, self._handles = self._handles, []
        remove_hooks(handles)

    def live(self) -> dict[str, int]:
        """Bytes saved for backward now, per unit ({} when the model has no units)."""
        if not self._units:
            return {}
        return self.saved.by_unit()
