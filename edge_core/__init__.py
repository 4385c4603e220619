"""The plain core of the gateway security stack.

Everything in this package decides; nothing here does I/O on a network, runs an
event loop or imports amqtt. Identity extraction, the device registry, admission
decisions, ACL compile and match, command envelopes, CRL state and certificate
lifecycle decisions live here so that they can be tested in microseconds and used
by both the broker (``broker_plugins``) and the agent (``gateway_agent``).

``tests/core/test_core_is_plain.py`` enforces the import rule.
"""
