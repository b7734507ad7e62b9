"""One module per served model family; deploy.serving.registry lists them and imports them lazily."""
