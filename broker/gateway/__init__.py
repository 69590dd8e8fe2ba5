"""The HTTP front door: an OpenAI-compatible API in front of the queue pipeline.

The gateway never calls a provider: it turns each request into a ``CompletionJob``, publishes
it to ``<ns>.jobs`` with its replies on direct reply-to (``broker.transport.rpc``), and answers
from the job's chunks and result. It keeps no state of its own, so any number of replicas can
run behind a load balancer.
"""
