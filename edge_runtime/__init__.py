"""Runtime adapters shared by the broker and the agent: logging setup, file watching, status endpoint.

Unlike ``edge_core`` these may use the event loop and sockets; they hold no security decisions.
"""
