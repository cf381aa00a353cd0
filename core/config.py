from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings


class Settings(BaseSettings):
    """Settings read from environment variables (e.g. DATABASE_URL, DB_POOL_SIZE)."""

    database_url: str = Field(
        default="sqlite:///./items.db",
        description="The driver picks the mode: +asyncpg or +aiosqlite run async, anything else sync.",
    )
    database_echo: bool = Field(default=False, description="Log every SQL statement.")
    db_pool_size: int = Field(default=5, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    db_pool_timeout: float = Field(default=30, gt=0, description="Seconds to wait for a free pooled connection.")
    db_connect_timeout: float = Field(default=5, gt=0, description="Seconds to wait for the database to answer.")
    db_prepared_statements: bool = Field(
        default=True, description="Turn off behind PgBouncer in transaction pooling mode."
    )
    db_migrate_on_start: bool = Field(
        default=True,
        description="Run the migrations at start-up; turn off where they run as a separate step (alembic upgrade head).",
    )
    sqlite_busy_timeout_ms: int = Field(default=5000, ge=0)
    max_body_bytes: int = Field(default=1024 * 1024, gt=0, description="Larger request bodies get a 413.")


@lru_cache
def get_settings() -> Settings:
    return Settings()
