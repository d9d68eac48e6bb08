"""NATS publishes are pipelined; a message JetStream refuses in the middle of
a batch must not leave a gap that the messages after it would paper over
(the next round skips offsets the stream holds, so a gap would be final)."""

from __future__ import annotations

import secrets

import nats
import pytest

from coordinator.errors import Unavailable
from tests.transports.conftest import PLUGINS, transport_class
from tests.transports.test_contract import drain, entries

pytestmark = pytest.mark.integration

TOPIC = "orders.eu"


async def test_a_refused_message_mid_batch_stops_the_ones_after_it() -> None:
    url = PLUGINS["nats"][1]
    transport = transport_class("nats")(url, namespace=f"coordtest{secrets.token_hex(4)}", timeout_s=3.0)
    await transport.start()
    nc = await nats.connect(url)
    try:
        await transport.bind(TOPIC)
        await transport.subscribe(TOPIC, "g")
        js = nc.jetstream()
        stream = transport._stream(TOPIC)
        config = (await js.stream_info(stream)).config
        config.max_msg_size = 400
        await js.update_stream(config)  # a limit that refuses one message of the batch
        batch = entries(1, 5)
        batch[2].message["payload"] = {"blob": "x" * 1000}

        with pytest.raises(Unavailable):
            await transport.publish(batch)
        assert (await js.stream_info(stream)).state.messages == 2  # 1 and 2; not 4 and 5 past the hole

        config.max_msg_size = -1
        await js.update_stream(config)
        assert await transport.publish(batch) == 3  # the next round resends from the refused one
        got = await drain(transport, "g", 5)
        assert [d.offset for d in got] == [1, 2, 3, 4, 5]
    finally:
        await nc.close()
        await transport.unbind(TOPIC)
        await transport.close()
