"""outpost-hub and the operator CLI `outpost`. May import `agent`; never the reverse."""

__version__ = "0.1.0"
