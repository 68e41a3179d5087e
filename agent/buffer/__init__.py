"""The durable store-and-forward buffer: records leave the disk only when the collector confirms them."""
