"""Independent reference sums: computed from the tensors, not with the agent's code."""


def storage_bytes(tensors):
    """Distinct storages' bytes, keyed by data pointer (a different key than the agent's)."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[(t.device, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def optimizer_tensors(optimizer):
    out = []
    for state in optimizer.state.values():
        out += [v for v in state.values() if hasattr(v, "untyped_storage")]
    return out
