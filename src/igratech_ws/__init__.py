"""igratech-ws: a real-time push gateway for the Igratech WebSocket API."""

__version__ = "0.1.0"
