"""The pure protocol core: messages, codec, session state, channels, recovery, close codes.

Nothing in this package performs I/O or imports asyncio; adapters feed it values and act on what it
returns. A test enforces that.
"""
