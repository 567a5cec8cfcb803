"""The publisher and the recorder are whole Sinks; a send/close-only sink is wrapped once, not probed."""

import pytest

from vramtop_agent.publisher import Publisher
from vramtop_agent.recorder import Recorder
from vramtop_agent.sinks import SendEach, Sink, as_sink, sink_name


class Failing:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        if msg.get("fail"):
            raise ValueError("refused")
        self.sent.append(msg)

    def close(self):
        pass


def test_publisher_and_recorder_are_sinks(tmp_path, free_tcp_endpoint):
    pub = Publisher(free_tcp_endpoint)
    rec = Recorder(str(tmp_path / "r.vramtop"))
    try:
        assert isinstance(pub, Sink) and as_sink(pub) is pub
        assert isinstance(rec, Sink) and as_sink(rec) is rec
    finally:
        pub.close()
        rec.close()


def test_a_plain_sink_gets_every_message_and_the_failure_after_them():
    plain = Failing()
    sink = as_sink(plain)
    assert isinstance(sink, SendEach) and sink_name(sink) == "Failing"
    with pytest.raises(ValueError):
        sink.send_many([{"n": 1}, {"fail": True}, {"n": 2}])
    assert plain.sent == [{"n": 1}, {"n": 2}]  # one refused message never costs the rest
