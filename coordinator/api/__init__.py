"""The HTTP API (aiohttp): parse → service → render. No logic of its own."""
