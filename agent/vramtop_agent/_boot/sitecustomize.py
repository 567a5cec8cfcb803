"""vramtop's bootstrap for `vramtop run`: it is on PYTHONPATH of the command it runs.

Python imports `sitecustomize` at start-up. This one starts the vramtop agent
(vramtop_agent._autostart: nothing heavy until torch is imported) when
VRAMTOP=1 or VRAMTOP_RECORD is set, then runs the `sitecustomize` it shadows,
if there is one, exactly as site.py would have. It never breaks the
interpreter: any failure is one line on stderr.

If vramtop_agent is not importable by this interpreter (a different
environment), it is loaded from VRAMTOP_AGENT_PATH (the directory holding the
vramtop_agent package, set by `vramtop run`) without touching sys.path.
"""


def _vramtop_boot():
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        try:
            from vramtop_agent import _autostart
        except ImportError:
            base = os.environ.get("VRAMTOP_AGENT_PATH")
            init = os.path.join(base or "", "vramtop_agent", "__init__.py")
            if not base or not os.path.isfile(init):
                raise
            import importlib.util

            spec = importlib.util.spec_from_file_location(
                "vramtop_agent", init, submodule_search_locations=[os.path.dirname(init)])
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load vramtop_agent from {init}") from None
            module = importlib.util.module_from_spec(spec)
            sys.modules["vramtop_agent"] = module
            spec.loader.exec_module(module)
            from vramtop_agent import _autostart
        _autostart.start_from_env()
    except Exception as exc:
        try:
            sys.stderr.write(f"vramtop: agent not started ({type(exc).__name__}: {exc})"[:400] + "\n")
        except Exception:
            pass

    # Chain to the sitecustomize this file shadows (site.py's behaviour and error message).
    try:
        import importlib.machinery
        import importlib.util

        paths = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", paths)
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules["sitecustomize"] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                if sys.flags.verbose:
                    sys.excepthook(*sys.exc_info())
                else:
                    sys.stderr.write("Error in sitecustomize; set PYTHONVERBOSE for traceback:\n"
                                     f"{type(exc).__name__}: {exc}\n")
    except Exception:
        pass


_vramtop_boot()
del _vramtop_boot
