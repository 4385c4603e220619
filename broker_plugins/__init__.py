"""The hardened MQTT broker: amqtt 0.12.1 with our listener, broker subclass and plugins.

- ``listener``: the TLS 1.3 mTLS listener we own (handshake timeout, connection cap).
- ``framing``: MQTT framing guard (maximum packet size) in front of amqtt's reader.
- ``broker``: ``HardenedBroker``, closing amqtt's gaps (auth before any session change, ...).
- ``plugins``: amqtt plugins that adapt the plain core (``edge_core``) to amqtt hooks.
"""
