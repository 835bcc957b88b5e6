"""fairu: run signed benchmark-challenge evaluations on many sites.

The subpackages are `fairu.protocol` (wire format, no I/O), `fairu.agent` (the site
daemon), `fairu.runners` (container runtimes) and `fairu.broker` (the platform side).
"""

__version__ = "0.1.0"
