"""One router per resource of the twin's API."""
