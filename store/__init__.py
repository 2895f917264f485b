"""The LightningStore: ClickHouse schema, connection by URL, span-tree and rollout queries,
resources and training metrics. Knows SQL, not torch."""

from lightspan.store.store import RolloutSummary, Rows, Store
from lightspan.store.url import StoreURL, default_url, parse_store_url

__all__ = ["RolloutSummary", "Rows", "Store", "StoreURL", "default_url", "parse_store_url"]
