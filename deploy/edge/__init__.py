"""The edge agent: replays or simulates a machine and publishes it to the twin over MQTT."""
