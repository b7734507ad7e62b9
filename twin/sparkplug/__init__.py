"""The wire format: Sparkplug B topics and payloads, as protobuf (Eclipse Tahu's schema) or our JSON."""
