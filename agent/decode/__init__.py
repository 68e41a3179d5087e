"""Pure decoders: bytes in, values out; no threads, sockets, clocks or logging of records."""
