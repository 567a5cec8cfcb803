"""The TypedDict views of the wire messages (wire_types.py) say what schema.validate() checks, key for key."""

from vramtop_agent import schema, wire_types


def test_every_message_type_has_a_typed_view():
    assert set(wire_types.BY_TYPE) == set(schema._FIELDS)


def test_typed_views_match_the_schema_field_tables():
    for kind, fields in schema._FIELDS.items():
        view = wire_types.BY_TYPE[kind]
        required = set(schema._COMMON) | {k for k, (_, req) in fields.items() if req}
        optional = {k for k, (_, req) in fields.items() if not req}
        assert view.__required_keys__ == required, kind
        assert view.__optional_keys__ == optional, kind


def test_a_message_the_agent_sends_validates_with_its_optional_step_fields():
    blocks = dict.fromkeys(schema.BLOCK_KEYS, 1)
    step: wire_types.StepMsg = {
        "v": 1, "type": "step", "t": 1.0, "pid": 1, "rank": 0, "eseq": 1, "step": 0, "step_time": None,
        "micro_steps": 1, "peaks": dict.fromkeys(schema.PHASES, 1), "end_of_forward": 1, "backward_spike": 0,
        "peak": 1, "peak_phase": "forward", "peak_blocks": blocks, "eof_blocks": blocks,
    }
    assert schema.validate(dict(step)) == step
    broken = {**step, "eof_blocks": {"parameters": -1}}
    try:
        schema.validate(broken)
    except schema.SchemaError as exc:
        assert "eof_blocks" in str(exc)
    else:
        raise AssertionError("a step with broken eof_blocks validated")
