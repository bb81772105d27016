"""An AMQP broker whose connections are accepted and dropped at once, again and again (a
server going down, a proxy refusing), keeps reconnecting and works once they are let
through (a TCP proxy from tests/support/faults.py in front of the machine's RabbitMQ).

Now and then pika raises out of its own callback in that situation (ValueError
"getpeername() failed", when the reset lands between connect and getpeername), which used to
end conveyor's I/O thread; this test does not force that race (it passed before the fix
too): tests/faults/test_network_faults.py hit it in about half of its runs.
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest
from support.faults import TcpProxy

from conveyor.core.errors import ConveyorError
from conveyor.core.types import Envelope
from conveyor.testing.support import eventually, unique_name
from conveyor.transports.amqp import AMQPBroker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

AMQP_URL = os.environ.get("CONVEYOR_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def test_connections_dropped_at_accept_for_a_while_then_it_works() -> None:
    port = int(AMQP_URL.rsplit(":", 1)[1].split("/", 1)[0])
    with TcpProxy(port) as proxy:
        proxy.refuse = True
        url = AMQP_URL.replace(f"127.0.0.1:{port}", f"127.0.0.1:{proxy.port}")
        broker = AMQPBroker.from_url(url, max_retry_interval=0.2)
        queue = unique_name("refused")
        try:
            with pytest.raises(ConveyorError):
                broker.declare_queue(queue)  # nothing gets through
            time.sleep(3.0)  # the outage: ~15 reconnect attempts, each accepted and dropped
            proxy.refuse = False

            def works() -> bool:
                try:
                    broker.declare_queue(queue)
                    broker.publish(Envelope(id=unique_name("m"), body=b"{}"), queue=queue)
                except ConveyorError:
                    return False
                return True

            eventually(works, 30, message="the broker works again")
            [got] = broker.receive(queue, timeout=10)
            broker.ack(got)
        finally:
            with contextlib.suppress(ConveyorError):
                broker.purge(queue)
            broker.close()
