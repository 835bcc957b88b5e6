"""The platform side: topology, the admin CLI, the coordinator, the artifact server."""
