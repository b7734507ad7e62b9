"""MQTT transport: the twin's client, TLS and credentials, their CLI options, and the brokers' set-up."""
