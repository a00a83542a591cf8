"""The state store: SQLAlchemy models, sessions and Alembic migrations. Control plane only."""
