"""Several appliances behind HAProxy: render its config, drive its runtime API, upgrade nodes one at a time."""
