"""The producer's library: publish jobs and wait for their results over AMQP.

It imports only ``schemas``, ``broker.core`` and the plain transport, so a producer's process gets
no server code and no change to aiormq or pamqp (``broker.transport.fastpath`` is opt-in).
"""

from broker.client.client import SwitchyardClient, make_job

__all__ = ["SwitchyardClient", "make_job"]
