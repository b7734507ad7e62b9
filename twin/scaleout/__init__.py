"""The twin as N workers on one broker and one PostgreSQL: worker, leases, message order, supervisor."""
