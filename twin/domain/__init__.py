"""The plant and its rules, free of I/O: plant model, live state, alarms, health, what-if simulation."""
