"""Adapters: the picows WebSocket listener and the aiohttp internal API."""
