"""The site agent: config, broker session, capacity probe, job pipeline, state."""
