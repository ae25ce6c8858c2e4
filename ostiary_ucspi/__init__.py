"""ostiary-ucspi: the Ostiary 4.0 protocol, one connection per process.

Four products share this package: the handler and its policy (the modules
here), the operator tools (``admin/``), the ucspi-tcp shim (``ucspi/``, which
imports nothing from the rest but the leaves ``cdb`` and ``fail``) and the
client (``client``).
"""

__version__ = "0.2.0"
