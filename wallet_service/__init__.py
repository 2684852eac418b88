"""The wallet service (the mobile bus card business management platform); built by the
wallet-service issue."""
