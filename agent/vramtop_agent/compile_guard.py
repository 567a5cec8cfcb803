"""Keep the agent's hooks out of torch.compile.

Two ways a hook meets Dynamo:
- traced inline, when it sits inside a compiled region (a module compiled in
  place, a compiled optimizer step): every hook starts with `is_compiling()`
  and returns at once, which Dynamo folds to nothing — no graph break, and the
  compiled graph is the one the job gets without vramtop;
- called at run time from inside a compiled function (the saved-tensor pack
  hook runs when the compiled forward saves for backward): Dynamo's frame
  callback would try to compile each such frame, break on it and warn. Their
  code objects are marked skip (`skip_code`): they run eagerly, at no cost.
  Only our own code: a job's hook that ours chains to is left as it is.

torch._dynamo is imported by torch.compile, not by torch: nothing is done
until it is loaded (checked with one dict lookup per tracked forward).
"""

from __future__ import annotations

import sys

_done = False


def skip_our_frames(functions) -> None:
    """Mark the code of these functions (and bound methods) as never compiled, once torch._dynamo is loaded."""
    global _done
    if _done or "torch._dynamo" not in sys.modules:
        return
    _done = True
    try:
        from torch._dynamo.eval_frame import skip_code
    except Exception:
        return
    for fn in functions:
        code = getattr(getattr(fn, "__func__", fn), "__code__", None)
        if code is not None:
            try:
                skip_code(code)
            except Exception:
                pass
