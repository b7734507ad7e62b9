"""What the twin keeps and hands on: history (SQLite/PostgreSQL), daily Parquet ETL, MES work orders."""
