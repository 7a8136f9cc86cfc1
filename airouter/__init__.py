"""airouter: shared pieces of the gateway and the modelhost (protocol stubs, errors, logging)."""
