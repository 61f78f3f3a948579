"""Getting bytes to devices: the MQTT publisher and event deduplication."""
