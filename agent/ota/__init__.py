"""Over-the-air updates: signed releases, download, A/B install, health check and rollback (docs/ota.md)."""
