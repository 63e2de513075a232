"""Control planes: where kill requests and leases live (in-process, SQLite, Redis), `kill` and run status."""
