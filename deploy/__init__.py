"""moeworks deploy: the CLI, serving, export, containers and the edge agent."""
