"""The forwarder process: one per destination of each source, fed by its receiver's pipe.

The receiver forks it and runs run_forwarder (socketproxy_core.forwarding); this module names that
entry point at the top of the project, beside socketproxy.py, the main process's.
"""
from socketproxy_core.forwarding import Forwarder, run_forwarder  # noqa: F401
