"""gateway: the one address clients talk to; routes requests to modelhosts and relays streams."""
