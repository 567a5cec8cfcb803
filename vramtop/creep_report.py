"""The report's creep section: the `creep` events of a recording (or, for a file written before
they existed, the same detection run over its stream), as data and as text lines."""

from __future__ import annotations

from vramtop_agent.creep import CreepWatch

# Recording format 2 added `creep` events (vramtop_agent.recorder); older files get them recomputed.
FIRST_FORMAT_WITH_CREEP = 2


def summarize(rec, session: int | None) -> list[dict]:
    events = rec.events(("creep",), session=session)
    if events or getattr(rec, "schema_version", FIRST_FORMAT_WITH_CREEP) >= FIRST_FORMAT_WITH_CREEP:
        return events
    watch, found = CreepWatch(), []
    for msg in rec.messages(session=session, tables=("samples", "events")):
        found += watch.feed(msg)
    return found


def lines(events: list[dict], steps: int) -> list[str]:
    from vramtop.alerts import _duration
    from vramtop_agent.vocabulary import fmt_bytes

    if not events:
        return [f"CREEP     none: no memory grew steadily from step to step after warm-up ({steps} steps)"] \
            if steps else []
    out = []
    for e in events:
        where = "host RAM" if e.get("series") == "rss" else "the card"
        text = (f"CREEP     {e.get('series')} +{fmt_bytes(e.get('slope'))}/step since step {e.get('since_step')}, "
                f"first seen at step {e.get('step')}")
        if e.get("steps_to_full") is not None:
            text += f"; {where} full in ~{e['steps_to_full']:,} steps"
            if e.get("seconds_to_full") is not None:
                text += f" (≈ {_duration(e['seconds_to_full'])})"
        out.append(text)
    out.append("          something keeps memory from step to step: tensors appended to a list (logits, losses "
               "without .item()), caches that never evict, graphs kept alive")
    return out
