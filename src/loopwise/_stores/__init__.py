"""The event log's stores: the `EventStore` interface, `MemoryStore`, `SQLiteStore` (its journal and writer), and what makes a value storable."""
